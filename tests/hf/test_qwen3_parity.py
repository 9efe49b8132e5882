"""Qwen3 / Qwen3-MoE parity with HF transformers on random tiny models (CPU, fp32).

For each config: logits at every position, prefill + one-token decode against the full
forward, 32 greedy tokens against HF `generate`, and save_hf -> HF from_pretrained.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from deepwish import load_hf, save_hf
from deepwish.generate import decode_one_token, generate, prefill
from tests.hf.hf_utils import hf_greedy, random_hf_model, rel_err

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=256,
            rms_norm_eps=1e-6)

CASES = {
    "gqa1_untied": (Qwen3Config, Qwen3ForCausalLM, dict(num_attention_heads=4, num_key_value_heads=4, head_dim=12)),
    "gqa2_tied": (Qwen3Config, Qwen3ForCausalLM,
                  dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=True)),
    "gqa4_headdim": (Qwen3Config, Qwen3ForCausalLM,  # head_dim != hidden/heads
                     dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16)),
    "yarn": (Qwen3Config, Qwen3ForCausalLM,
             dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                   "rope_theta": 10000.0})),
    "moe_top1": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                 dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=4,
                      num_experts_per_tok=1, moe_intermediate_size=24, norm_topk_prob=False)),
    "moe_top2_norm": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                      dict(num_attention_heads=4, num_key_value_heads=1, head_dim=12, num_experts=6,
                           num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
                           tie_word_embeddings=True)),
    "moe_top4_sparse_step": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                             dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=8,
                                  num_experts_per_tok=4, moe_intermediate_size=16, norm_topk_prob=True,
                                  num_hidden_layers=3, decoder_sparse_step=1, mlp_only_layers=[1])),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    cfg_cls, model_cls, kw = CASES[request.param]
    cfg = cfg_cls(**{**BASE, **kw})
    hf = random_hf_model(model_cls, cfg)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = load_hf(path, dtype=torch.float32)
    return request.param, hf, ours, path


def test_logits_every_position(pair):
    _, hf, ours, _ = pair
    x = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        ref = hf(x).logits
        out = ours(x).logits
    assert out.shape == ref.shape
    assert rel_err(ref, out) <= 1e-4


def test_prefill_then_decode_matches_forward(pair):
    _, _, ours, _ = pair
    x = torch.randint(0, 97, (2, 24))
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
    prompt = torch.randint(0, 97, (1, 7))
    ref = hf_greedy(hf, prompt, 32)
    got = generate(ours, prompt, 32)[0]
    assert got == ref


def test_save_hf_round_trip(pair, tmp_path):
    name, hf, ours, _ = pair
    out = save_hf(ours, tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert rel_err(hf(x).logits, back(x).logits) <= 1e-5
    again = load_hf(out)
    with torch.no_grad():
        assert torch.equal(again(x).logits, ours(x).logits)
