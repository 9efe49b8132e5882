"""Fused linear cross-entropy: chunked Triton path (interpreter on CPU) against the fp32 reference."""
import pytest
import torch

from deepwish.kernels.linear_cross_entropy import reference as ref
from deepwish.kernels.linear_cross_entropy import triton as tri

N, D, V = 37, 48, 203


def _inputs(dtype=torch.float32, ignore_index=-100, n_ignored=7):
    h = torch.randn(N, D, dtype=dtype).requires_grad_()
    w = (torch.randn(V, D) * D ** -0.5 * 3).to(dtype).requires_grad_()   # logits of a few units
    targets = torch.randint(0, V, (N,))
    targets[torch.randperm(N)[:n_ignored]] = ignore_index
    return h, w, targets


def _run(fn, h, w, targets, reduction, return_logprobs, g_loss, g_lp, **kw):
    """Outputs and gradients of <loss, g_loss> + <logprobs, g_lp>."""
    out = fn(h, w, targets, reduction=reduction, return_logprobs=return_logprobs, **kw)
    loss, lp = out if return_logprobs else (out, None)
    obj = (loss * g_loss).sum() + ((lp * g_lp).sum() if lp is not None else 0.0)
    dh, dw = torch.autograd.grad(obj, [h, w])
    return [loss] + ([lp] if lp is not None else []) + [dh, dw]


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("return_logprobs", [False, True])
@pytest.mark.parametrize("z_loss,softcap", [(0.0, None), (1e-2, None), (0.0, 4.0), (3e-3, 7.5)])
def test_matches_reference_fp32(rel_err, reduction, return_logprobs, z_loss, softcap):
    h, w, targets = _inputs()
    g_loss = torch.randn(N) if reduction == "none" else torch.randn(())
    g_lp = torch.randn(N)
    kw = dict(z_loss=z_loss, softcap=softcap)
    want = _run(ref.linear_cross_entropy, h, w, targets, reduction, return_logprobs, g_loss, g_lp, **kw)
    # chunk_rows=16: three chunks, the last one short.
    got = _run(tri.linear_cross_entropy, h, w, targets, reduction, return_logprobs, g_loss, g_lp,
               chunk_rows=16, **kw)
    for i, (a, b) in enumerate(zip(want, got)):
        assert a.shape == b.shape and b.dtype == a.dtype, i
        assert rel_err(a, b) < 2e-6, (i, rel_err(a, b))


@pytest.mark.parametrize("dtype,logits_dtype,tol", [
    (torch.float16, None, 2e-2), (torch.float16, torch.float32, 3e-3),
    (torch.bfloat16, None, 3e-2), (torch.bfloat16, torch.float32, 2e-2),
])
def test_16bit_matches_reference(rel_err, dtype, logits_dtype, tol):
    h, w, targets = _inputs(dtype)
    g_loss, g_lp = torch.randn(()), torch.randn(N)
    want = _run(ref.linear_cross_entropy, h, w, targets, "mean", True, g_loss, g_lp, z_loss=1e-3)
    got = _run(tri.linear_cross_entropy, h, w, targets, "mean", True, g_loss, g_lp, z_loss=1e-3,
               logits_dtype=logits_dtype)
    for i, (a, b) in enumerate(zip(want, got)):
        assert rel_err(a, b) < tol, (i, rel_err(a, b))
    assert got[2].dtype == dtype and got[3].dtype == dtype


def test_ignored_tokens_give_zero_loss_logprob_and_gradient():
    h, w, targets = _inputs(ignore_index=5)        # an ignore_index inside the vocabulary
    ignored = targets == 5
    loss, lp = tri.linear_cross_entropy(h, w, targets, ignore_index=5, reduction="none",
                                        return_logprobs=True)
    assert (loss[ignored] == 0).all() and (lp[ignored] == 0).all()
    assert (loss[~ignored] > 0).all() and (lp[~ignored] < 0).all()
    (dh,) = torch.autograd.grad(loss.sum() + 3 * lp.sum(), [h])
    assert (dh[ignored] == 0).all() and (dh[~ignored] != 0).any(dim=1).all()


