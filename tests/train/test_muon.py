"""Batched Muon against per-matrix loops; Polar Express and NorMuon against their definitions."""
import copy

import pytest
import torch
from torch import nn

from deepwish.train.muon import (NS_COEFFS, POLAR_EXPRESS_COEFFS, Muon, newton_schulz, normuon_normalize,
                                 ns_coefficients, shape_buckets, shard_rows)


def ns_loop(G: torch.Tensor, coeffs, f: float = 1.0, eps: float = 1e-7) -> torch.Tensor:
    """The iteration written out for one matrix, fp64: X <- a X + b (X X^T) X + c (X X^T)^2 X."""
    X = G.double()
    X = X / (X.norm() * f + eps)
    for a, b, c in coeffs:
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ (A @ X))
    return X


@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 16, 20)])
def test_newton_schulz_equals_direct_iteration(shape, schedule):
    G = torch.randn(*shape)
    coeffs, f = ns_coefficients(schedule, 5)
    out = newton_schulz(G, steps=5, schedule=schedule)
    flat = G.reshape(-1, *shape[-2:])
    ref = torch.stack([ns_loop(g, coeffs, f) for g in flat]).reshape(shape)
    assert out.dtype == G.dtype and out.shape == G.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_coefficient_schedules():
    assert ns_coefficients("jordan", 3) == ([NS_COEFFS] * 3, 1.0)
    pe, f = ns_coefficients("polar_express", 10)
    assert f == 1.01 and pe[:7] == list(POLAR_EXPRESS_COEFFS[:7]) and pe[7:] == [(1.875, -1.25, 0.375)] * 3
    with pytest.raises(ValueError, match="schedule"):
        ns_coefficients("cubic", 5)


def test_polar_express_converges_where_jordan_does_not():
    """Spectrum spread over [1e-2, 1] (>= 1e-3 after the Frobenius normalisation): Polar Express
    reaches the polar factor in 7 steps; the
    original coefficients stay in their ~[0.7, 1.2] band by design."""
    U, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(96, 64, dtype=torch.float64))
    G = (U * torch.logspace(-2, 0, 64, dtype=torch.float64)) @ V.T  # [64, 96], singular values 1e-2..1
    s_pe = torch.linalg.svdvals(newton_schulz(G, steps=7, schedule="polar_express"))
    assert (s_pe - 1).abs().max() < 1e-3, s_pe
    s_j = torch.linalg.svdvals(newton_schulz(G, steps=7, schedule="jordan"))
    assert (s_j - 1).abs().max() > 0.1  # the test can tell the schedules apart
    torch.testing.assert_close(newton_schulz(G, steps=7, schedule="polar_express"), U @ V.T, atol=2e-3, rtol=0)


def test_normuon_normalize_equals_per_row_definition():
    O = torch.randn(2, 6, 10)
    v0 = torch.rand(2, 6, 1)
    v = v0.clone()
    out = normuon_normalize(O, v, beta2=0.9, eps=1e-8)
    for e in range(2):
        for i in range(6):
            v_ref = 0.9 * v0[e, i, 0] + 0.1 * (O[e, i] ** 2).mean()
            torch.testing.assert_close(v[e, i, 0], v_ref)
        rows = torch.stack([O[e, i] / (v[e, i, 0].sqrt() + 1e-8) for i in range(6)])
        torch.testing.assert_close(out[e], rows * O[e].norm() / rows.norm())
    with pytest.raises(ValueError, match="second moment"):
        normuon_normalize(O, torch.zeros(2, 6))


def muon_loop(params, grads_per_step, lr, mu, wd, schedule="jordan", normuon=False, beta2=0.95):
    """Muon one matrix at a time, the formula of the Muon docstring."""
    ps = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros(*p.shape[:-1], 1) for p in ps]
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(ps, grads)):
            bufs[i] = mu * bufs[i] + g
            u = g + mu * bufs[i]
            o = newton_schulz(u, steps=5, schedule=schedule)
            if normuon:
                o = normuon_normalize(o, vs[i], beta2=beta2)
            ps[i] = p * (1 - lr * wd) - lr * max(1, p.shape[-2] / p.shape[-1]) ** 0.5 * o
    return ps


