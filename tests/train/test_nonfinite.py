"""The non-finite locator names the first module whose output or gradient went NaN/Inf."""
import pytest
import torch
from torch import nn

from deepwish.train.nonfinite import NonFiniteError, locate_nonfinite, raise_nonfinite


class Explode(nn.Module):
    """Finite forward; its backward returns NaN when `bad`."""

    def __init__(self):
        super().__init__()
        self.bad = False

    def forward(self, x):
        bad = self.bad

        class F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t * 1.0

            @staticmethod
            def backward(ctx, g):
                return g * float("nan") if bad else g
        return F.apply(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), Explode(), nn.Linear(16, 16))
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        return self.out(torch.relu(self.body(self.inp(x)))).sum()


def test_forward_culprit_is_named():
    net = Net()
    with torch.no_grad():
        net.body[3].weight[0, 0] = float("inf")
    x = torch.randn(4, 8)
    where = locate_nonfinite(net, lambda: net(x))
    assert "forward output of module 'body.3'" in where and "Linear" in where
    assert all(p.grad is None for p in net.parameters())


def test_backward_culprit_is_named():
    net = Net()
    net.body[2].bad = True
    x = torch.randn(4, 8)
    assert torch.isfinite(net(x))
    where = locate_nonfinite(net, lambda: net(x))
    assert "backward of module 'body.2'" in where and "Explode" in where


def test_loss_only_and_no_reproduction():
    net = Net()
    x = torch.randn(4, 8)
    assert "loss computation" in locate_nonfinite(net, lambda: net(x) * float("inf"))
    assert "did not reproduce" in locate_nonfinite(net, lambda: net(x))


def test_raise_names_module_and_checkpoint():
    net = Net()
    with torch.no_grad():
        net.inp.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"step 7: loss \(nan\) is not finite.*module 'inp'.*ckpt/step_6"):
        raise_nonfinite(net, lambda: net(torch.randn(2, 8)), 7, "loss (nan)", "ckpt/step_6")
