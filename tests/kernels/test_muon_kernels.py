"""Muon's Triton kernels (interpreter on CPU, fp32/fp16 dots) against kernels/muon/reference.py, and
the triton backend's Newton–Schulz and optimizer step against the torch backend (train/muon.py)."""
import pytest
import torch
from torch import nn

from deepwish.kernels.muon import reference as ref
from deepwish.kernels.muon import triton as tri
from deepwish.train.muon import Muon, newton_schulz, ns_coefficients

# 16-wide tiles: several tiles per matrix, so the mirrored stores and the edge masks run.
SMALL = {"gram": dict(BLOCK=16, BLOCK_K=16), "update": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)}
TOL = {torch.float32: 1e-6, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_gram_equals_reference_and_mirrors_exactly(rel_err, dtype, transposed):
    """M = 40 (three 16-tiles, the last partial), K = 24 (a partial K tile); P as stored or as the
    transposed view of a contiguous matrix (the tall case's Xᵀ)."""
    P = torch.randn(2, 24, 40).mT if transposed else torch.randn(2, 40, 24)
    P = P.to(dtype)
    s = torch.rand(2) + 0.5
    out = tri.gram(P, alpha=0.75, scale=s, meta=SMALL["gram"])
    assert out.dtype == dtype and out.shape == (2, 40, 40)
    assert rel_err(ref.gram(P, 0.75, scale=s), out) < TOL[dtype]
    for i in range(3):  # off-diagonal tiles are the same values stored twice
        for j in range(i + 1, 3):
            assert torch.equal(out[:, 16 * i:16 * i + 16, 16 * j:16 * j + 16],
                               out[:, 16 * j:16 * j + 16, 16 * i:16 * i + 16].mT)


def test_gram_with_symmetric_y_is_b_a_plus_c_a_squared(rel_err):
    """B = b A + c A Aᵀ with A from the kernel: A Aᵀ is A² (the Newton–Schulz use)."""
    A = tri.gram(torch.randn(3, 36, 20), meta=SMALL["gram"])
    B = tri.gram(A, alpha=2.0315, beta=-4.775, Y=A, meta=SMALL["gram"])
    want = -4.775 * A.double() + 2.0315 * A.double() @ A.double()
    assert rel_err(want, B) < 1e-6
    with pytest.raises(ValueError, match="Y of shape"):
        tri.gram(A, Y=A[:, :5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", [(40, 24, 24), (24, 40, 24), (32, 32, 32)])  # tall, wide, all tiles whole
def test_ns_update_equals_reference(rel_err, dtype, M, N, K):
    L, R, Y = torch.randn(2, M, K).to(dtype), torch.randn(2, K, N).to(dtype), torch.randn(2, M, N).to(dtype)
    s = torch.rand(2) + 0.5
    out = tri.ns_update(L, R, Y, 3.4445, scale=s, meta=SMALL["update"])
    assert out.dtype == dtype
    assert rel_err(ref.ns_update(L, R, Y, 3.4445, s), out) < TOL[dtype]
    with pytest.raises(ValueError, match="do not chain"):
        tri.ns_update(L, R[:, :5], Y, 1.0)


@pytest.mark.parametrize("kernels,shape", [("gram", (2, 24, 16)), ("gram", (2, 16, 24)), ("none", (2, 24, 16))])
def test_newton_schulz_with_cublas_matmuls_applied_to_parameters(kernels, shape):
    """kernels="gram" (baddbmm for a X + B X) and "none" (the torch iteration), then the separate
    update pass, on expert stacks."""
    G = torch.randn(3, *shape)
    params = [torch.randn(shape) for _ in range(3)]
    want = [p * 0.99 - 0.05 * o for p, o in zip(params, newton_schulz(G, steps=2, backend="torch"))]
    coeffs, f = ns_coefficients("jordan", 2)
    assert tri.newton_schulz(G, coeffs, f, 1e-7, torch.float32, apply=(params, 0.99, -0.05, tri.AddressTables()),
                             kernels=kernels) is None
    for p, w in zip(params, want):
        torch.testing.assert_close(p, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown kernels"):
        tri.newton_schulz(G, coeffs, f, 1e-7, torch.float32, kernels="cutlass")


@pytest.mark.parametrize("M,N", [(40, 24), (24, 40)])
def test_ns_update_applied_to_parameters_equals_reference(M, N):
    """The last iteration's epilogue updates the parameters (an expert stack: one address a matrix)."""
    L, R, Y = torch.randn(4, M, M), torch.randn(4, M, N), torch.randn(4, M, N)
    params = [torch.randn(2, M, N) for _ in range(2)]
    want = [p.clone() for p in params]
    ref.apply_update([w.view(-1, M, N)[i] for w in want for i in range(2)], ref.ns_update(L, R, Y, 1.5), 0.99, -0.05)
    assert tri.ns_update(L, R, Y, 1.5, meta=SMALL["update"], apply=(params, 0.99, -0.05, tri.AddressTables())) is None
    for p, w in zip(params, want):
        torch.testing.assert_close(p, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_stack_and_apply_equal_reference(nesterov):
    shape = (2, 12, 20)  # an expert stack: two matrices per tensor, one sum of squares each
    grads = [torch.randn(shape) for _ in range(3)]
    bufs = [torch.randn(shape) for _ in range(3)]
    bufs_ref = [b.clone() for b in bufs]
    tables = tri.AddressTables()
    U, sumsq = tri.momentum_stack(grads, bufs, 0.9, nesterov, torch.float16, tables)
    U_ref, _ = ref.momentum_stack(grads, bufs_ref, 0.9, nesterov, torch.float16)
    for b, r in zip(bufs, bufs_ref):
        torch.testing.assert_close(b, r, rtol=1e-6, atol=1e-6)
    assert U.dtype == torch.float16 and U.shape == (3, *shape)
    torch.testing.assert_close(U, U_ref, rtol=1e-3, atol=0)  # one fp16 rounding of the same fp32 value
    torch.testing.assert_close(sumsq, U.float().square().flatten(2).sum(2).flatten(), rtol=1e-5, atol=0)
    params = [torch.randn(shape) for _ in range(3)]
    params_ref = [p.clone() for p in params]
    tri.apply_update(params, U, 0.99, -0.05, tables)
    ref.apply_update(params_ref, U, 0.99, -0.05)
    for p, r in zip(params, params_ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        tri.momentum_stack([g.mT for g in grads], bufs, 0.9, nesterov, torch.float16, tables)


def test_momentum_stack_divides_the_gradients_by_grad_scale():
    """Clipping folded into the momentum pass: the same buffers and stack as the reference on the
    divided gradients, and the gradients left untouched."""
    shape = (12, 20)
    grads = [torch.randn(shape) for _ in range(2)]
    kept = [g.clone() for g in grads]
    bufs = [torch.randn(shape) for _ in range(2)]
    bufs_ref = [b.clone() for b in bufs]
    scale = torch.tensor(4.0)
    U, _ = tri.momentum_stack(grads, bufs, 0.9, True, torch.float32, tri.AddressTables(), grad_scale=scale)
    U_ref, _ = ref.momentum_stack([g / 4 for g in grads], bufs_ref, 0.9, True, torch.float32)
    torch.testing.assert_close(U, U_ref, rtol=1e-6, atol=1e-6)
    for b, r in zip(bufs, bufs_ref):
        torch.testing.assert_close(b, r, rtol=1e-6, atol=1e-6)
    for g, k in zip(grads, kept):
        assert torch.equal(g, k)
    with pytest.raises(ValueError, match="grad_scale"):
        tri.momentum_stack(grads, bufs, 0.9, True, torch.float32, tri.AddressTables(), grad_scale=torch.ones(2))


@pytest.mark.parametrize("shape,schedule", [((24, 40), "jordan"), ((40, 24), "polar_express"), ((3, 16, 20), "jordan")])
def test_newton_schulz_triton_equals_torch(rel_err, shape, schedule):
    """Wide, tall (the Gram matrix is XᵀX) and a batch; the normalisation folded into the first
    iteration, from computed (or, tall, given) sums of squares."""
    G = torch.randn(*shape)
    want = newton_schulz(G, steps=3, schedule=schedule, backend="torch")
    if shape == (40, 24):
        coeffs, f = ns_coefficients(schedule, 3)
        got = tri.newton_schulz(G, coeffs, f, 1e-7, torch.float32, sumsq=G.square().sum().view(1), meta=SMALL)
    else:
        got = newton_schulz(G, steps=3, schedule=schedule, backend="triton")
    assert got.shape == G.shape and got.dtype == G.dtype
    assert rel_err(want, got) < 1e-5


def test_bf16_rounding_points_keep_bf16_noise():
    """The fused path rounds at other points than the torch path on CUDA (the normalisation folded
    into the first iteration's epilogues; A Aᵀ for A²). Both emulated in bf16 with torch (fp32
    accumulation, bf16 results): each is as far from the exact iteration as the other."""
    bf = torch.bfloat16
    coeffs, _ = ns_coefficients("jordan", 5)
    U = torch.randn(2, 96, 192).to(bf)

    def mm(x, y):
        return x.float() @ y.float()
    s = 1.0 / (U.float().norm(dim=(-2, -1), keepdim=True) + 1e-7)
    X = (U.float() * s).to(bf)  # torch path: normalise, then iterate
    for a, b, c in coeffs:
        A = mm(X, X.mT).to(bf)
        X = (a * X.float() + mm((b * A.float() + c * mm(A, A)).to(bf), X)).to(bf)
    old = X
    X = U  # fused path
    for k, (a, b, c) in enumerate(coeffs):
        A = (mm(X, X.mT) * (s * s if k == 0 else 1)).to(bf)
        X = ((a * X.float() + mm((b * A.float() + c * mm(A, A.mT)).to(bf), X)) * (s if k == 0 else 1)).to(bf)
    new = X
    E = U.double() / U.double().norm(dim=(-2, -1), keepdim=True)
    for a, b, c in coeffs:
        A = E @ E.mT
        E = a * E + (b * A + c * A @ A) @ E

    def err(x):
        return float((x.double() - E).norm() / E.norm())
    assert err(old) < 0.02 and err(new) < 0.02
    assert err(new) < 1.2 * err(old)


def _step_both(shapes, groups, steps, **kw):
    a = [nn.Parameter(torch.randn(s)) for s in shapes]
    b = [nn.Parameter(x.detach().clone()) for x in a]
    opts = [Muon([{"params": [ps[i] for i in g]} for g in groups], backend=backend, **kw)
            for ps, backend in ((a, "torch"), (b, "triton"))]
    for _ in range(steps):
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape)
            y.grad = x.grad.clone()
        for o in opts:
            o.step()
    return a, b, opts


@pytest.mark.parametrize("normuon,nesterov", [(False, True), (True, False)])
def test_muon_step_triton_equals_torch(normuon, nesterov):
    """Steps of the whole optimizer (two groups; a shape in both; an expert stack; weight decay)."""
    shapes = [(32, 16), (2, 12, 20), (32, 16), (16, 24)]
    a, b, (oa, ob) = _step_both(shapes, [[0, 1, 2], [3]], 2 if normuon else 1, lr=0.05, momentum=0.9, nesterov=nesterov,
                                weight_decay=0.1, ns_steps=2, normuon=normuon)
    for x, y in zip(a, b):
        torch.testing.assert_close(y.detach(), x.detach(), rtol=1e-5, atol=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(ob.state[y]["momentum_buffer"], oa.state[x]["momentum_buffer"], rtol=1e-6, atol=1e-6)
    assert ob.backend_for(torch.device("cpu")) == "triton" and oa.backend_for(torch.device("cpu")) == "torch"


def test_muon_backend_is_checked():
    with pytest.raises(ValueError, match="backend"):
        Muon([nn.Parameter(torch.randn(4, 4))], backend="cublas")


def test_bench_counts_the_symmetric_flops(monkeypatch):
    from deepwish.bench.muon import ns_flops, ns_flops_run, ns_flops_symmetric
    m, n = 256, 512  # two 128-tiles per side: 3 of 4 tiles of each Gram product
    assert ns_flops_symmetric([(n, m)], 1) == 0.75 * (2 * m * m * n + 2 * m ** 3) + 2 * m * m * n
    assert ns_flops_symmetric([(2, m, m)], 5) < ns_flops([(2, m, m)], 5)
    # NS_KERNELS="auto": what was picked per stack shape decides the count
    monkeypatch.setattr(tri, "_PICKED", {((4, m, n), torch.bfloat16, "cuda", 5): "all",
                                         ((2, n, n), torch.bfloat16, "cuda", 5): "none"})
    ran, flops = ns_flops_run("muon", "triton", [(m, n)] * 4 + [(n, n)] * 2, 5)
    assert ran == "triton auto (all 1, none 1)"
    assert flops == ns_flops_symmetric([(4, m, n)], 5) + ns_flops([(2, n, n)], 5)
    assert ns_flops_run("muon-torch", "torch", [(m, n)], 5) == ("torch", ns_flops([(m, n)], 5))


def test_pick_ns_kernels_takes_the_fastest_once_per_shape(monkeypatch, capsys):
    """NS_KERNELS="auto": each choice run once untimed, then timed; the fastest kept per shape."""
    monkeypatch.setattr(tri, "_PICKED", {})
    seconds = {"all": 3e-3, "gram": 1e-3, "none": 2e-3, "gram_ns": 4e-3}
    timed = []

    def timer(fn):
        choice = fn.__defaults__[0]
        timed.append(choice)
        return seconds[choice]
    G = torch.randn(2, 16, 24)
    coeffs, f = ns_coefficients("jordan", 2)
    assert tri.pick_ns_kernels(G, coeffs, f, 1e-7, torch.float32, timer=timer) == "gram"
    assert sorted(timed) == sorted(2 * list(tri.NS_KERNEL_CHOICES))
    assert "-> gram" in capsys.readouterr().err
    assert tri.pick_ns_kernels(G, coeffs, f, 1e-7, torch.float32, timer=timer) == "gram" and len(timed) == 8
    assert tri.pick_ns_kernels(G[:1], coeffs, f, 1e-7, torch.float32, timer=timer) == "gram" and len(timed) == 16


@pytest.mark.parametrize("shape,steps", [((24, 56), 5), ((56, 24), 5), ((2, 16, 40), 3)])
def test_gram_newton_schulz_is_the_same_iteration(rel_err, shape, steps):
    """The Gram form (iterating Q and R = X Xᵀ, with the restart for 4+ iterations) computes the
    plain iteration: equal in fp32 (the half-precision path only changes the rounding), wide,
    tall and batched, through the triton entry point with kernels="gram_ns"."""
    G = torch.randn(*shape)
    coeffs, f = ns_coefficients("jordan", steps)
    want = newton_schulz(G, steps=steps, schedule="jordan", backend="torch")
    got = tri.newton_schulz(G, coeffs, f, 1e-7, torch.float32, kernels="gram_ns")
    assert got.shape == G.shape and got.dtype == G.dtype
    assert rel_err(want, got) < 1e-4
    assert rel_err(ref.gram_newton_schulz(G, coeffs, f, 1e-7, torch.float32), got) < 1e-5


@pytest.mark.parametrize("shape", [(2, 24, 16), (2, 16, 24)])
def test_gram_ns_update_reads_the_fp16_result_in_place(shape):
    """kernels="gram_ns" with the update: O comes out of the iteration contiguous in the parameters'
    layout (a tall stack's Xwᵀ Q, no transposed copy) and in fp16, which the update reads as it is
    (no bf16 copy, no second rounding); without the update O is G's dtype and layout."""
    torch.manual_seed(0)
    G = torch.randn(2, *shape).to(torch.bfloat16)
    coeffs, f = ns_coefficients("jordan", 3)
    O16 = tri.gram_newton_schulz(G, coeffs, f, 1e-7, torch.bfloat16, meta=SMALL, out_dtype=torch.float16)
    assert O16.dtype == torch.float16 and O16.is_contiguous() and O16.shape == G.shape
    back = tri.newton_schulz(G, coeffs, f, 1e-7, torch.bfloat16, meta=SMALL, kernels="gram_ns")
    assert back.dtype == G.dtype and back.is_contiguous() and torch.equal(back, O16.to(G.dtype))
    params = [torch.randn(shape) for _ in range(2)]
    want = [p * 0.99 - 0.05 * o.float() for p, o in zip(params, O16)]
    assert tri.newton_schulz(G, coeffs, f, 1e-7, torch.bfloat16, meta=SMALL, kernels="gram_ns",
                             apply=(params, 0.99, -0.05, tri.AddressTables())) is None
    for p, w in zip(params, want):
        torch.testing.assert_close(p, w, rtol=0, atol=1e-6)


def test_gram_newton_schulz_in_fp16_is_nearer_the_exact_iteration_than_bf16():
    """The reason for fp16: on a spectrum spread over four decades the Gram recurrence in fp16 is
    nearer the exact (fp64) iteration than the plain iteration in bf16 (what the step runs otherwise)."""
    torch.manual_seed(1)
    m, n = 64, 384
    U, _ = torch.linalg.qr(torch.randn(m, m))
    V, _ = torch.linalg.qr(torch.randn(n, m))
    G = (U * torch.logspace(-4, 0, m)) @ V.mT
    coeffs, f = ns_coefficients("jordan", 5)
    exact = newton_schulz(G.double(), steps=5, schedule="jordan", backend="torch")
    plain_bf16 = ref.newton_schulz(G, coeffs, f, 1e-7, torch.bfloat16)
    # the reference's products accumulate in fp32 as the GPU's do (the interpreter's fp16 dots do not)
    gram_fp16 = ref.gram_newton_schulz(G, coeffs, f, 1e-7, torch.bfloat16)
    # the kernels' form (fp16 tiles, several a matrix): a diagonal tile of P Oᵀ kept unsymmetrised
    # drifted to 7x the reference's error here (2x the plain bf16 iteration's)
    kernels_fp16 = tri.newton_schulz(G, coeffs, f, 1e-7, torch.bfloat16, meta=SMALL, kernels="gram_ns")

    def err(x):
        return float((x.double() - exact).norm() / exact.norm())
    assert err(gram_fp16) < err(plain_bf16), (err(gram_fp16), err(plain_bf16))
    assert err(kernels_fp16) < 1.1 * err(gram_fp16), (err(kernels_fp16), err(gram_fp16))


@pytest.mark.parametrize("shape,steps", [((2, 24, 56), 5), ((56, 24), 3)])
def test_gram_ns_flop_count_follows_its_calls(monkeypatch, shape, steps):
    """bench muon's count for gram_newton_schulz equals the FLOPs of the calls it makes (the Gram
    kernel on its symmetric 128-tiles, cuBLAS products in full)."""
    from deepwish.bench.muon import ns_flops_gram_ns
    counted = []
    bmm, gram = torch.bmm, tri.gram

    def spy_bmm(a, b):
        counted.append(2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])
        return bmm(a, b)

    def spy_gram(P, *args, **kw):
        t = -(-P.shape[1] // 128)
        counted.append(t * (t + 1) / (2 * t * t) * 2 * P.shape[0] * P.shape[1] ** 2 * P.shape[2])
        return gram(P, *args, **kw)
    monkeypatch.setattr(torch, "bmm", spy_bmm)
    monkeypatch.setattr(tri, "gram", spy_gram)
    coeffs, f = ns_coefficients("jordan", steps)
    tri.gram_newton_schulz(torch.randn(*shape), coeffs, f, 1e-7, torch.float32)
    assert sum(counted) == pytest.approx(ns_flops_gram_ns([shape], steps))


def test_gram_with_a_second_operand_is_the_symmetric_product():
    """gram(P, other=O) = P Oᵀ on the upper tiles, mirrored: exact for commuting symmetric P, O
    (polynomials in one symmetric matrix), several 16-tiles per matrix, a batch of two; exactly
    symmetric also in fp16, where P Oᵀ's rounding is not (the diagonal tiles mirror their upper half)."""
    S = torch.randn(2, 40, 40)
    S = S + S.mT
    P, O = S @ S + 0.5 * S, S @ S @ S - S
    got = tri.gram(P, other=O, meta={"BLOCK": 16, "BLOCK_K": 16})
    assert float((got - P @ O).norm() / (P @ O).norm()) < 1e-6
    assert torch.equal(got, got.mT)
    torch.testing.assert_close(ref.gram(P, other=O), got, rtol=0, atol=1e-6 * float(got.abs().max()))
    P16, O16 = (x / x.abs().max() for x in (P, O))
    P16, O16 = P16.half(), O16.half()
    got16 = tri.gram(P16, other=O16, meta={"BLOCK": 16, "BLOCK_K": 16})
    assert torch.equal(got16, got16.mT)
    assert not torch.equal(P16.float() @ O16.float().mT, (P16.float() @ O16.float().mT).mT)  # what it mends
    torch.testing.assert_close(ref.gram(P16, other=O16).float(), got16.float(), rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match="other"):
        tri.gram(P, other=O[:, :8])
