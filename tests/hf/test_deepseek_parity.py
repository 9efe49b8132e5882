"""DeepSeek-V3 / V3.2 parity with HF transformers on random tiny models (CPU, fp32).

For each config: logits at every position, prefill + one-token decode (the weight-absorbed MLA
path over the latent cache) against the full forward (the naive path), 32 greedy tokens against
HF `generate`, and save_hf -> HF from_pretrained (with MTP tensors in our export). The router's
e_score_correction_bias (a buffer, which random_hf_model leaves at zero) is randomised so the
"bias chooses but never weights" rule is exercised.
"""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import (AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV32Config,
                          DeepseekV32ForCausalLM)

from deepwish import load_hf, save_hf
from deepwish.generate import decode_one_token, generate, prefill
from tests.hf.hf_utils import hf_greedy, random_hf_model, rel_err

V = 97
BASE = dict(vocab_size=V, hidden_size=48, intermediate_size=80, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
            max_position_embeddings=256, rms_norm_eps=1e-6, routed_scaling_factor=2.5)

V3 = (DeepseekV3Config, DeepseekV3ForCausalLM)
V32 = (DeepseekV32Config, DeepseekV32ForCausalLM)
CASES = {
    # q LoRA, 2 groups keep 1: the group rule decides most tokens
    "v3_qlora_g2k1": (V3, dict(q_lora_rank=24, n_group=2, topk_group=1, norm_topk_prob=True)),
    # full-rank q, 4 groups keep 2, no renormalisation (scaling still applies), half-split rope
    "v3_fullq_g4k2_nonorm": (V3, dict(q_lora_rank=None, n_group=4, topk_group=2, norm_topk_prob=False,
                                      rope_interleave=False, first_k_dense_replace=2)),
    # YaRN with mscale != mscale_all_dim: rotary attention factor and softmax mscale² both matter;
    # attention biases (q_a_proj, kv_a_proj_with_mqa, o_proj)
    "v3_yarn_mscale_bias": (V3, dict(q_lora_rank=24, n_group=1, topk_group=1, first_k_dense_replace=0,
                                     attention_bias=True,
                                     rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                      "original_max_position_embeddings": 64, "beta_fast": 32,
                                                      "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 1.2})),
    # DSA with top-8 of up to 40 keys: the sparse mask is active in prefill and decode
    "v32_topk8": (V32, dict(q_lora_rank=24, n_group=2, topk_group=1, index_n_heads=16, index_head_dim=16,
                            index_topk=8)),
    "v32_yarn_g4": (V32, dict(q_lora_rank=24, n_group=4, topk_group=3, index_n_heads=16, index_head_dim=24,
                              index_topk=5, first_k_dense_replace=0,
                              rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                               "original_max_position_embeddings": 128, "mscale": 1.0,
                                               "mscale_all_dim": 1.0})),
}


def randomise_router_bias(model) -> None:
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    (cfg_cls, model_cls), kw = CASES[request.param]
    cfg = cfg_cls(**{**BASE, **kw})
    hf = random_hf_model(model_cls, cfg)
    randomise_router_bias(hf)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = load_hf(path, dtype=torch.float32)
    return request.param, hf, ours, path


def test_config_and_bias_loaded(pair):
    _, hf, ours, _ = pair
    assert ours.cfg.n_mtp == 0  # HF writes no MTP tensors: loaded without them, with a note
    hf_bias = [b for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias")]
    our_bias = [b for n, b in ours.named_buffers() if n.endswith("e_score_correction_bias")]
    assert len(hf_bias) == len(our_bias) > 0
    for a, b in zip(hf_bias, our_bias):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_logits_every_position(pair):
    _, hf, ours, _ = pair
    x = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        ref = hf(x).logits
        out = ours(x).logits
    assert out.shape == ref.shape
    assert rel_err(ref, out) <= 1e-4


def test_prefill_then_absorbed_decode_matches_forward(pair):
    _, _, ours, _ = pair
    x = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        full = ours(x).logits
    cache = ours.make_cache(2, 32)
    k = 9
    steps = [prefill(ours, x[:, :k], cache)]
    for t in range(k, x.shape[1]):
        steps.append(decode_one_token(ours, x[:, t], torch.full((2,), t), cache))
    got = torch.stack(steps[:-1], 1)
    assert rel_err(full[:, k - 1:-1], got) <= 1e-4
    assert rel_err(full[:, -1], steps[-1]) <= 1e-4


def test_greedy_32_tokens_equal_hf(pair):
    _, hf, ours, _ = pair
    # token 0 is the pad id hf_greedy passes to generate(), which would read it as left padding
    prompt = torch.randint(1, V, (1, 7))
    assert generate(ours, prompt, 32)[0] == hf_greedy(hf, prompt, 32)


def test_save_hf_round_trip_with_mtp(pair, tmp_path):
    name, hf, ours, path = pair
    # give the loaded model MTP modules by loading the same checkpoint with an MTP-bearing export
    d = json.loads((path / "config.json").read_text())
    assert ours.cfg.n_layers == d["num_hidden_layers"]
    from dataclasses import replace

    from deepwish.model.transformer import Transformer
    with_mtp = Transformer(replace(ours.cfg, n_mtp=1))
    missing, unexpected = with_mtp.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("mtp.") for k in missing)
    out = save_hf(with_mtp.eval(), tmp_path / "export")
    L = d["num_hidden_layers"]
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
              "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
              "mlp.gate.e_score_correction_bias", "input_layernorm.weight"):
        assert f"model.layers.{L}.{k}" in keys, k
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        assert rel_err(hf(x).logits, back(x).logits) <= 1e-5
    again = load_hf(out)
    assert again.cfg.n_mtp == 1
    with torch.no_grad():
        assert torch.equal(again(x).logits, with_mtp(x).logits)
        for (ka, a), (kb, b) in zip(again.state_dict().items(), with_mtp.state_dict().items()):
            assert ka == kb and torch.equal(a, b), ka


