"""Sparse MLA: the fp32 gather reference against a per-query loop and against the dense
scatter_-mask form, forward, lse and every gradient, on awkward selections."""
import math

import pytest
import torch

from deepwish.kernels import BackendError
from deepwish.kernels.sparse_mla import reference as ref
from deepwish.kernels.sparse_mla import resolve_sparse_mla_backend, sparse_mla


def _indices(B, T, S, K, causal=True, empty_rows=()):
    """[B, T, K] distinct random slots per query (causal: among keys <= t + S - T), -1 past the
    number of visible keys, rows in empty_rows select nothing."""
    idx = torch.full((B, T, K), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            if t in empty_rows:
                continue
            n = t + S - T + 1 if causal else S
            pick = torch.randperm(n)[:K]
            idx[b, t, :len(pick)] = pick.int()
    return idx


def _loop(q, kv, idx, dv, scale):
    """One query row at a time, from the definition."""
    B, T, H, _ = q.shape
    o = torch.zeros(B, T, H, dv, dtype=torch.float64)
    lse = torch.full((B, T, H), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            sel = idx[b, t][idx[b, t] >= 0].long()
            if len(sel) == 0:
                continue
            rows = kv[b, sel].double()
            s = q[b, t].double() @ rows.T * scale          # [H, n]
            lse[b, t] = torch.logsumexp(s, -1)
            o[b, t] = torch.softmax(s, -1) @ rows[:, :dv]
    return o, lse


@pytest.mark.parametrize("B,T,S,H,D,dv,K,empty", [
    (1, 5, 9, 4, 48, 32, 1, ()),          # top-k = 1
    (2, 7, 7, 4, 48, 32, 16, (0, 3)),     # K > visible keys (-1 padding), rows with nothing
    (1, 3, 20, 2, 24, 24, 6, ()),         # decode-like: few queries at the end of a longer cache
])
def test_reference_matches_loop_and_dense(rel_err, B, T, S, H, D, dv, K, empty):
    q = torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    idx = _indices(B, T, S, K, empty_rows=empty)
    scale = D ** -0.5
    o, lse = ref.sparse_mla(q, kv, idx, dv=dv, scale=scale)
    assert o.shape == (B, T, H, dv) and lse.shape == (B, T, H) and lse.dtype == torch.float64
    lo, llse = _loop(q, kv, idx, dv, scale)
    assert rel_err(lo, o) < 1e-6
    assert torch.equal(torch.isinf(lse), torch.isinf(llse))
    fin = torch.isfinite(llse)
    assert rel_err(llse[fin], lse[fin]) < 1e-6
    for t in empty:
        assert (o[:, t] == 0).all() and (lse[:, t] == float("-inf")).all()
    do = torch.randn_like(o)
    dlse = torch.randn_like(lse)
    live = torch.isfinite(lse)
    loss = (o * do).sum() + (lse.where(live, 0.0) * dlse).sum()
    g = torch.autograd.grad(loss, (q, kv))
    assert all(torch.isfinite(x).all() for x in g)
    do2, lse2 = ref.sparse_mla_dense(q, kv, idx, dv=dv, scale=scale)
    loss2 = (do2 * do).sum() + (lse2.where(live, 0.0) * dlse).sum()
    g2 = torch.autograd.grad(loss2, (q, kv))
    for a, b_ in zip(g2, g):
        assert rel_err(a, b_) < 1e-6


def test_lse_and_output_gradients_match_the_loop(rel_err):
    """Gradients through o and lse against autograd of the per-query loop, in float64."""
    q = torch.randn(2, 6, 3, 12, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, 8, 12, dtype=torch.float64, requires_grad=True)
    idx = _indices(2, 6, 8, 4, empty_rows=(2,))
    o, lse = ref.sparse_mla(q, kv, idx, dv=7, scale=0.3)
    lo, llse = _loop(q, kv, idx, 7, 0.3)
    assert lse.dtype == torch.float64
    do, dlse = torch.randn_like(lo), torch.randn_like(llse)
    live = torch.isfinite(llse)
    g = torch.autograd.grad((o * do).sum() + (lse.where(live, 0.0) * dlse).sum(), (q, kv))
    lg = torch.autograd.grad((lo * do).sum() + (llse.where(live, 0.0) * dlse).sum(), (q, kv))
    for a, b_ in zip(lg, g):
        assert rel_err(a, b_) < 1e-12


def test_entry_point_torch_backend_and_errors():
    q = torch.randn(1, 4, 2, 16)
    kv = torch.randn(1, 6, 16)
    idx = _indices(1, 4, 6, 3)
    o, lse = sparse_mla(q, kv, idx, dv=8, scale=0.25, backend="torch")
    wo, wl = ref.sparse_mla(q, kv, idx, dv=8, scale=0.25)
    assert torch.equal(o, wo) and torch.equal(lse, wl) and lse.dtype == torch.float32
    assert resolve_sparse_mla_backend("auto", "cpu", announce=False) == "torch"
    with pytest.raises(BackendError, match="unknown backend"):
        sparse_mla(q, kv, idx, dv=8, scale=0.25, backend="cuda")
    with pytest.raises(ValueError, match="indices must lie in"):
        ref.sparse_mla(q, kv, idx.masked_fill(idx == 0, 6), dv=8, scale=0.25)
    with pytest.raises(ValueError, match="dv must be"):
        sparse_mla(q, kv, idx, dv=17, scale=0.25, backend="torch")
    with pytest.raises(ValueError, match="kv must be"):
        sparse_mla(q, kv[..., :8], idx, dv=8, scale=0.25, backend="torch")
    with pytest.raises(ValueError, match="int32 or int64"):
        sparse_mla(q, kv, idx.float(), dv=8, scale=0.25, backend="torch")
    assert math.isclose(float(lse[0, 0, 0]), float(torch.logsumexp(0.25 * kv[0, idx[0, 0].long()] @ q[0, 0, 0], 0)),
                        rel_tol=1e-5)
