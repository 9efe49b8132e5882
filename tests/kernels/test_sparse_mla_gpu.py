"""Sparse MLA (Triton) on the GPU at real sizes — H 64 and 128, Dqk 576 = 512 + 64, top-k 2048,
bf16 — against the fp32 gather reference on a slice of queries: o, lse, dq, dkv (through o and
lse), both backward forms, the split-K decode path and its CUDA-graph replay (run with -m gpu)."""
import pytest
import torch

from deepwish.bench.sparse_mla import causal_indices
from deepwish.kernels.sparse_mla import reference as ref
from deepwish.kernels.sparse_mla import sparse_mla
from deepwish.kernels.sparse_mla import triton as tk

pytestmark = pytest.mark.gpu

D, DV, K = 576, 512, 2048
SCALE = D ** -0.5


def _inputs(B, T, S, H, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)
    kv = torch.randn(B, S, D, device=device, dtype=dtype, generator=g)
    idx = torch.cat([causal_indices(1, T, S, K, device, seed + b) for b in range(B)])
    return q, kv, idx


@pytest.mark.parametrize("B,T,S,H,dtype,form,tol", [
    (1, 256, 8192, 64, torch.bfloat16, "split", 2e-2),
    (1, 256, 8192, 64, torch.bfloat16, "fused", 2e-2),
    (2, 96, 2100, 128, torch.bfloat16, "split", 2e-2),   # two head tiles; the first 44 queries see < K keys
    (1, 64, 4096, 64, torch.float16, "split", 5e-3),
    (1, 32, 4096, 16, torch.float32, "split", 1e-4),
])
def test_sparse_mla_real_sizes(cuda, rel_err, monkeypatch, B, T, S, H, dtype, form, tol):
    monkeypatch.setattr(tk, "BACKWARD", form)
    q, kv, idx = _inputs(B, T, S, H, dtype, cuda)
    idx[0, T // 2] = -1  # one query selects nothing
    q.requires_grad_()
    kv.requires_grad_()
    qf = q.detach().float().requires_grad_()
    kvf = kv.detach().float().requires_grad_()
    wo, wl = ref.sparse_mla(qf, kvf, idx, dv=DV, scale=SCALE)
    go, gl = sparse_mla(q, kv, idx, dv=DV, scale=SCALE, backend="triton")
    live = torch.isfinite(wl)
    assert torch.equal(live, torch.isfinite(gl))
    do = torch.randn(B, T, H, DV, device=cuda)
    dl = torch.randn(B, T, H, device=cuda)
    wg = torch.autograd.grad((wo * do).sum() + (wl.where(live, 0.0) * dl).sum(), (qf, kvf))
    gg = torch.autograd.grad((go.float() * do).sum() + (gl.where(live, 0.0) * dl).sum(), (q, kv))
    errs = dict(o=rel_err(wo, go), lse=rel_err(wl[live], gl[live]), dq=rel_err(wg[0], gg[0]),
                dkv=rel_err(wg[1], gg[1]))
    assert max(errs.values()) < tol, errs
    assert (go[0, T // 2] == 0).all()


def test_forward_at_the_goal_shape_on_slices(cuda, rel_err):
    """4096 queries over an 8192 cache in one launch; the first and last 64 queries against the
    reference (the forward is per query, so a slice of the reference is exact)."""
    q, kv, idx = _inputs(1, 4096, 8192, 64, torch.bfloat16, cuda)
    with torch.no_grad():
        o, lse = sparse_mla(q, kv, idx, dv=DV, scale=SCALE, backend="triton")
        for sl in (slice(0, 64), slice(4032, 4096)):
            wo, wl = ref.sparse_mla(q[:, sl], kv, idx[:, sl], dv=DV, scale=SCALE)
            assert rel_err(wo, o[:, sl]) < 1e-2 and rel_err(wl, lse[:, sl]) < 1e-3


@pytest.mark.parametrize("T", [1, 2])
def test_decode_split_k_and_graph_replay(cuda, rel_err, T):
    """One and k + 1 = 2 tokens at context 32k: the planned K split (> 1 here) equals the reference,
    and a CUDA graph of the call replays new inputs written into the same buffers."""
    q, kv, idx = _inputs(1, T, 32768, 64, torch.bfloat16, cuda)
    cfg = tk.tile_config("fwd", q.dtype, D, 64)
    assert tk.plan_splits(T, K, cfg["BK"], cuda)[0] > 1
    with torch.no_grad():
        o, lse = sparse_mla(q, kv, idx, dv=DV, scale=SCALE, backend="triton")
        wo, wl = ref.sparse_mla(q, kv, idx, dv=DV, scale=SCALE)
        assert rel_err(wo, o) < 1e-2 and rel_err(wl, lse) < 1e-3
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            sparse_mla(q, kv, idx, dv=DV, scale=SCALE, backend="triton")
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            go, gl = sparse_mla(q, kv, idx, dv=DV, scale=SCALE, backend="triton")
        q2, _, idx2 = _inputs(1, T, 32768, 64, torch.bfloat16, cuda, seed=5)
        q.copy_(q2)
        idx.copy_(idx2)
        graph.replay()
        wo, wl = ref.sparse_mla(q, kv, idx, dv=DV, scale=SCALE)
        assert rel_err(wo, go) < 1e-2 and rel_err(wl, gl) < 1e-3