# ---- FP8 block-scaled checkpoints -----------------------------------------------------------
def quantize_fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Test helper: per-128x128-block absmax scaling to float8_e4m3fn, as DeepSeek stores weights."""
    O, I = w.shape
    gb = (-(-O // block), -(-I // block))
    pad = torch.zeros(gb[0] * block, gb[1] * block)
    pad[:O, :I] = w
    blocks = pad.view(gb[0], block, gb[1], block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0  # e4m3 max
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view_as(pad)[:O, :I].contiguous()
    return q, scale.float()


def test_dequantize_fp8_blocks_against_loop():
    from deepwish.hf.deepseek import dequantize_fp8_blocks
    w = torch.randn(300, 260)
    q, s = quantize_fp8_blocks(w)
    out = dequantize_fp8_blocks(q, s)
    ref = torch.empty(300, 260)
    for i in range(3):
        for j in range(3):
            ref[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = \
                q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float() * s[i, j]
    assert torch.equal(out, ref)
    assert rel_err(w, out) < 0.05  # e4m3 keeps ~3 mantissa bits
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_fp8_blocks(q, s[:2])


def test_fp8_checkpoint_loads_dequantised(tmp_path):
    from safetensors.torch import load_file, save_file
    (cfg_cls, model_cls), kw = CASES["v3_qlora_g2k1"]
    cfg = cfg_cls(**{**BASE, **kw, "hidden_size": 160, "moe_intermediate_size": 136})  # > one 128 block
    hf = random_hf_model(model_cls, cfg)
    hf.save_pretrained(tmp_path / "bf")
    sd = load_file(tmp_path / "bf" / "model.safetensors")
    deq = dict(sd)
    fp8 = dict(sd)
    n = 0
    for k, t in sd.items():
        if t.dim() == 2 and ("self_attn" in k or "mlp." in k) and "gate.weight" not in k:
            q, s = quantize_fp8_blocks(t)
            fp8[k], fp8[k + "_scale_inv"] = q, s
            deq[k] = q.float() * s.repeat_interleave(128, 0)[:t.shape[0]].repeat_interleave(128, 1)[:, :t.shape[1]]
            n += 1
    assert n > 20
    for name, tensors in (("fp8", fp8), ("deq", deq)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / name / "config.json").write_text((tmp_path / "bf" / "config.json").read_text())
    a = load_hf(tmp_path / "fp8", dtype=torch.float32)
    b = load_hf(tmp_path / "deq", dtype=torch.float32)
    for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(ta, tb), ka
    w = a.blocks[1].ffn.w_gate_up[3, :136]  # expert 3's gate: 136 x 160 spans 2 x 2 blocks
    assert rel_err(sd["model.layers.1.mlp.experts.3.gate_proj.weight"], w) < 0.05  # fp8 rounding only


# ---- released configs ----------------------------------------------------------------------
DEEPSEEK_V3_CONFIG = {  # deepseek-ai/DeepSeek-V3 config.json (fields that shape the model)
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "v_head_dim": 128, "vocab_size": 129280,
}


@pytest.mark.parametrize("arch,preset", [("DeepseekV3ForCausalLM", "deepseek_v3_671b"),
                                         ("DeepseekV32ForCausalLM", "deepseek_v32_671b")])
def test_released_config_matches_preset(arch, preset):
    from dataclasses import replace

    from deepwish.config import load_config
    from deepwish.hf.deepseek import config_from_hf
    d = dict(DEEPSEEK_V3_CONFIG, architectures=[arch])
    if arch == "DeepseekV32ForCausalLM":
        d.update(model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048)
    ours = config_from_hf(d)
    want = load_config(preset).model
    # training-only knobs a checkpoint does not carry
    assert replace(want, bias_update_rate=0.0, seq_aux_loss_coef=0.0) == ours
    bad = dict(d, quantization_config={"quant_method": "fp8", "weight_block_size": [64, 64]})
    with pytest.raises(ValueError, match="weight blocks"):
        config_from_hf(bad)
