"""A preset model -> save_hf -> load_hf comes back bit-exact: every weight's value, the config, the
rotary frequencies (fp32 whatever the model's dtype) and so the logits, in fp32 and in bf16."""
import dataclasses

import pytest
import torch

from deepwish.config import model_config
from deepwish.hf.io import load_hf, save_hf
from deepwish.model.rope import rope_frequencies
from deepwish.model.transformer import Transformer

FP32_IN_HF = ("A_log", "dt_bias")  # load_hf keeps the decay parameters fp32 (hf/qwen3_next.py FP32_KEYS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["qwen3_next_tiny", "qwen3_moe_tiny"])
def test_preset_round_trip_is_bit_exact(preset, dtype, tmp_path):
    model = Transformer(model_config(preset)).to(dtype).eval()
    back = load_hf(save_hf(model, tmp_path / "hf"))
    assert back.cfg == model.cfg, [f.name for f in dataclasses.fields(model.cfg)
                                   if getattr(model.cfg, f.name) != getattr(back.cfg, f.name)]
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        u = theirs[name]
        fp32_kept = name.endswith(FP32_IN_HF) and u.dtype == torch.float32
        assert u.dtype == t.dtype or fp32_kept, (name, t.dtype, u.dtype)
        assert torch.equal(t.float(), u.float()), name  # bf16 -> fp32 is exact: the values are the same
    # a dtype cast moves the rotary frequencies but keeps them fp32 (load_hf recomputes them in fp32)
    exact = rope_frequencies(model.cfg, model.rotary.dim)[0]
    for m in (model, back):
        assert m.rotary.inv_freq.dtype == torch.float32 and torch.equal(m.rotary.inv_freq, exact)
    x = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(x).logits, back(x).logits)
