"""kernels/gemv: the Triton matrix-vector product against the reference (CPU: the interpreter,
conftest), on awkward shapes; and `linear`'s dispatch."""
import pytest
import torch

from deepwish.kernels.gemv import linear, reference


@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_matches_reference(rel_err, M, bias, dtype):
    from deepwish.kernels.gemv.triton import gemv
    N, K = 37, 45
    x = torch.randn(M, K).to(dtype)
    w = torch.randn(N, K).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    out = gemv(x, w, b)
    ref = reference.gemv(x, w, b)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(ref, out) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_gemv_leading_dims_and_errors():
    from deepwish.kernels.gemv.triton import gemv
    x = torch.randn(2, 1, 20)
    w = torch.randn(9, 20)
    assert torch.allclose(gemv(x, w), x @ w.t(), atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        gemv(torch.randn(17, 20), w)
    with pytest.raises(ValueError, match="weight"):
        gemv(x, torch.randn(9, 21))


def test_linear_dispatch(monkeypatch):
    x, w = torch.randn(1, 1, 20), torch.randn(9, 20)
    with torch.no_grad():
        assert torch.allclose(linear(x, w, backend="triton"), x @ w.t(), atol=1e-5)
        assert torch.equal(linear(x, w), torch.nn.functional.linear(x, w))
    # a prefill chunk of a few tokens (here 5) is not a decode step: cuBLAS, never the kernel
    import deepwish.kernels.gemv.triton as tk

    def no_kernel(*a, **k):
        raise AssertionError("the GEMV kernel ran for a prefill chunk")
    monkeypatch.setattr(tk, "gemv", no_kernel)
    with torch.no_grad():
        xs = torch.randn(1, 5, 20)
        assert torch.equal(linear(xs, w, backend="triton"), torch.nn.functional.linear(xs, w))
        with pytest.raises(AssertionError, match="prefill"):  # and the decode shape does reach it
            linear(x, w, backend="triton")
    # with gradients (training) the cuBLAS path, whatever the setting: the kernel has no backward
    w.requires_grad_(True)
    y = linear(x, w, backend="triton")
    y.sum().backward()
    assert w.grad is not None
