"""The fast decode path keeps the eager path's tokens (run on the device machine: pytest -m gpu).

- CapturedSampler (step + sampling in one CUDA graph) gives the eager `generate`'s greedy tokens
  exactly (same kernels), and its sampled tokens for the same seed (the generator is registered
  with the graph);
- compiled + captured, and the fused q/k/v matmul against three matmuls, compute in another order
  (inductor's fusions, another GEMV shape): greedy tokens must agree until the first step where the
  eager logits' top two are a near-tie, and that step must be one (random-init models have many).
"""
import dataclasses

import pytest
import torch

from deepwish.config import model_config
from deepwish.decode_graph import CapturedSampler
from deepwish.generate import SamplingConfig, decode_one_token, generate, prefill
from deepwish.model.transformer import Transformer

pytestmark = pytest.mark.gpu

NEAR_TIE = 0.05  # logits (bf16 keeps ~3 significant digits of values of order 1-10)


def _model(preset, device, fuse=True, **kw):
    torch.manual_seed(0)
    cfg = model_config(preset)
    cfg = dataclasses.replace(cfg, fuse_projections=fuse, max_seq_len=min(cfg.max_seq_len, 4096), **kw)
    with torch.device(device):
        m = Transformer(cfg)
    return m.to(torch.bfloat16).eval()


def _eager_greedy_with_gaps(model, prompt, n):
    """Eager greedy tokens [B, n] and the top-1 minus top-2 logit gap at each step [B, n]."""
    B, T = prompt.shape
    cache = model.make_cache(B, T + n)
    logits = prefill(model, prompt, cache)
    toks, gaps = [], []
    for s in range(n):
        top = logits.topk(2, dim=-1).values
        gaps.append(top[:, 0] - top[:, 1])
        toks.append(logits.argmax(-1))
        if s < n - 1:
            logits = decode_one_token(model, toks[-1], torch.full((B,), T + s, device=prompt.device), cache)
    return torch.stack(toks, 1).tolist(), torch.stack(gaps, 1).tolist()


def _agree_until_near_tie(ref, gaps, got):
    for row, (r, g, o) in enumerate(zip(ref, gaps, got)):
        for i, (a, b) in enumerate(zip(r, o)):
            if a != b:
                assert g[i] < NEAR_TIE, f"row {row} step {i}: {b} instead of {a} with a top-2 gap of {g[i]:.3f}"
                break


def _fast_path_follows_eager(plain, fast, batch):
    """`fast` (the same weights as `plain`, another kernel path) generates greedy tokens that follow
    plain's eager ones until a near-tie: eager, captured, and at batch 1 compiled + captured."""
    fast.load_state_dict(plain.state_dict())
    prompt = torch.randint(0, plain.cfg.vocab_size, (batch, 12), device=next(plain.parameters()).device)
    ref, gaps = _eager_greedy_with_gaps(plain, prompt, 24)
    _agree_until_near_tie(ref, gaps, generate(fast, prompt, 24))
    for compile in ([False, True] if batch == 1 else [False]):
        torch._dynamo.reset()
        cache = fast.make_cache(batch, 12 + 24)
        got = generate(fast, prompt, 24, cache=cache, decode_fn=CapturedSampler(fast, cache, compile=compile))
        _agree_until_near_tie(ref, gaps, got)


@pytest.mark.parametrize("preset", ["qwen3_tiny", "qwen3_0.6b"])
@pytest.mark.parametrize("batch", [1, 64])
def test_captured_sampler_greedy_is_eager(cuda, preset, batch):
    model = _model(preset, cuda)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, 12), device=cuda)
    ref = generate(model, prompt, 24)
    cache = model.make_cache(batch, 12 + 24)
    got = generate(model, prompt, 24, cache=cache, decode_fn=CapturedSampler(model, cache))
    assert got == ref


