"""y = x Wᵀ (+ b), the readable reference: x [M, K], W [N, K], b [N] -> [M, N], in fp32, cast to x's dtype."""
from __future__ import annotations

import torch


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
