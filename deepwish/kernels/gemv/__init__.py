"""Decode-sized matmuls y = x Wᵀ (+ b) for a few rows of x: `reference` (pure torch, the CPU path
and test oracle) and `triton` (one pass over W with every SM busy; optionally with the block's
norm, SwiGLU activation or residual add fused in). `linear` dispatches by the model's
`decode_matmul` setting (config.py); `Linear` is an nn.Linear that calls it, so a model's
projections stay modules (hooks, FSDP, adapters that wrap or replace them see every call)."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepwish.kernels.gemv import reference

__all__ = ["reference", "linear", "Linear", "takes_gemv", "MAX_ROWS"]

MAX_ROWS = 16  # rows of x the kernel serves (a batch-1..16 decode step); more rows are a GEMM


def takes_gemv(x: torch.Tensor, weight: torch.Tensor, backend: str) -> bool:
    """Whether x Wᵀ runs through the Triton GEMV: an inference matmul of at most MAX_ROWS rows in
    the weight's dtype, one token per sequence ([B, 1, K], or rows [M, K]), and backend 'triton'
    (on CUDA, or under TRITON_INTERPRET=1) or 'auto' (on CUDA only: the interpreter is for testing
    the kernel, never a default). Training, prefill (a short prompt
    is a few rows too) and large batches stay on F.linear (cuBLAS): the option concerns the decode
    step only, where cuBLAS's tiles leave most of the bandwidth unused, and each new row count would
    cost the kernel an autotuning pass of its own (seconds) at first use."""
    return (backend != "torch" and not torch.is_grad_enabled() and x.dtype == weight.dtype
            and 0 < x.numel() <= MAX_ROWS * x.shape[-1] and (x.dim() < 3 or x.shape[-2] == 1)
            and (x.is_cuda or (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1")))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str = "torch", pdl: bool | str = False) -> torch.Tensor:
    """F.linear(x, weight, bias), through the Triton GEMV where `takes_gemv` says so (pdl: launched
    with programmatic dependent launch, model.decode_pdl)."""
    if takes_gemv(x, weight, backend):
        from deepwish.kernels.gemv.triton import gemv
        return gemv(x, weight, bias, pdl=pdl)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose decode-sized inference matmuls take `backend` (model.decode_matmul) and
    `pdl` (model.decode_pdl); the same parameters, names and state dict as nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, backend: str = "torch",
                 pdl: bool | str = False, **kw):
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.backend = backend
        self.pdl = pdl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.backend, self.pdl)

    def extra_repr(self) -> str:
        return (super().extra_repr() + (f", backend={self.backend}" if self.backend != "torch" else "")
                + (f", pdl={self.pdl}" if self.pdl not in (False, "off") else ""))