@pytest.mark.parametrize("sampling", [SamplingConfig(0.8), SamplingConfig(0.8, top_k=50, top_p=0.9)])
def test_captured_sampler_draws_the_eager_stream(cuda, sampling):
    model = _model("qwen3_tiny", cuda)
    prompt = torch.randint(0, model.cfg.vocab_size, (4, 8), device=cuda)
    kw = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    ref = generate(model, prompt, 20, seed=7, **kw)
    cache = model.make_cache(4, 8 + 20)
    sampler = CapturedSampler(model, cache, sampling)
    assert generate(model, prompt, 20, seed=7, cache=cache, decode_fn=sampler, **kw) == ref
    assert generate(model, prompt, 20, seed=8, cache=cache, decode_fn=sampler, **kw) != ref


@pytest.mark.parametrize("batch", [1, 64])
def test_compiled_sampler_greedy_follows_eager(cuda, batch):
    torch._dynamo.reset()
    model = _model("qwen3_0.6b", cuda)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, 12), device=cuda)
    ref, gaps = _eager_greedy_with_gaps(model, prompt, 24)
    cache = model.make_cache(batch, 12 + 24)
    got = generate(model, prompt, 24, cache=cache, decode_fn=CapturedSampler(model, cache, compile=True))
    _agree_until_near_tie(ref, gaps, got)


def test_fused_projection_greedy_follows_three_matmuls(cuda):
    fused = _model("qwen3_0.6b", cuda, fuse=True)
    plain = _model("qwen3_0.6b", cuda, fuse=False)
    plain.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert fused.blocks[0].mixer._fused_qkv() is not None and plain.blocks[0].mixer._fused_qkv() is None
    prompt = torch.randint(0, fused.cfg.vocab_size, (8, 12), device=cuda)
    ref, gaps = _eager_greedy_with_gaps(plain, prompt, 24)
    _agree_until_near_tie(ref, gaps, generate(fused, prompt, 24))


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("NK", [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (37, 45)])
def test_gemv_kernel_matches_reference(cuda, rel_err, M, NK):
    from deepwish.kernels.gemv import reference
    from deepwish.kernels.gemv.triton import gemv
    N, K = NK
    x = torch.randn(M, K, device=cuda, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=cuda, dtype=torch.bfloat16) * 0.02
    b = torch.randn(N, device=cuda, dtype=torch.bfloat16)
    for bias in (None, b):
        assert rel_err(reference.gemv(x, w, bias), gemv(x, w, bias)) < 5e-3


@pytest.mark.parametrize("batch", [1, 8])
def test_gemv_decode_greedy_follows_cublas(cuda, batch):
    """model.decode_matmul=triton, captured (and at batch 1 compiled): greedy tokens as cuBLAS's
    eager path until a near-tie."""
    plain = _model("qwen3_0.6b", cuda)
    fast = _model("qwen3_0.6b", cuda, decode_matmul="triton")
    _fast_path_follows_eager(plain, fast, batch)


