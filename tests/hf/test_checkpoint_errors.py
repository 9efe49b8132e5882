"""Bad HF checkpoints give one clear error listing every problem; sharded files load."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from deepwish import load_hf, save_hf
from deepwish.hf.io import CheckpointError
from tests.hf.hf_utils import random_hf_model


@pytest.fixture()
def ckpt(tmp_path):
    cfg = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    random_hf_model(Qwen3ForCausalLM, cfg).save_pretrained(tmp_path)
    return tmp_path


def test_unsupported_architecture(ckpt):
    d = json.loads((ckpt / "config.json").read_text())
    d["architectures"] = ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="unsupported architecture 'LlamaForCausalLM'"):
        load_hf(ckpt)


def test_missing_unexpected_and_shape_all_listed(ckpt):
    f = ckpt / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    sd["model.extra.weight"] = torch.zeros(3)
    save_file(sd, f)
    with pytest.raises(CheckpointError) as e:
        load_hf(ckpt)
    msg = str(e.value)
    assert "missing in checkpoint: model.layers.1.mlp.up_proj.weight" in msg
    assert "shape mismatch for blocks.0.mixer.k_proj.weight" in msg
    assert "unexpected tensors in checkpoint (1): model.extra.weight" in msg


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(tmp_path)


def test_sharded_save_and_load(ckpt, tmp_path):
    m = load_hf(ckpt)
    out = save_hf(m, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    again = load_hf(out)
    x = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(x).logits, m(x).logits)


def test_bf16_load(ckpt):
    m = load_hf(ckpt, dtype=torch.bfloat16)
    assert m.embed.weight.dtype == torch.bfloat16
    assert m(torch.randint(0, 50, (1, 5))).logits.shape == (1, 5, 50)


@pytest.mark.parametrize("text, match", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                         (None, "lacks the field 'hidden_size'")])
def test_broken_or_partial_config_json_is_one_error(ckpt, text, match):
    f = ckpt / "config.json"
    if text is None:  # partial: a field the mapping needs is gone
        d = json.loads(f.read_text())
        del d["hidden_size"]
        text = json.dumps(d)
    f.write_text(text)
    with pytest.raises(CheckpointError, match=match) as e:
        load_hf(ckpt)
    assert "\n" not in str(e.value)


def test_truncated_safetensors_names_the_file(ckpt):
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    for keep in (len(raw) // 2, 10):  # cut inside the tensor data, then inside the header
        f.write_bytes(raw[:keep])
        with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)") as e:
            load_hf(ckpt)
        assert "\n" not in str(e.value)
