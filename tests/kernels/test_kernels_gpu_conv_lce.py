"""GPU checks at real sizes (bf16 included) for the short conv and the fused linear cross-entropy.
Run on the device machine: `pytest -m gpu tests/kernels/test_kernels_gpu_conv_lce.py`."""
import pytest
import torch

from deepwish.kernels.linear_cross_entropy import reference as lce_ref
from deepwish.kernels.short_conv import reference as conv_ref

pytestmark = pytest.mark.gpu


def _conv_all(mod, x, w, b, st, cu, gy, gf):
    y, f = mod.causal_conv1d(x, w, b, "silu", cu, st, output_final_state=True)
    ins = [t for t in (x, w, b, st) if t is not None]
    return [y, f, *torch.autograd.grad((y.float() * gy).sum() + (f.float() * gf).sum(), ins)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("B,T,D,packed", [(1, 16384, 4096, False), (2, 3000, 1000, False), (1, 8191, 2048, True),
                                           (1, 2048, 128, True)])  # the last: the tiny hybrid model's conv
def test_conv_matches_reference_on_gpu(cuda, rel_err, dtype, tol, B, T, D, packed):
    from deepwish.kernels.short_conv import triton as conv_tri
    W = 4
    x = torch.randn(B, T, D, device=cuda, dtype=dtype, requires_grad=True)
    w = (torch.randn(D, W, device=cuda) * 0.5).to(dtype).requires_grad_()
    b = torch.randn(D, device=cuda, dtype=dtype, requires_grad=True) if packed else None
    cu = None
    N = B
    if packed:
        cuts = torch.randperm(T - 1, device=cuda)[:30].add(1).sort().values
        cu = torch.cat([torch.zeros(1, device=cuda, dtype=torch.long), cuts, torch.full((1,), T, device=cuda)])
        N = cu.numel() - 1
    st = torch.randn(N, D, W - 1, device=cuda, dtype=dtype, requires_grad=True) if packed else None
    gy = torch.randn(B, T, D, device=cuda)
    gf = torch.randn(N, D, W - 1, device=cuda)
    want = _conv_all(conv_ref, x, w, b, st, cu, gy, gf)
    got = _conv_all(conv_tri, x, w, b, st, cu, gy, gf)
    for i, (a, g) in enumerate(zip(want, got)):
        assert g.dtype == a.dtype and g.shape == a.shape, i
        assert rel_err(a, g) < tol, (i, rel_err(a, g))


def test_conv_update_on_gpu(cuda, rel_err):
    from deepwish.kernels.short_conv import triton as conv_tri
    B, T, D, W = 64, 33, 4096, 4
    x = torch.randn(B, T + 1, D, device=cuda, dtype=torch.bfloat16)
    w = torch.randn(D, W, device=cuda, dtype=torch.bfloat16)
    y_full, _ = conv_ref.causal_conv1d(x, w)
    _, state = conv_tri.causal_conv1d(x[:, :T], w, output_final_state=True)
    with torch.no_grad():
        y = conv_tri.causal_conv1d_update(x[:, T], state, w)
    assert rel_err(y_full[:, T], y) < 1e-2


def _lce_all(fn, h, w, t, g_loss, g_lp, **kw):
    loss, lp = fn(h, w, t, return_logprobs=True, **kw)
    return [loss, lp, *torch.autograd.grad((loss * g_loss).sum() + (lp * g_lp).sum(), [h, w])]


@pytest.mark.parametrize("dtype,logits_dtype,tol", [
    (torch.float32, None, 1e-5),
    (torch.bfloat16, None, 2e-2),               # logits rounded to bf16, as the plain loss does
    (torch.bfloat16, torch.float32, 1e-2),      # fp32 logits: tighter outputs, bf16 gradients
])
@pytest.mark.parametrize("reduction,z_loss,softcap", [("mean", 0.0, None), ("none", 1e-4, 30.0)])
def test_lce_matches_reference_on_gpu(cuda, rel_err, dtype, logits_dtype, tol, reduction, z_loss, softcap):
    from deepwish.kernels.linear_cross_entropy import triton as lce_tri
    N, D, V = 4096, 1024, 151936
    h = torch.randn(N, D, device=cuda).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device=cuda) * D ** -0.5 * 2).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=cuda)
    t[torch.randperm(N, device=cuda)[:300]] = -100
    g_loss = torch.randn(N if reduction == "none" else (), device=cuda)
    g_lp = torch.randn(N, device=cuda)
    kw = dict(reduction=reduction, z_loss=z_loss, softcap=softcap)
    want = _lce_all(lce_ref.linear_cross_entropy, h, w, t, g_loss, g_lp, **kw)
    got = _lce_all(lce_tri.linear_cross_entropy, h, w, t, g_loss, g_lp, logits_dtype=logits_dtype, **kw)
    for i, (a, g) in enumerate(zip(want, got)):
        assert g.shape == a.shape, i
        assert rel_err(a, g) < tol, (i, rel_err(a, g))


