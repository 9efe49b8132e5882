"""MLA: the weight-absorbed latent-cache path against the naive path, cache contents and size,
packed documents, the YaRN softmax scale, gradients, and config errors."""
import math

import pytest
import torch

from deepwish.config import load_config
from deepwish.model.cache import MLACache
from deepwish.model.mla import MLA, mla_softmax_scale
from deepwish.model.transformer import Transformer


def tiny(*extra):
    return load_config("deepseek_v3_tiny", ["model.n_layers=2", "model.n_mtp=0", *extra]).model


def randomise(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)


@pytest.mark.parametrize("q_lora", [64, 0])
@pytest.mark.parametrize("interleave", [True, False])
def test_absorbed_equals_naive(q_lora, interleave, rel_err):
    cfg = tiny(f"model.q_lora_rank={q_lora}", f"model.rope_interleave={interleave}")
    model = Transformer(cfg).eval()
    randomise(model)
    mla = model.blocks[0].mixer
    B, T = 2, 29  # odd length
    x = torch.randn(B, T, cfg.d_model)
    ctx = model.context(torch.zeros(B, T, dtype=torch.long), None, None)
    with torch.no_grad():
        naive = mla(x, ctx, None)[0]
        cache = mla.make_cache(B, 40, torch.float32, "cpu")
        absorbed = mla(x, ctx, cache)[0]
    assert rel_err(naive, absorbed) < 1e-5


def test_cache_holds_only_latent_and_rope_key():
    cfg = tiny()
    model = Transformer(cfg).eval()
    cache = model.make_cache(3, 50)
    assert all(isinstance(c, MLACache) for c in cache.layers)
    per_token_per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cache.nbytes() == 3 * 50 * cfg.n_layers * per_token_per_layer * 4
    x = torch.randint(0, cfg.vocab_size, (3, 10))
    with torch.no_grad():
        model(x, cache=cache).logits
    c = cache[0]
    assert c.c_kv.shape == (3, 50, cfg.kv_lora_rank) and c.k_pe.shape == (3, 50, cfg.qk_rope_head_dim)
    assert c.c_kv[:, :10].abs().sum() > 0 and c.c_kv[:, 10:].abs().sum() == 0


def test_v3_sizes_cache_576_numbers_per_token():
    cfg = load_config("deepseek_v3_671b").model
    assert cfg.kv_lora_rank + cfg.qk_rope_head_dim == 576


def test_packed_documents_equal_separate_runs(rel_err):
    cfg = tiny()
    model = Transformer(cfg).eval()
    randomise(model)
    a = torch.randint(0, cfg.vocab_size, (1, 13))
    b = torch.randint(0, cfg.vocab_size, (1, 18))
    packed = torch.cat([a, b], 1)
    doc = torch.cat([torch.zeros(1, 13), torch.ones(1, 18)], 1).long()
    pos = torch.cat([torch.arange(13), torch.arange(18)])[None]
    with torch.no_grad():
        out = model(packed, positions=pos, doc_ids=doc).logits
        assert rel_err(model(a).logits, out[:, :13]) < 1e-5
        assert rel_err(model(b).logits, out[:, 13:]) < 1e-5


def test_yarn_softmax_scale_uses_mscale_all_dim_squared():
    cfg = tiny("model.rope_type=yarn", "model.rope_factor=40", "model.rope_original_max_len=64",
               "model.yarn_mscale=1.0", "model.yarn_mscale_all_dim=0.707")
    m = 0.1 * 0.707 * math.log(40) + 1.0
    assert mla_softmax_scale(cfg) == pytest.approx((32 + 16) ** -0.5 * m * m)
    assert mla_softmax_scale(tiny()) == pytest.approx(48 ** -0.5)


def test_gradients_flow_to_every_parameter():
    cfg = tiny()
    mla = MLA(cfg, 0)
    model = Transformer(cfg)
    x = torch.randn(2, 11, cfg.d_model, requires_grad=True)
    ctx = model.context(torch.zeros(2, 11, dtype=torch.long), None, None)
    mla(x, ctx)[0].square().sum().backward()
    for n, p in mla.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert x.grad.abs().sum() > 0


def test_torch_and_sdpa_backends_agree(rel_err):
    cfg = tiny()
    m1 = Transformer(cfg).eval()
    randomise(m1)
    m2 = Transformer(tiny("model.attn_backend=torch")).eval()
    m2.load_state_dict(m1.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        assert rel_err(m1(x).logits, m2(x).logits) < 1e-5


def test_bad_config_names_the_problem():
    with pytest.raises(ValueError, match="kv_lora_rank"):
        MLA(tiny("model.kv_lora_rank=0"), 0)
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        MLA(tiny("model.qk_rope_head_dim=15"), 0)


def test_cache_bytes_bench_measures_v3():
    from deepwish.bench.cache_bytes import cache_bytes_per_token
    assert cache_bytes_per_token(load_config("deepseek_v3_671b").model) == 61 * 576 * 2
    assert cache_bytes_per_token(load_config("qwen3_0.6b").model) == 28 * 2 * 8 * 128 * 2


@pytest.mark.gpu
def test_absorbed_equals_naive_bf16_on_gpu(cuda, rel_err):
    cfg = load_config("deepseek_v3_bench", ["model.n_layers=1"]).model
    mla = MLA(cfg, 0).to(cuda, torch.bfloat16)
    from deepwish.model.rope import Rotary
    rot = Rotary(cfg, cfg.qk_rope_head_dim).to(cuda)
    B, T = 2, 1024
    x = torch.randn(B, T, cfg.d_model, device=cuda, dtype=torch.bfloat16)
    pos = torch.arange(T, device=cuda).expand(B, T)
    cos, sin = rot(pos)
    from deepwish.model.transformer import ForwardContext
    ctx = ForwardContext(positions=pos, cos=cos, sin=sin)
    with torch.no_grad():
        naive = mla(x, ctx)[0]
        cache = mla.make_cache(B, T, torch.bfloat16, cuda)
        absorbed = mla(x, ctx, cache)[0]
    assert rel_err(naive.float(), absorbed.float()) < 2e-2


def test_long_cached_prefill_runs_in_query_chunks(monkeypatch, rel_err):
    import deepwish.model.mla as mla_mod
    monkeypatch.setattr(mla_mod, "ABSORBED_Q_CHUNK", 7)
    cfg = tiny()
    model = Transformer(cfg).eval()
    randomise(model)
    x = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(x).logits
        cached = model(x, cache=model.make_cache(2, 32)).logits
    assert rel_err(full, cached) < 1e-5
