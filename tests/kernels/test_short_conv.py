"""Short causal conv: Triton (interpreter on CPU) against the fp32 reference, on awkward shapes."""
import pytest
import torch

from deepwish.kernels.short_conv import reference as ref
from deepwish.kernels.short_conv import triton as tri

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _run(mod, x, w, b, st, activation, cu, gy, gf):
    """Forward through `mod`, then gradients of <y, gy> + <final, gf> w.r.t. every input."""
    y, final = mod.causal_conv1d(x, w, b, activation, cu, st, output_final_state=True)
    ins = [t for t in (x, w, b, st) if t is not None]
    grads = torch.autograd.grad((y.float() * gy).sum() + (final.float() * gf).sum(), ins)
    return [y, final, *grads]


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("W,bias,activation,init", [
    (4, False, "silu", False),   # Qwen3-Next's configuration
    (4, True, "silu", True),
    (3, True, None, True),
    (2, False, "silu", True),
    (1, True, "silu", True),     # no state at all
])
def test_forward_and_gradients_match_reference(rel_err, dtype, W, bias, activation, init):
    B, T, D = 2, 63, 60
    x = _leaf(B, T, D, dtype=dtype)
    w = _leaf(D, W, dtype=dtype)
    b = _leaf(D, dtype=dtype) if bias else None
    st = _leaf(B, D, W - 1, dtype=dtype) if init else None
    gy = torch.randn(B, T, D)
    gf = torch.randn(B, D, W - 1)
    want = _run(ref, x, w, b, st, activation, None, gy, gf)
    got = _run(tri, x, w, b, st, activation, None, gy, gf)
    names = ["y", "final_state", "dx", "dweight"] + (["dbias"] if bias else []) + (["dinit"] if init else [])
    for name, a, g in zip(names, want, got):
        assert g.dtype == a.dtype and g.shape == a.shape, name
        if a.numel() == 0:       # W == 1: the state is empty
            continue
        assert rel_err(a, g) < TOL[dtype], (name, rel_err(a, g))


@pytest.mark.parametrize("init", [False, True])
def test_packed_documents_equal_separate_runs(rel_err, init):
    # Lengths include an empty document and documents shorter than W-1.
    lengths = [5, 1, 0, 30, 2, 25]
    D, W = 60, 4
    N, T = len(lengths), sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0)
    x = _leaf(1, T, D)
    w = _leaf(D, W)
    b = _leaf(D)
    st = _leaf(N, D, W - 1) if init else None
    gy = torch.randn(1, T, D)
    gf = torch.randn(N, D, W - 1)
    packed = _run(tri, x, w, b, st, "silu", cu, gy, gf)

    y_sep, f_sep = [], []
    for n in range(N):
        s, e = int(cu[n]), int(cu[n + 1])
        y_n, f_n = tri.causal_conv1d(x[:, s:e], w, b, "silu", None,
                                     st[n:n + 1] if init else None, output_final_state=True)
        y_sep.append(y_n)
        f_sep.append(f_n)
    y_sep, f_sep = torch.cat(y_sep, dim=1), torch.cat(f_sep, dim=0)
    ins = [t for t in (x, w, b, st) if t is not None]
    sep = [y_sep, f_sep, *torch.autograd.grad((y_sep * gy).sum() + (f_sep * gf).sum(), ins)]
    want = _run(ref, x, w, b, st, "silu", cu, gy, gf)
    for i, (a, p, s_) in enumerate(zip(want, packed, sep)):
        assert rel_err(s_, p) < 1e-6, i
        assert rel_err(a, p) < 1e-5, i


def test_packed_conv_never_reads_across_documents():
    D, W = 8, 4
    cu = torch.tensor([0, 6, 10])
    w = torch.randn(D, W)
    x = torch.randn(1, 10, D)
    x2 = x.clone()
    x2[0, :6] = torch.randn(6, D)                 # change only the first document
    y, _ = tri.causal_conv1d(x, w, None, None, cu)
    y2, _ = tri.causal_conv1d(x2, w, None, None, cu)
    assert torch.equal(y[0, 6:], y2[0, 6:])
    assert not torch.equal(y[0, :6], y2[0, :6])


@pytest.mark.parametrize("mod", [ref, tri], ids=["reference", "triton"])
@pytest.mark.parametrize("W,bias", [(4, False), (3, True)])
def test_decode_update_equals_last_step_of_full_conv(rel_err, mod, W, bias):
    B, T, D = 3, 9, 60
    x = torch.randn(B, T + 1, D)
    w = torch.randn(D, W)
    b = torch.randn(D) if bias else None
    st0 = torch.randn(B, D, W - 1)
    y_full, f_full = ref.causal_conv1d(x, w, b, "silu", None, st0, output_final_state=True)
    _, state = mod.causal_conv1d(x[:, :T], w, b, "silu", None, st0, output_final_state=True)
    state = state.clone()
    with torch.no_grad():
        y_step = mod.causal_conv1d_update(x[:, T], state, w, b, "silu")
    assert rel_err(y_full[:, T], y_step) < 1e-6
    assert rel_err(f_full, state) < 1e-7


def test_decode_from_empty_state_matches_token_by_token(rel_err):
    B, T, D, W = 2, 7, 33, 4
    x = torch.randn(B, T, D, dtype=torch.float16)
    w = torch.randn(D, W, dtype=torch.float16)
    y_full, _ = ref.causal_conv1d(x, w)
    state = torch.zeros(B, D, W - 1, dtype=torch.float16)
    with torch.no_grad():
        ys = torch.stack([tri.causal_conv1d_update(x[:, t], state, w) for t in range(T)], dim=1)
    assert rel_err(y_full, ys) < 2e-3


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 5, 8)
    w = torch.randn(8, 4)
    with pytest.raises(ValueError, match="weight"):
        tri.causal_conv1d(x, torch.randn(7, 4))
    with pytest.raises(ValueError, match="B == 1"):
        tri.causal_conv1d(x, w, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="initial_state"):
        tri.causal_conv1d(x, w, initial_state=torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match="W <= 4"):
        tri.causal_conv1d(x, torch.randn(8, 5))
    with pytest.raises(ValueError, match="activation"):
        tri.causal_conv1d(x, w, activation="gelu")
    with pytest.raises(ValueError, match="cu_seqlens"):
        ref.causal_conv1d(x[:1], w, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="conv_state"):
        tri.causal_conv1d_update(x[:, 0], torch.zeros(2, 8, 4), w)
    with pytest.raises(RuntimeError, match="inference only"):
        tri.causal_conv1d_update(x[:, 0], torch.zeros(2, 8, 3), w.requires_grad_())


@pytest.mark.parametrize("B", [1, 2])
def test_strided_input_slice(rel_err, B):
    """x as a slice of a wider projection (row stride > D), as a fused in-projection produces."""
    T, D, W = 40, 24, 4
    big = torch.randn(B, T, 3 * D, requires_grad=True)
    x = big[:, :, D:2 * D]
    w = torch.randn(D, W, requires_grad=True)
    gy = torch.randn(B, T, D)
    want = _run(ref, x, w, None, None, "silu", None, gy, torch.zeros(B, D, W - 1))
    got = _run(tri, x, w, None, None, "silu", None, gy, torch.zeros(B, D, W - 1))
    for a, g in zip(want, got):
        assert rel_err(a, g) < 1e-5