@pytest.mark.parametrize("schedule,normuon", [("jordan", False), ("polar_express", True)])
def test_batched_muon_equals_per_matrix_loop(schedule, normuon):
    shapes = [(32, 16), (16, 32), (32, 16), (2, 12, 20), (16, 32), (32, 16), (2, 12, 20), (8, 8)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    steps = [[torch.randn(s) for s in shapes] for _ in range(3)]
    ref = muon_loop(params, steps, lr=0.05, mu=0.9, wd=0.1, schedule=schedule, normuon=normuon)
    # two param groups, so buckets never mix groups
    opt = Muon([{"params": params[:5]}, {"params": params[5:]}], lr=0.05, momentum=0.9, weight_decay=0.1,
               ns_schedule=schedule, normuon=normuon)
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for r, p in zip(ref, params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)


def test_muon_state_resumes_exactly():
    """Stepping, saving the state dict into a fresh optimizer and stepping on equals stepping on."""
    shapes = [(12, 8), (12, 8), (8, 20)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    opt = Muon(params, lr=0.05, normuon=True)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()
    opt2 = Muon(twin, lr=0.05, normuon=True)
    for t, p in zip(twin, params):
        t.data.copy_(p.detach())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as read from disk: no shared buffers
    for gs in grads[1:]:
        for o, ps in ((opt, params), (opt2, twin)):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            o.step()
    for p, t in zip(params, twin):
        assert torch.equal(p.detach(), t.detach())


def test_shape_buckets_and_shard_rows():
    ts = [torch.zeros(4, 3), torch.zeros(3, 4), torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.float64)]
    assert shape_buckets(ts) == [[0, 2], [1], [3]]
    assert shape_buckets(ts, max_numel=12) == [[0], [2], [1], [3]]
    for d0, w in ((7, 2), (5, 4), (2, 3), (16, 4)):
        rows = shard_rows(d0, w)
        assert rows == [len(c) for c in torch.arange(d0).chunk(w)] + [0] * (w - len(torch.arange(d0).chunk(w)))


def test_muon_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="schedule"):
        Muon([nn.Parameter(torch.randn(4, 4))], ns_schedule="cubic")


def test_bench_reference_loop_and_flop_count():
    """bench/muon.py's per-matrix step (its baseline) is the same update as the batched Muon; its
    Newton–Schulz FLOP count is k·(4m²n + 2m³) per matrix."""
    from deepwish.bench.muon import ns_flops, per_matrix_step
    shapes = [(16, 8), (8, 16), (16, 8), (2, 6, 10)]
    a = [nn.Parameter(torch.randn(s)) for s in shapes]
    b = [nn.Parameter(x.detach().clone()) for x in a]
    oa, ob = Muon(a, lr=0.05, weight_decay=0.1), Muon(b, lr=0.05, weight_decay=0.1)
    for _ in range(2):
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape)
            y.grad = x.grad.clone()
        oa.step()
        with torch.no_grad():
            per_matrix_step(ob)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-5, atol=1e-6)
    assert ns_flops([(16, 8), (2, 6, 10)], 5) == 5 * (4 * 64 * 16 + 2 * 512) + 2 * 5 * (4 * 36 * 10 + 2 * 216)


@pytest.mark.gpu
def test_batched_muon_on_gpu_matches_per_matrix_loop_in_bf16(cuda):
    """On CUDA (bf16 matmuls): the batched step against the per-matrix loop, same-shape matrices
    of both orientations and an expert stack; bf16 tolerance."""
    from deepwish.bench.muon import per_matrix_step
    shapes = [(256, 128), (128, 256), (256, 128), (4, 96, 160), (128, 256)]
    a = [nn.Parameter(torch.randn(s, device=cuda)) for s in shapes]
    b = [nn.Parameter(x.detach().clone()) for x in a]
    x0 = [x.detach().clone() for x in a]
    oa, ob = Muon(a, lr=0.05, weight_decay=0.1), Muon(b, lr=0.05, weight_decay=0.1)
    for _ in range(3):
        for x, y in zip(a, b):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        oa.step()
        with torch.no_grad():
            per_matrix_step(ob)
    for x, y, z in zip(a, b, x0):
        d = (x.detach() - y.detach()).norm() / (y.detach() - z).norm()  # relative to the update itself
        assert d < 3e-2, (tuple(x.shape), float(d))


def test_warm_up_touches_nothing_and_the_step_after_is_the_same():
    """Muon.warm_up runs the triton step (here under the interpreter) on scratch tensors of each
    shape bucket: parameters, gradients and state are untouched, and the real step after it is the
    step without it, bit for bit."""
    from deepwish.train.optim import ChainedOptimizer

    torch.manual_seed(0)
    shapes = [(16, 24), (24, 16), (16, 24), (2, 8, 12)]
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    for x, y in zip(a, b):
        x.grad = torch.randn_like(x)
        y.grad = x.grad.clone()
    oa, ob = Muon(a, lr=0.05, weight_decay=0.1, backend="triton"), Muon(b, lr=0.05, weight_decay=0.1, backend="triton")
    chained = ChainedOptimizer({"muon": ob, "adamw": torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])})
    assert chained.warm_up() == 3  # buckets (16, 24) x2, (24, 16), (2, 8, 12); AdamW has no warm-up
    assert not ob.state
    for x, y in zip(a, b):
        assert torch.equal(x, y) and torch.equal(x.grad, y.grad)
    oa.step()
    ob.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert Muon(a, backend="torch").warm_up() == 0  # nothing to compile
