"""RMSNorm, the only normalisation these architectures use.

`zero_centered=True` is Qwen3-Next's form: the weight is stored as an offset from one,
y = x̂·(1 + w), initialised at w = 0 (so weight decay pulls towards identity). Statistics are
computed in fp32 whatever the input dtype, as the reference implementations do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """x̂·w (or x̂·(1 + w)) over the last dim, statistics in fp32, returned in x's dtype; weight
    broadcasts against x (e.g. one [H, D] row per head).

    x's dtype, not the promoted one: under autocast the weight is an fp32 parameter and x a bf16
    activation, and w·x̂ in fp32 would make every consumer that is not a matmul (rotary after
    QK-norm) run, save and take its gradient in fp32. A matmul consumer gets the same bf16 values
    either way (autocast rounds the fp32 product the same), and the weight's gradient is still
    summed in fp32 (the cast's backward hands it fp32)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centered:
        return (xf * (1.0 + weight.float())).type_as(x)
    return (weight * xf.type_as(x)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.zero_centered)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.zero_centered else nn.init.ones_(self.weight)


class EmbedNorm(nn.Module):
    """RMS normalisation without a weight: the GPT family's x0 = norm(embed(ids)) (model.embed_norm,
    as modded-nanogpt). A module, so that training compiles it with the blocks."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps)
