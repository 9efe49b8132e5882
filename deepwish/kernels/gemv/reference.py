"""y = x Wᵀ (+ b), the readable reference: x [M, K], W [N, K], b [N] -> [M, N], in fp32, cast to x's
dtype; with the kernel's optional prologue (an RMSNorm of x) and epilogues (SwiGLU's silu(gate)·up
of a gate/up projection, a residual add), each rounded where the separate ops round (model/norm.py rms_norm,
model/mlp.py SwiGLU, model/block.py's x + h). The kernel applies the norm's scale after the
product and does not round x̂ on the way: within x's rounding of this."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm: tuple[torch.Tensor, float, bool] | None = None, glu: bool = False,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """norm = (w [K], eps, zero_centered); glu: weight is [2N, K] = [W_gate; W_up], the output
    silu(gate)·up [..., N]; residual [..., N]."""
    dt = x.dtype
    if norm is not None:
        w, eps, zero_centered = norm
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        x = (xf * (1.0 + w.float())).to(dt) if zero_centered else (w.float() * xf.to(dt).float()).to(dt)
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    if glu:  # model/mlp.py SwiGLU: the projection's output in x's dtype, then silu(gate)·up
        gate, up = y.to(dt).float().chunk(2, dim=-1)
        y = F.silu(gate).to(dt).float() * up
    if residual is not None:
        y = residual.float() + y.to(dt).float()
    return y.to(dt)
