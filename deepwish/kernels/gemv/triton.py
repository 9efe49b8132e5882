"""Matrix-vector products for decoding, in Triton: y = x Wᵀ (+ b) for x [M, K] with M <= 16 rows
(one decode step of a batch of 1..16), W [N, K] row-major, b [N]; same semantics as
`reference.gemv` (fp32 accumulation, output in x's dtype).

Why: at batch 1 every projection of a decode step is a GEMV, bound by reading W once. cuBLAS
runs them with GEMM tiles that leave most of the bandwidth unused (H200 profile of the
Qwen3-0.6B step, bench decode_profile: q/k/v at 0.3-0.5 TB/s of 4.2). Here each program owns BN
rows of W and streams them once along K, BK columns at a time; BN is small enough that N / BN
programs cover every SM. One row (M = 1) is a broadcast multiply and a row sum (no tensor cores
needed: the work per byte is one FMA); 2..16 rows use one tl.dot per tile, x padded to 16 rows.
Tiles are autotuned per (N, K) at the first call, which must come before CUDA-graph capture (the
captured step's warm-up does that).
Deviation from cuBLAS: another summation order, so results differ in the last bits (not in
meaning: fp32 accumulation in both).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if _INTERPRET:
    _ONE_ROW = [triton.Config({"BN": 4, "BK": 16}, num_warps=1)]
    _ROWS = [triton.Config({"BN": 16, "BK": 16}, num_warps=1)]
else:
    _ONE_ROW = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
                for bn, bk, w, s in ((4, 512, 4, 4), (8, 256, 4, 4), (8, 512, 4, 3), (16, 256, 4, 3),
                                     (16, 512, 8, 3), (32, 256, 8, 3), (32, 128, 4, 4), (64, 128, 8, 3))]
    _ROWS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
             for bn, bk, w, s in ((16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 3), (32, 64, 4, 4),
                                  (64, 64, 4, 3), (64, 128, 8, 3))]


@triton.autotune(configs=_ONE_ROW, key=["N", "K"])
@triton.jit
def _one_row_kernel(X, W, Bias, Y, N, K, s_wn, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = rn < N
    w_rows = W + tl.cast(rn, tl.int64)[:, None] * s_wn
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(X + rk, mask=k_ok, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + rn, acc.to(Y.dtype.element_ty), mask=n_ok)


@triton.autotune(configs=_ROWS, key=["N", "K"])
@triton.jit
def _rows_kernel(X, W, Bias, Y, M, N, K, s_xm, s_wn, s_ym, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr):
    BM: tl.constexpr = 16
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    n_ok = rn < N
    m_ok = rm < M
    w_rows = W + tl.cast(rn, tl.int64)[:, None] * s_wn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(X + rm[:, None] * s_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # bf16/fp16 values are exact in tf32: the tf32 dot of the upcast tiles multiplies them exactly
        acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * s_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (at most 16 rows in all), weight [N, K], bias [N] or None -> [..., N] in x's dtype."""
    K = x.shape[-1]
    N = weight.shape[0]
    M = x.numel() // max(K, 1)
    if weight.dim() != 2 or weight.shape[1] != K or (bias is not None and tuple(bias.shape) != (N,)):
        raise ValueError(f"gemv: x [..., {K}] needs weight [N, {K}] and bias [N]; got weight {tuple(weight.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    if not 1 <= M <= 16:
        raise ValueError(f"gemv: serves 1..16 rows, got {M} (use F.linear)")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"gemv: x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}")
    if not _INTERPRET and not x.is_cuda:
        raise ValueError("gemv: the Triton kernel needs CUDA tensors (use reference.gemv)")
    y = _gemv_op(x.reshape(M, K).contiguous(), weight if weight.stride(1) == 1 else weight.contiguous(), bias)
    return y.reshape(*x.shape[:-1], N)


@torch.library.custom_op("deepwish::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    b = bias if bias is not None else y  # a placeholder pointer, never read
    grid = lambda meta: (triton.cdiv(N, meta["BN"]),)  # noqa: E731
    if M == 1:
        _one_row_kernel[grid](x, weight, b, y, N, K, weight.stride(0), HAS_BIAS=bias is not None)
    else:
        _rows_kernel[grid](x, weight, b, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
                           HAS_BIAS=bias is not None, PREC="ieee" if x.dtype == torch.float32 else "tf32")
    return y


@_gemv_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])