def test_decode_prologue_kernel_matches_reference_at_the_models_shape(cuda, rel_err):
    """Qwen3-0.6B's heads (16 query / 8 KV of 128, whole rotary), bf16, batch 4, a 3-token chunk."""
    from deepwish.kernels.attention import reference
    from deepwish.kernels.attention.decode import decode_prologue
    B, T, H, Hkv, D, L = 4, 3, 16, 8, 128, 64
    y = torch.randn(B, T, (H + 2 * Hkv) * D, device=cuda, dtype=torch.bfloat16)
    wq, wk = (1 + 0.1 * torch.randn(2, D, device=cuda)).to(torch.bfloat16)
    angle = torch.rand(B, T, D // 2, device=cuda) * 6
    pos = torch.arange(T, device=cuda) + torch.tensor([0, 7, 30, 60], device=cuda)[:B, None].clamp(max=L - T)
    caches = [(torch.zeros(B, Hkv, L, D, device=cuda, dtype=torch.bfloat16),
               torch.zeros(B, Hkv, L, D, device=cuda, dtype=torch.bfloat16)) for _ in range(2)]
    q_ref = reference.decode_prologue(y, wq, wk, 1e-6, angle.cos(), angle.sin(), pos, *caches[0], H)
    q = decode_prologue(y, wq, wk, 1e-6, angle.cos(), angle.sin(), pos, *caches[1], H)
    assert rel_err(q_ref, q) < 1e-2
    for a, b in zip(caches[0], caches[1]):
        assert rel_err(a, b) < 1e-2


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_prologue_greedy_follows_the_separate_ops(cuda, batch):
    """model.decode_prologue against the separate norm / rotary / cache-write ops: eager, captured
    and (batch 1) compiled + captured, greedy until a near-tie."""
    plain = _model("qwen3_0.6b", cuda, decode_prologue=False, decode_fusion=False, decode_pdl="off")
    fast = _model("qwen3_0.6b", cuda, decode_prologue=True, decode_fusion=False, decode_pdl="off")
    _fast_path_follows_eager(plain, fast, batch)


@pytest.mark.parametrize("M", [1, 3, 64])
@pytest.mark.parametrize("pdl", [False, True])
def test_fused_gemv_kernels_match_reference_at_the_models_shapes(cuda, rel_err, M, pdl):
    """Qwen3-0.6B's four decode GEMVs with what model.decode_fusion puts in them: the pre-norm in q/k/v
    and gate/up, SwiGLU's activation in gate/up, the residual add in o and down; with and without
    PDL; one row, a few, and 64 (the rows kernel's largest tile)."""
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper or later")
    from deepwish.kernels.gemv import reference
    from deepwish.kernels.gemv.triton import gemv
    d, ff = 1024, 3072
    bf = dict(device=cuda, dtype=torch.bfloat16)
    x = torch.randn(M, d, **bf)
    nw = 1 + 0.1 * torch.randn(d, **bf)
    cases = [(x, torch.randn(4096, d, **bf) * 0.02, dict(norm=(nw, 1e-6, False))),
             (torch.randn(M, 2048, **bf), torch.randn(d, 2048, **bf) * 0.02, dict(residual=x)),
             (x, torch.randn(2 * ff, d, **bf) * 0.02, dict(norm=(nw - 1, 1e-6, True), glu=True)),
             (torch.randn(M, ff, **bf), torch.randn(d, ff, **bf) * 0.02, dict(residual=x))]
    for inp, w, kw in cases:
        assert rel_err(reference.gemv(inp, w, **kw), gemv(inp, w, pdl=pdl, **kw)) < 5e-3, kw.keys()


def test_pdl_step_captures_and_replays_the_eager_logits(cuda):
    """decode_pdl inside a CUDA graph (programmatic edges): the captured step of a model with every
    decode option on gives the eager step's logits, replay after replay."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper or later")
    from deepwish.decode_graph import CapturedDecoder
    model = _model("qwen3_0.6b", cuda, decode_matmul="triton", decode_prologue=True, decode_fusion=True,
                   decode_pdl="on")
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 12), device=cuda)
    caches = [model.make_cache(1, 40) for _ in range(2)]
    step = CapturedDecoder(model, caches[1])  # before the prefill: capture leaves the cache zeroed
    logits = [prefill(model, prompt, c) for c in caches]
    tok = logits[0].argmax(-1)
    for s in range(12):
        pos = torch.full((1,), 12 + s, device=cuda)
        want = decode_one_token(model, tok, pos, caches[0])
        got = step(model, tok, pos, caches[1])
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)
        tok = want.argmax(-1)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("pdl", [False, True])
def test_decode_fusion_greedy_follows_the_separate_ops(cuda, batch, pdl):
    """model.decode_fusion (and decode_pdl) against the GEMV path without them: eager, captured and
    (batch 1) compiled + captured, greedy until a near-tie."""
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper or later")
    plain = _model("qwen3_0.6b", cuda, decode_matmul="triton", decode_prologue=True, decode_fusion=False,
                   decode_pdl="off")
    fast = _model("qwen3_0.6b", cuda, decode_matmul="triton", decode_prologue=True, decode_fusion=True,
                  decode_pdl="on" if pdl else "off")
    _fast_path_follows_eager(plain, fast, batch)


@pytest.mark.parametrize("B,L", [(1, 8192), (64, 576)])
def test_split_decode_at_qwen3_heads_with_pdl_and_the_planned_split(cuda, rel_err, B, L):
    """decode_attention at Qwen3-0.6B's heads: the merge kernel's answer at many splits (batch 1, 8k)
    and at batch 64 cut into 4 splits the same call after call and with PDL; batch 64's planned
    single split, stored directly, as near the exact answer as the cut form."""
    from deepwish.kernels.attention.decode import decode_attention
    bf = dict(device=cuda, dtype=torch.bfloat16)
    q = torch.randn(B, 1, 16, 128, **bf)
    k, v = torch.randn(B, 8, L, 128, **bf), torch.randn(B, 8, L, 128, **bf)
    pos = torch.randint(L // 2, L, (B, 1), device=cuda)
    splits = None if B == 1 else 4  # batch 64 plans one split (stored directly, no merge): cut it here
    want = decode_attention(q, k, v, pos, splits=splits)
    for pdl in (False, True, True):
        got = decode_attention(q, k, v, pos, splits=splits, pdl=pdl)
        assert rel_err(want, got) < 1e-3
    # and the planned step itself (batch 64: one split, its output stored as it is). Against the fp32
    # reference, not the cut form: each chunk rounds its softmax weights to bf16 against its own
    # running max for P·V, so different cuts differ by about bf16's rounding (measured 1.7e-3 between
    # them on an H200); the single split must be as near the exact answer as the cut form is.
    from deepwish.kernels.attention import reference
    exact = reference.decode_attention(q.float(), k.float(), v.float(), pos,
                                       torch.arange(L, device=cuda).expand(B, L))
    assert rel_err(exact, want) < 4e-3
    planned = decode_attention(q, k, v, pos, pdl=True)
    assert rel_err(exact, planned) < 4e-3 and rel_err(exact, planned) < 1.5 * rel_err(exact, want) + 1e-4


@pytest.mark.parametrize("TQ", [1, 5])
def test_split_prefetch_changes_no_value(cuda, monkeypatch, TQ):
    """The split kernel's L2 prefetch before its PDL wait (PREFETCH_UNDER_PDL): the same output bit
    for bit as without it, for one token and a 5-token verification chunk at 8k, with the new
    tokens' slots written just before (under PDL by the prologue kernel in the model's step:
    test_pdl_step_captures_and_replays_the_eager_logits). The 8k cache (33.6 MB) is past the
    prefetch's bound, lifted here: the kernel's values are what is tested."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper or later")
    from deepwish.kernels.attention import decode
    monkeypatch.setattr(decode, "PREFETCH_MAX_BYTES", 1 << 40)
    bf = dict(device=cuda, dtype=torch.bfloat16)
    L = 8192
    q = torch.randn(1, TQ, 16, 128, **bf)
    k, v = torch.randn(1, 8, L, 128, **bf), torch.randn(1, 8, L, 128, **bf)
    pos = (L - 64 + torch.arange(TQ, device=cuda))[None]
    new_k, new_v = torch.randn(1, 8, TQ, 128, **bf), torch.randn(1, 8, TQ, 128, **bf)
    out = {}
    for prefetch in (False, True):
        monkeypatch.setattr(decode, "PREFETCH_UNDER_PDL", prefetch)
        kc, vc = k.clone(), v.clone()
        kc[:, :, L - 64:L - 64 + TQ] = new_k
        vc[:, :, L - 64:L - 64 + TQ] = new_v
        out[prefetch] = decode.decode_attention(q, kc, vc, pos, pdl=True)
    assert torch.equal(out[True], out[False])