def test_lce_training_path_bf16_and_memory_bound(cuda, rel_err):
    """Reduced loss without logprobs (gradients made in the forward): matches the reference, and
    the extra memory stays near one logits chunk plus the gradients."""
    from deepwish.kernels.linear_cross_entropy import triton as lce_tri
    N, D, V = 16384, 1024, 151936
    h = torch.randn(N, D, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, D, device=cuda) * D ** -0.5 * 2).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device=cuda)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = lce_tri.linear_cross_entropy(h, w, t, reduction="mean")
    dh, dw = torch.autograd.grad(loss, [h, w])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    chunk = lce_tri.default_chunk_rows(N) * V * 2
    grads = dh.numel() * 2 + dw.numel() * 2
    assert peak < chunk + grads + (64 << 20), (peak / 2**20, chunk / 2**20, grads / 2**20)
    plain_logits = N * V * (2 + 4 + 4)
    assert peak - grads < 0.05 * plain_logits
    want = lce_ref.linear_cross_entropy(h.float(), w.float(), t, reduction="mean")
    assert rel_err(want, loss) < 2e-3
    wdh, wdw = torch.autograd.grad(lce_ref.linear_cross_entropy(h, w, t, reduction="mean"), [h, w])
    assert rel_err(wdh, dh) < 2e-2 and rel_err(wdw, dw) < 2e-2


def test_lce_hardware_tanh_matches_the_exact_soft_cap(cuda, rel_err, monkeypatch):
    """bf16 logits with a soft-cap take the GPU's tanh instruction; fp32 logits keep the exact form.
    The two agree inside half the bf16 path's tolerance against the fp32 reference (2e-2 above)."""
    from deepwish.kernels.linear_cross_entropy import triton as lce_tri
    assert lce_tri.hardware_tanh(torch.zeros(1, device=cuda, dtype=torch.bfloat16))
    assert not lce_tri.hardware_tanh(torch.zeros(1, device=cuda, dtype=torch.float32))
    N, D, V = 2048, 768, 50304
    h = torch.randn(N, D, device=cuda).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, D, device=cuda) * D ** -0.5 * 4).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device=cuda)
    g_loss, g_lp = torch.randn(N, device=cuda), torch.randn(N, device=cuda)
    kw = dict(reduction="none", z_loss=1e-4, softcap=15.0)
    fast = _lce_all(lce_tri.linear_cross_entropy, h, w, t, g_loss, g_lp, **kw)
    monkeypatch.setattr(lce_tri, "hardware_tanh", lambda logits: False)
    exact = _lce_all(lce_tri.linear_cross_entropy, h, w, t, g_loss, g_lp, **kw)
    for i, (a, b) in enumerate(zip(exact, fast)):
        assert rel_err(a, b) < 1e-2, (i, rel_err(a, b))