def test_mean_counts_only_kept_tokens_and_all_ignored_is_nan():
    h, w, targets = _inputs()
    kept = (targets != -100).sum()
    total = tri.linear_cross_entropy(h, w, targets, reduction="sum")
    mean = tri.linear_cross_entropy(h, w, targets, reduction="mean")
    torch.testing.assert_close(mean, total / kept)
    all_ignored = torch.full((N,), -100)
    assert torch.isnan(tri.linear_cross_entropy(h, w, all_ignored, reduction="mean"))
    loss = tri.linear_cross_entropy(h, w, all_ignored, reduction="sum")
    dh, dw = torch.autograd.grad(loss, [h, w])
    assert loss == 0 and (dh == 0).all() and (dw == 0).all()


@pytest.mark.parametrize("which", ["h", "weight"])
def test_gradient_to_one_input_only(rel_err, which):
    h, w, targets = _inputs()
    if which == "h":
        w = w.detach()
    else:
        h = h.detach()
    leaf = h if which == "h" else w
    for return_logprobs in (False, True):     # grads made in the forward, and recomputed
        out = tri.linear_cross_entropy(h, w, targets, return_logprobs=return_logprobs, chunk_rows=16)
        loss = out[0] if return_logprobs else out
        (got,) = torch.autograd.grad(loss, [leaf])
        (want,) = torch.autograd.grad(ref.linear_cross_entropy(h, w, targets), [leaf])
        assert rel_err(want, got) < 2e-6


def test_no_grad_forward_and_default_chunking(rel_err):
    h, w, targets = _inputs()
    with torch.no_grad():
        got = tri.linear_cross_entropy(h, w, targets, reduction="none", softcap=3.0, z_loss=1e-2)
    want = ref.linear_cross_entropy(h, w, targets, reduction="none", softcap=3.0, z_loss=1e-2)
    assert rel_err(want, got) < 2e-6
    assert tri.default_chunk_rows(37) == 37
    assert tri.default_chunk_rows(2048) == 256
    assert tri.default_chunk_rows(16384) == 2048
    assert tri.default_chunk_rows(100_000) == 2048
    assert tri.default_chunk_rows(16384, bytes_per_logit=6) == 512     # fp32 logits + bf16 grad


def test_second_backward_through_eager_gradients_is_an_error():
    h, w, targets = _inputs()
    loss = tri.linear_cross_entropy(h, w, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_bad_inputs_raise_clear_errors():
    h, w, targets = _inputs()
    bad = targets.clone()
    bad[0] = V
    with pytest.raises(ValueError, match="targets outside"):
        tri.linear_cross_entropy(h, w, bad)
    with pytest.raises(ValueError, match="dtype"):
        tri.linear_cross_entropy(h, w.double(), targets)
    with pytest.raises(ValueError, match="reduction"):
        tri.linear_cross_entropy(h, w, targets, reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        tri.linear_cross_entropy(h, w, targets, softcap=0.0)
    with pytest.raises(ValueError, match="targets must be integer"):
        tri.linear_cross_entropy(h, w, targets.float())
    with pytest.raises(ValueError, match="logits_dtype"):
        tri.linear_cross_entropy(h, w, targets, logits_dtype=torch.float16)


def test_autocast_does_not_change_the_computation(rel_err):
    """Inside the op the dtypes follow the inputs; autocast around it must not recast the GEMMs."""
    h, w, targets = _inputs()
    want = _run(tri.linear_cross_entropy, h, w, targets, "sum", False, torch.ones(()), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(tri.linear_cross_entropy, h, w, targets, "sum", False, torch.ones(()), None)
    for a, b in zip(want, got):
        assert b.dtype == a.dtype and rel_err(a, b) < 1e-6


def test_the_hardware_tanh_is_only_for_16_bit_logits_on_a_gpu():
    """The soft-cap's tanh instruction (relative error up to ~2^-10.7) is taken for bf16/fp16 logits on CUDA
    only: fp32 buffers keep the exact form, and the interpreter (CPU) runs no PTX."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert not tri.hardware_tanh(torch.zeros(2, 3, dtype=dtype))
