"""y = x Wᵀ (+ b), the readable reference: x [M, K], W [N, K], b [N] -> [M, N], in fp32, cast to x's
dtype; with the kernel's optional prologue (an RMSNorm of x, or SwiGLU's silu(gate)·up) and
epilogue (a residual add), each rounded where the separate ops round (model/norm.py rms_norm,
model/mlp.py SwiGLU, model/block.py's x + h). The kernel applies the norm's scale after the
product and does not round x̂ on the way: within x's rounding of this."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm: tuple[torch.Tensor, float, bool] | None = None, gated: bool = False,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """norm = (w [K], eps, zero_centered); gated: x is [..., 2K] = [gate | up]; residual [..., N]."""
    dt = x.dtype
    if norm is not None:
        w, eps, zero_centered = norm
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        x = (xf * (1.0 + w.float())).to(dt) if zero_centered else (w.float() * xf.to(dt).float()).to(dt)
    if gated:
        gate, up = x.float().chunk(2, dim=-1)
        x = (F.silu(gate).to(dt).float() * up).to(dt)
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    if residual is not None:
        y = residual.float() + y.to(dt).float()
    return y.to(dt)
