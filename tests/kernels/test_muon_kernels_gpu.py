"""Muon's Triton kernels on a GPU in bf16 (autotuned tiles, whole-tile shapes) against the reference
and the torch backend."""
import pytest
import torch
from torch import nn

from deepwish.kernels.muon import reference as ref
from deepwish.kernels.muon import triton as tri
from deepwish.train.muon import Muon, newton_schulz

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("transposed", [False, True])
def test_gram_and_update_in_bf16(cuda, rel_err, transposed):
    P = (torch.randn(4, 768, 256, device=cuda).mT if transposed else torch.randn(4, 256, 768, device=cuda)).bfloat16()
    s = torch.rand(4, device=cuda) + 0.5
    A = tri.gram(P, scale=s)
    assert rel_err(ref.gram(P, scale=s, out_dtype=torch.float32), A) < 1e-2
    assert torch.equal(A[:, :128, 128:], A[:, 128:, :128].mT)
    B = tri.gram(A, alpha=2.0, beta=-4.0, Y=A)
    assert rel_err(ref.gram(A, 2.0, -4.0, A, out_dtype=torch.float32), B) < 1e-2
    X = torch.randn(4, 256, 768, device=cuda).bfloat16()
    out = tri.ns_update(B, X, X, 3.4, scale=s)
    want = (s.view(-1, 1, 1) * (3.4 * X.float() + B.float() @ X.float()))
    assert rel_err(want, out) < 1e-2


@pytest.mark.parametrize("shape", [(8, 512, 1536), (8, 1536, 512), (16, 256, 256)])
def test_newton_schulz_triton_matches_torch_in_bf16(cuda, shape):
    """Both backends against the fp64 iteration: the same bf16 noise."""
    from deepwish.train.muon import ns_coefficients
    G = torch.randn(*shape, device=cuda).bfloat16()
    E = G.double() / G.double().norm(dim=(-2, -1), keepdim=True)
    for a, b, c in ns_coefficients("jordan", 5)[0]:
        A = E @ E.mT
        E = a * E + (b * A + c * A @ A) @ E

    def err(x):
        return float((x.double() - E).norm() / E.norm())
    old, new = newton_schulz(G, backend="torch"), newton_schulz(G, backend="triton")  # NS_KERNELS auto
    assert new.dtype == G.dtype and new.shape == G.shape
    assert err(old) < 0.03 and err(new) < 1.2 * err(old) + 1e-3, (err(old), err(new))
    coeffs, f = ns_coefficients("jordan", 5)
    for kernels in ("all", "gram", "gram_ns"):
        out = tri.newton_schulz(G, coeffs, f, 1e-7, torch.bfloat16, kernels=kernels)
        assert err(out) < 1.2 * err(old) + 1e-3, (kernels, err(old), err(out))


@pytest.mark.parametrize("kernels", ["all", "gram", "gram_ns", "auto"])  # all: the last iteration updates the parameters
def test_muon_step_triton_matches_torch_on_gpu(cuda, monkeypatch, kernels):
    monkeypatch.setattr(tri, "NS_KERNELS", kernels)
    shapes = [(256, 128), (128, 256), (256, 128), (4, 96, 160), (128, 256)]
    a = [nn.Parameter(torch.randn(s, device=cuda)) for s in shapes]
    b = [nn.Parameter(x.detach().clone()) for x in a]
    x0 = [x.detach().clone() for x in a]
    oa = Muon(a, lr=0.05, weight_decay=0.1, backend="torch")
    ob = Muon(b, lr=0.05, weight_decay=0.1, backend="triton")
    for _ in range(3):
        for x, y in zip(a, b):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        oa.step()
        ob.step()
    for x, y, z in zip(a, b, x0):
        d = (x.detach() - y.detach()).norm() / (x.detach() - z).norm()  # relative to the update itself
        assert d < 3e-2, (tuple(x.shape), float(d))


def test_warm_up_leaves_no_timing_to_the_first_step(cuda, monkeypatch):
    """Muon.warm_up (train.compile_warmup) times the Newton–Schulz choice of every shape bucket on
    scratch tensors; the first real step then picks nothing new, and it still updates."""
    monkeypatch.setattr(tri, "_PICKED", {})
    shapes = [(256, 128), (128, 256), (256, 128), (4, 96, 160)]
    ps = [nn.Parameter(torch.randn(s, device=cuda)) for s in shapes]
    before = [p.detach().clone() for p in ps]
    opt = Muon(ps, lr=0.05, backend="triton")
    assert opt.warm_up() == 3 and not opt.state
    picked = dict(tri._PICKED)
    assert len(picked) == 3  # one timed choice per stack shape
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)
        p.grad = torch.randn_like(p)
    opt.step()
    assert tri._PICKED == picked
    assert all(not torch.equal(p.detach(), b) for p, b in zip(ps, before))
