"""Qwen3-Next parity with HF transformers (`Qwen3NextForCausalLM`, torch path) on random tiny models
(CPU, fp32).

For each config: logits at every position (sequences longer than one 64-token chunk), prefill +
one-token decode against HF's full forward, 32 greedy tokens against HF `generate`, and
save_hf -> HF from_pretrained. Configs cover both hybrid intervals, HV = 2H and HV = H, MoE with
the gated shared expert (with a dense `mlp_only_layers` layer), and a dense model.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM

from deepwish import load_hf, save_hf
from deepwish.generate import decode_one_token, generate, prefill
from deepwish.hf.qwen3_next import ba_from_hf, ba_to_hf, config_from_hf, qkvz_from_hf, qkvz_to_hf
from tests.hf.hf_utils import hf_greedy, random_hf_model, rel_err

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, max_position_embeddings=256,
            rms_norm_eps=1e-6, num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})

CASES = {
    # GDN, attn, GDN, attn; value heads = 2 x key heads; every layer MoE + gated shared expert
    "moe_interval2_gva": dict(full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4,
                              linear_key_head_dim=8, linear_value_head_dim=12, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=16, shared_expert_intermediate_size=24, norm_topk_prob=True),
    # GDN x3, attn; value heads = key heads; layer 0 dense; top-1 unnormalised; tied embeddings
    "moe_interval4_equal_heads": dict(full_attention_interval=4, linear_num_key_heads=2, linear_num_value_heads=2,
                                      linear_key_head_dim=12, linear_value_head_dim=8, num_experts=4,
                                      num_experts_per_tok=1, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=16, norm_topk_prob=False,
                                      mlp_only_layers=[0], tie_word_embeddings=True),
    # dense FFNs everywhere, 4 value heads per key head
    "dense_interval2": dict(full_attention_interval=2, linear_num_key_heads=1, linear_num_value_heads=4,
                            linear_key_head_dim=8, linear_value_head_dim=8, num_experts=0),
}


def random_qwen3_next(cfg: Qwen3NextConfig) -> Qwen3NextForCausalLM:
    hf = random_hf_model(Qwen3NextForCausalLM, cfg)
    with torch.no_grad():  # decay rates A = exp(A_log) in HF's own init range, not around 1
        for name, p in hf.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(1.0, 16.0).log())
    return hf


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    cfg = Qwen3NextConfig(**{**BASE, **CASES[request.param]})
    hf = random_qwen3_next(cfg)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = load_hf(path, dtype=torch.float32)
    return request.param, hf, ours, path


def test_config_round_trip(pair):
    name, hf, ours, _ = pair
    c = ours.cfg
    want = ["full_attention" if m == "gated_gqa" else "linear_attention" for m, _ in c.layer_types]
    assert want == list(hf.config.layer_types)
    assert c.norm_zero_centered and c.rope_partial == 0.25 and c.rope_dim == 4
    assert (c.n_experts > 0) == (name != "dense_interval2")
    ffn = ["dense" if (c.n_experts == 0 or i in c.dense_layers) else "moe" for i in range(c.n_layers)]
    assert [f for _, f in c.layer_types] == ffn


def test_logits_every_position(pair):
    _, hf, ours, _ = pair
    x = torch.randint(0, VOCAB, (2, 80))  # > one 64-token chunk
    with torch.no_grad():
        ref = hf(x).logits
        out = ours(x).logits
    assert out.shape == ref.shape
    assert rel_err(ref, out) <= 1e-4


def test_prefill_then_decode_matches_hf(pair):
    _, hf, ours, _ = pair
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ref = hf(x).logits
    cache = ours.make_cache(2, 32)
    k = 9
    steps = [prefill(ours, x[:, :k], cache)]
    for t in range(k, x.shape[1]):
        steps.append(decode_one_token(ours, x[:, t], torch.full((2,), t), cache))
    got = torch.stack(steps, 1)  # logits at positions k-1 .. T-1
    assert rel_err(ref[:, k - 1:], got) <= 1e-4


def test_greedy_32_tokens_equal_hf(pair):
    _, hf, ours, _ = pair
    prompt = torch.randint(1, VOCAB, (1, 7))  # token 0 is hf_greedy's pad id: HF would mask it out
    ref = hf_greedy(hf, prompt, 32)
    got = generate(ours, prompt, 32)[0]
    assert got == ref


def test_batched_prompts_of_different_lengths_equal_hf(pair):
    """A 1-token prompt (prefilled by the decode step) beside a 6-token one: rows carry their own
    positions and recurrent states, so each equals HF run alone."""
    _, hf, ours, _ = pair
    prompts = [torch.randint(1, VOCAB, (1,)).tolist(), torch.randint(1, VOCAB, (6,)).tolist()]
    got = generate(ours, prompts, 8)
    for p, g in zip(prompts, got):
        assert g == hf_greedy(hf, torch.tensor([p]), 8)


def test_save_hf_round_trip(pair, tmp_path):
    _, hf, ours, _ = pair
    out = save_hf(ours, tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back) is Qwen3NextForCausalLM
    x = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert rel_err(hf(x).logits, back(x).logits) <= 1e-5
    hf_sd, back_sd = hf.state_dict(), back.state_dict()
    assert set(hf_sd) == set(back_sd)
    for k, v in hf_sd.items():
        assert torch.equal(v, back_sd[k]), k
    again = load_hf(out)
    with torch.no_grad():
        assert torch.equal(again(x).logits, ours(x).logits)


def test_projection_deinterleave_matches_hf_split():
    """Our [q | k | v | z] / [b | a] rows equal what HF's fix_query_key_value_ordering extracts,
    and re-interleaving restores the checkpoint layout exactly."""
    cfg = Qwen3NextConfig(**{**BASE, **CASES["moe_interval2_gva"]})
    hf = random_qwen3_next(cfg).model.layers[0].linear_attn
    H, HV, K, V = 2, 4, 8, 12
    x = torch.randn(3, 5, 32)
    q, k, v, z, b, a = hf.fix_query_key_value_ordering(hf.in_proj_qkvz(x), hf.in_proj_ba(x))
    w = qkvz_from_hf(hf.in_proj_qkvz.weight, H, K, HV, V)
    oq, ok, ov, oz = (x @ w.t()).split([H * K, H * K, HV * V, HV * V], -1)
    assert torch.allclose(oq, q.reshape(3, 5, -1), atol=1e-6) and torch.allclose(ok, k.reshape(3, 5, -1), atol=1e-6)
    assert torch.allclose(ov, v.reshape(3, 5, -1), atol=1e-6) and torch.allclose(oz, z.reshape(3, 5, -1), atol=1e-6)
    wba = ba_from_hf(hf.in_proj_ba.weight, H, HV)
    ob, oa = (x @ wba.t()).chunk(2, -1)
    assert torch.allclose(ob, b, atol=1e-6) and torch.allclose(oa, a, atol=1e-6)
    assert torch.equal(qkvz_to_hf(w, H, K, HV, V), hf.in_proj_qkvz.weight)
    assert torch.equal(ba_to_hf(wba, H, HV), hf.in_proj_ba.weight)


def test_real_80b_config_maps_to_preset():
    """The released Qwen3-Next-80B-A3B config.json fields give exactly our preset."""
    from deepwish import model_config
    d = {"architectures": ["Qwen3NextForCausalLM"], "decoder_sparse_step": 1, "full_attention_interval": 4,
         "head_dim": 256, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
         "intermediate_size": 5120, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
         "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_value_head_dim": 128,
         "max_position_embeddings": 262144, "mlp_only_layers": [], "model_type": "qwen3_next",
         "moe_intermediate_size": 512, "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 512,
         "num_experts_per_tok": 10, "num_hidden_layers": 48, "num_key_value_heads": 2,
         "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06, "rope_theta": 10000000,
         "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 512, "tie_word_embeddings": False,
         "vocab_size": 151936}
    assert config_from_hf(d) == model_config("qwen3_next_80b_a3b")

