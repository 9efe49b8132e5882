"""Gated feed-forward: down(act(gate(x)) * up(x)); SwiGLU when act is SiLU (every released
checkpoint of the supported families), but `hidden_act` may name any stateless activation HF's
`ACT2FN` offers, and dense MLPs, routed experts and shared experts all use it.

gate and up are one matrix `w_gate_up` [2·d_ff, d] (gate rows first) so the forward is two
matmuls, not three; the HF loader concatenates `gate_proj` and `up_proj` into it.

Activations are written out here as formulas, each the same arithmetic HF uses for that name
(an fp32 parity test compares every entry against `ACT2FN`). Several names are distinct
formulas with the same value up to rounding (`gelu_new`, `gelu_fast`, `gelu_pytorch_tanh`),
so each keeps its own. `prelu` and `xielu` carry learnable parameters inside the activation
and are refused (`UNSUPPORTED_ACTIVATIONS`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deepwish.kernels.gemv import Linear, takes_gemv

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh_cubic(x: torch.Tensor) -> torch.Tensor:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), the cubic spelled with pow."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_python_tanh(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _laplace(x: torch.Tensor, mu: float = 0.707107, sigma: float = 0.282095) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf((x - mu).div(sigma * math.sqrt(2.0))))


class _ReLUSquared(torch.autograd.Function):
    """y = relu(x)², whose backward reads y alone: dy·2·relu(x) = dy·2·√y. Autograd's own backward
    of the formula keeps relu(x) as well as y, which the next matmul keeps as its input anyway:
    one [tokens, d_ff] tensor written and held per layer that this saves (√ of the rounded y
    differs from relu(x) by under half an ulp of y's dtype)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.square(F.relu(x))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return dy * (2.0 * torch.sqrt(y))


def relu2(x: torch.Tensor) -> torch.Tensor:
    """relu(x)² (modded-nanogpt's ReLU², HF's ReLUSquaredActivation), saving only its output."""
    return _ReLUSquared.apply(x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,  # exact (erf) GELU
    "gelu_python": _gelu_erf,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_python_tanh": _gelu_python_tanh,
    "gelu_new": _gelu_tanh_cubic,
    "gelu_accurate": _gelu_tanh_cubic,
    "gelu_fast": _gelu_fast,
    "gelu_10": lambda x: torch.clip(F.gelu(x), -10.0, 10.0),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": relu2,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,  # negative slope 0.01, as nn.LeakyReLU()
    "hardswish": F.hardswish,
    "mish": F.mish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "linear": lambda x: x,
    "laplace": _laplace,
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
}
UNSUPPORTED_ACTIVATIONS = {
    "prelu": "its negative slope is a learnable parameter",
    "xielu": "its alpha_p/alpha_n are learnable parameters",
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function for `hidden_act=name`, or a ValueError naming the value."""
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    why = f" ({UNSUPPORTED_ACTIVATIONS[name]})" if name in UNSUPPORTED_ACTIVATIONS else ""
    raise ValueError(f"hidden_act={name!r} is not supported{why}; supported: {', '.join(ACTIVATIONS)}")


class MLP(nn.Module):
    """Ungated feed-forward down(act(up(x))): GPT-2's GELU MLP, or ReLU² (modded-nanogpt) with
    act='relu2'. Same parameter names as SwiGLU's halves, so roles and init read alike."""

    PARAM_ROLES = {"w_down.weight": "matrix_out"}  # writes into the residual stream (model/roles.py)

    def __init__(self, d_model: int, d_ff: int, act: str = "relu2"):
        super().__init__()
        self.d_ff = d_ff
        self.act_name = act
        self.act = activation(act)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.act(self.w_up(x)))


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)); `act` defaults to SiLU (SwiGLU proper).

    matmul / pdl / fusion: model.decode_matmul, decode_pdl, decode_fusion (config.py), the decode
    step's GEMV settings; with `fusion` the block's branch x + self(norm(x)) is two GEMVs
    (`residual_forward`)."""

    PARAM_ROLES = {"w_down.weight": "matrix_out"}  # writes into the residual stream (model/roles.py)
    FUSED_ACTIVATIONS = ("silu", "swish")  # the act(gate)·up epilogue of kernels/gemv

    def __init__(self, d_model: int, d_ff: int, act: str = "silu", matmul: str = "torch", pdl: bool | str = False,
                 fusion: bool = False):
        super().__init__()
        self.d_ff = d_ff
        self.act_name = act
        self.act = activation(act)
        self.matmul = matmul
        self.fusion = fusion and act in self.FUSED_ACTIVATIONS
        self.w_gate_up = Linear(d_model, 2 * d_ff, bias=False, backend=matmul, pdl=pdl)
        self.w_down = Linear(d_ff, d_model, bias=False, backend=matmul, pdl=pdl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(self.act(gate) * up)

    def residual_forward(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor | None:
        """x + self(norm(x)) in two launches where the decode step's GEMV serves both matmuls: the
        RMSNorm in gate/up's prologue, the activation in its epilogue, the add in down's epilogue
        (kernels/gemv); None where it does not (the caller composes the ops: model/block.py)."""
        w_gu, w_down = self.w_gate_up.weight, self.w_down.weight
        if not (self.fusion and takes_gemv(x, w_gu, self.matmul) and x.dtype == w_down.dtype):
            return None
        from deepwish.kernels.gemv.triton import gemv
        pdl = self.w_down.pdl
        a = gemv(x, w_gu, norm=(norm.weight, norm.eps, norm.zero_centered), glu=True, pdl=pdl)
        return gemv(a, w_down, residual=x, pdl=pdl)
