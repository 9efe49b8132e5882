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

__all__ = ["reference", "linear", "Linear", "takes_gemv", "max_rows", "MAX_ROWS", "MAX_ROWS_CAPTURED"]

# Rows of x the kernel serves in a decode step (a batch of that many sequences); more rows are a
# GEMM for cuBLAS. Measured on one H100 (2026-12-06, bench/decode_tiles --parts step, Qwen3-0.6B in
# bf16, context 512, ms a step, cuBLAS -> the rows kernel for every projection, its fusions in):
# captured, batch 64: 3.794 -> 3.192; compiled and captured, batch 64: 2.646 -> 3.099. Compiled, the
# compiler folds the norms, SwiGLU and adds into kernels it already runs beside cuBLAS, while the
# kernel's norm prologue costs more at 64 rows than the product itself (every program redoes it:
# q/k/v 11.4 µs against 6.2 without it); without the compiler those ops are launches of their own.
MAX_ROWS = 16  # compiled, or 4-byte values (an fp32 model's steps: not measured past 16 rows)
MAX_ROWS_CAPTURED = 64  # bf16/fp16 values, not compiled (eager, or captured in a CUDA graph)


def max_rows(x: torch.Tensor) -> int:
    """The row limit for x where the call is made (compiled or not)."""
    return MAX_ROWS_CAPTURED if x.element_size() == 2 and not torch.compiler.is_compiling() else MAX_ROWS


def takes_gemv(x: torch.Tensor, weight: torch.Tensor, backend: str) -> bool:
    """Whether x Wᵀ runs through the Triton GEMV: an inference matmul of at most `max_rows(x)` rows
    in the weight's dtype, one token per sequence ([B, 1, K], or rows [M, K]), and backend 'triton'
    (on CUDA, or under TRITON_INTERPRET=1) or 'auto' (on CUDA only: the interpreter is for testing
    the kernel, never a default). Training, prefill (a short prompt
    is a few rows too) and larger batches stay on F.linear (cuBLAS): the option concerns the decode
    step only, where cuBLAS's tiles leave most of the bandwidth unused, and each new row count would
    cost the kernel an autotuning pass of its own (seconds) at first use."""
    return (backend != "torch" and not torch.is_grad_enabled() and x.dtype == weight.dtype
            and 0 < x.numel() <= max_rows(x) * x.shape[-1] and (x.dim() < 3 or x.shape[-2] == 1)
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
