"""Sparse MLA Triton kernels under the interpreter (16-head, 16-slot tiles) against the fp32
gather reference: o, lse, and dq, dkv through both o and lse, on awkward selections."""
import pytest
import torch

from deepwish.kernels.sparse_mla import reference as ref
from deepwish.kernels.sparse_mla import sparse_mla
from deepwish.kernels.sparse_mla import triton as tk

TOL = {torch.float32: 2e-5, torch.float16: 5e-3}


def _indices(B, T, S, K, empty_rows=(), seed=0):
    """[B, T, K] int32 distinct random causal slots (query t sees keys <= t + S - T), -1 where the
    visible keys run out, rows in empty_rows all -1, -1 holes mixed among the kept slots."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((B, T, K), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            if t in empty_rows:
                continue
            n = t + S - T + 1
            pick = torch.randperm(n, generator=g)[:K].int()
            idx[b, t, :len(pick)] = pick
            idx[b, t] = idx[b, t, torch.randperm(K, generator=g)]  # -1 anywhere, not only at the end
    return idx


def _check(rel_err, B, T, S, H, D, dv, K, dtype, empty=(), splits=0, dlse=True, index_dtype=torch.int32):
    q = torch.randn(B, T, H, D, dtype=dtype, requires_grad=True)
    kv = torch.randn(B, S, D, dtype=dtype, requires_grad=True)
    idx = _indices(B, T, S, K, empty).to(index_dtype)
    scale = D ** -0.5
    wo, wl = ref.sparse_mla(q, kv, idx, dv=dv, scale=scale)
    go, gl = tk.sparse_mla(q, kv, idx, dv=dv, scale=scale, splits=splits)
    assert go.dtype == dtype and gl.dtype == torch.float32 and go.shape == wo.shape
    assert torch.equal(torch.isinf(gl), torch.isinf(wl)), "rows without slots must have lse = -inf"
    live = torch.isfinite(wl)
    errs = {"o": rel_err(wo, go), "lse": rel_err(wl[live], gl[live])}
    do = torch.randn(B, T, H, dv)
    dl = torch.randn(B, T, H) if dlse else torch.zeros(B, T, H)

    def loss(o, lse):
        return (o.float() * do).sum() + (lse.where(live, 0.0) * dl).sum()
    wg = torch.autograd.grad(loss(wo, wl), (q, kv))
    gg = torch.autograd.grad(loss(go, gl), (q, kv))
    errs.update(dq=rel_err(wg[0], gg[0]), dkv=rel_err(wg[1], gg[1]))
    assert max(errs.values()) < TOL[dtype], errs
    for t in empty:
        assert (go[:, t] == 0).all()
    return errs


@pytest.mark.parametrize("B,T,S,H,D,dv,K,dtype,empty", [
    pytest.param(1, 6, 40, 4, 48, 32, 1, torch.float32, (), id="topk1"),
    pytest.param(2, 9, 9, 4, 48, 32, 40, torch.float16, (0,), id="K-gt-S-fp16-empty-row"),
    pytest.param(1, 5, 37, 20, 48, 32, 21, torch.float32, (3,), id="H20-two-head-tiles"),
    pytest.param(1, 4, 30, 4, 32, 32, 18, torch.float32, (), id="no-rope-tail-int64-indices"),
])
def test_sparse_mla_matches_reference(rel_err, B, T, S, H, D, dv, K, dtype, empty):
    _check(rel_err, B, T, S, H, D, dv, K, dtype, empty,
           index_dtype=torch.int64 if D == dv else torch.int32)


@pytest.mark.parametrize("splits", [2, 3])
def test_split_k_forward_matches_reference(rel_err, splits):
    """Decode shape (T = 1 and k + 1 = 3 over a longer cache): the K slots split over programs and
    merged; splits with only -1 slots (K > visible keys) must drop out of the merge."""
    _check(rel_err, 1, 3, 50, 4, 48, 32, 48, torch.float32, splits=splits)
    _check(rel_err, 2, 1, 9, 4, 48, 32, 40, torch.float16, splits=splits, dlse=False)


def test_all_rows_empty_and_planned_splits(rel_err):
    """No slot at all anywhere: o = 0, lse = -inf, zero gradients; the planner picks splits for a
    single decode token."""
    q = torch.randn(1, 2, 4, 48, requires_grad=True)
    kv = torch.randn(1, 5, 48, requires_grad=True)
    idx = torch.full((1, 2, 20), -1, dtype=torch.int32)
    o, lse = sparse_mla(q, kv, idx, dv=32, scale=0.1, backend="triton")
    assert (o == 0).all() and (lse == float("-inf")).all()
    dq, dkv = torch.autograd.grad(o.sum(), (q, kv))
    assert (dq == 0).all() and (dkv == 0).all()
    assert tk.plan_splits(1, 2048, 64, torch.device("cpu"))[0] > 1
    assert tk.plan_splits(4096, 2048, 64, torch.device("cpu")) == (1, 2048)


@pytest.mark.parametrize("mode,budget", [("fused", 1 << 30), ("split", 2 * (2 * 4 * 24 * 2))])
def test_backward_forms(rel_err, monkeypatch, mode, budget):
    """Both backward forms; the split one with a p/ds buffer of 2 tokens, so 7 tokens run in 4
    chunks (the last one short)."""
    monkeypatch.setattr(tk, "BACKWARD", mode)
    monkeypatch.setattr(tk, "PB_BUDGET_BYTES", budget)
    _check(rel_err, 1, 7, 30, 4, 48, 32, 24, torch.float16, empty=(2,))


def test_a_config_that_does_not_fit_shrinks_loudly(monkeypatch, capsys):
    """OutOfResources at launch: one stage less, then half the slots per step, announced; the
    launch is retried with the smaller config."""
    from triton.runtime.errors import OutOfResources
    key = ("fwd", "16bit", "wide")
    monkeypatch.setitem(tk.TILES, key, (64, 32, 8, 2))
    monkeypatch.setattr(tk, "_INTERPRET", False)  # read TILES, not the interpreter's tiles
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            def launch(*args, **cfg):
                seen.append((cfg["BK"], cfg["num_stages"]))
                if len(seen) < 3:
                    raise OutOfResources(300000, 232448, "shared memory")
            return launch
    q = torch.zeros(1, 1, 64, 576, dtype=torch.bfloat16)
    tk._launch(Kernel(), "fwd", q, (1,))
    assert seen == [(32, 2), (32, 1), (16, 1)] and tk.TILES[key] == (64, 16, 8, 1)
    assert capsys.readouterr().err.count("does not fit this GPU") == 2
    monkeypatch.setitem(tk.TILES, key, (64, 16, 8, 1))
    with pytest.raises(OutOfResources):
        tk._shrink(key, OutOfResources(1, 0, "shared memory"))


@pytest.mark.parametrize("slack", [0.5, 8.0])
def test_lazy_rescale_forward(rel_err, monkeypatch, slack):
    """The forward with a stale running maximum (online_softmax_step_scaled's SLACK): at slack 0.5 a row's
    maximum outgrows it on some 16-slot steps and not on others, at 8 only the first step rescales;
    o, lse and the gradients equal the reference either way (three steps, an empty row, fp32 and
    fp16)."""
    monkeypatch.setattr(tk, "FWD_LAZY_RESCALE", slack)
    _check(rel_err, 1, 5, 60, 4, 48, 32, 40, torch.float32, empty=(1,))
    _check(rel_err, 1, 4, 50, 4, 48, 32, 40, torch.float16)


def test_index_ahead_forward(rel_err, monkeypatch):
    """The forward with each step's slot indices loaded one step ahead: the same o, lse and
    gradients (three 16-slot steps, a short last one, an empty row; split-K decode too)."""
    monkeypatch.setattr(tk, "FWD_INDEX_AHEAD", True)
    _check(rel_err, 1, 5, 60, 4, 48, 32, 37, torch.float32, empty=(1,))
    _check(rel_err, 1, 3, 50, 4, 48, 32, 48, torch.float32, splits=2)
