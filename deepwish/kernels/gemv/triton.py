"""Matrix-vector products for decoding, in Triton: y = x Wᵀ (+ b) for x [M, K] with M <= 64 rows
(one decode step of a batch of 1..64), W [N, K] row-major, b [N]; same semantics as
`reference.gemv` (fp32 accumulation, output in x's dtype), including its optional prologue and
epilogue.

Why: at batch 1 every projection of a decode step is a GEMV, bound by reading W once. cuBLAS
runs them with GEMM tiles that leave most of the bandwidth unused (H200 profile of the
Qwen3-0.6B step, bench decode_profile: q/k/v at 0.3-0.5 TB/s of 4.2). Here each program owns BN
rows of W and streams them once along K, BK columns at a time; BN is small enough that N / BN
programs cover every SM. One row (M = 1) is a broadcast multiply and a row sum (no tensor cores
needed: the work per byte is one FMA); 2..64 rows use one tl.dot per tile, x padded to 16, 32 or 64
rows (BM). At 17..64 rows (a batch-64 decode step) cuBLAS's GEMM tiles are few for these shapes (a
64 x 128 tile: 32 programs for N = 4096) and leave most of the bandwidth unused too (H200 profile,
Qwen3-0.6B batch 64: its projections at ~37% of the copy bandwidth); here N / BN programs stream W
once whatever the row count. Which row counts the model sends here is `MAX_ROWS_CAPTURED` and
`MAX_ROWS` (kernels/gemv max_rows), set from measurement; the kernel itself takes up to
KERNEL_MAX_ROWS.
Tiles are autotuned per (N, K) at the first call, which must come before CUDA-graph capture (the
captured step's warm-up does that), except at the shapes of IN_STEP_TILES: there the one-row
kernel takes the tiles measured as the step runs them (bench/decode_tiles: a launch per layer back
to back in one CUDA graph, under PDL). Autotuning times one launch alone, where no kernel before it
overlaps its first loads; in the step, fewer rows a program with longer K tiles win at N = 1024
(H200, Qwen3-0.6B's o and down projections: 3.34 -> 2.46 and 4.89 -> 3.81 µs a launch).

Fusions (model.decode_fusion; reference.gemv spells out each one's arithmetic). Every program
reads all of x anyway, so work on x costs no launch and no traffic worth counting:
- `norm`: the RMSNorm that precedes the projection (the block's pre-norm): the weight multiplies x
  as it is read, the statistics accumulate in the same pass, and each output is scaled by
  rsqrt(mean(x²) + eps) at the end (the scale is one number a row: it commutes with the product);
- `glu`: W holds [W_gate; W_up] (2N rows) and the output is silu(x W_gateᵀ)·(x W_upᵀ), SwiGLU in
  the gate/up projection's epilogue: each program takes gate row j and up row j together (two
  accumulators), so the activation runs once an output. (It ran first in the down projection's
  prologue, where every program recomputed all of silu(gate)·up from [gate | up]: free at one row,
  but at 8 rows the down projection took 23.7 µs where the product alone takes 7.6, one H100,
  2026-12-06, bench/decode_tiles --parts rows);
- `residual`: y + r, the block's residual add, in the epilogue.
Compiled, each of these was a kernel of its own a layer (the add and the norm one, the SwiGLU one).

PDL (`pdl`, model.decode_pdl; kernels/pdl.py): each program loads its first tile of W (weights:
nothing in the step writes them) before it waits for the previous kernel's writes and reads x,
and (PREFETCH, where W's rows are contiguous and 16-byte aligned) first sends the whole of its
rows of W towards L2 with one bulk prefetch, so the loads after the wait find them there: the
weights stream in while the kernel before still runs.

Deviation from cuBLAS: another summation order, so results differ in the last bits (not in
meaning: fp32 accumulation in both).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from deepwish.kernels.grid import arrive_last, counters, reset_count, sm_count
from deepwish.kernels.pdl import launch_options, prefetch_to_l2, setting, wait_for_inputs

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
                                  (64, 64, 4, 3), (64, 128, 8, 3), (16, 256, 8, 4), (32, 256, 8, 3))]

KERNEL_MAX_ROWS = 64  # the rows kernel pads x to BM = 16, 32 or 64 rows
# the rows kernel's tensor-core operands for 2-byte x: "native" (x's tile in x's dtype, W's as
# loaded: exact for a plain x, one rounding of the norm's w·x, as the separate norm rounds
# x̂) or "tf32" (both converted to fp32 first: W's conversion costs an instruction a weight).
# bench/decode_tiles --parts rows, one H100, 2026-12-06, Qwen3-0.6B's projections at 8..64 rows:
# native as fast or faster in all 40 cases (o + residual at 8 rows: 6.29 -> 4.31 µs)
ROWS_DOT = "native"
# The rows kernel with K cut into slices (grid axis 1), for shapes whose N / BN programs leave SMs
# idle: Qwen3-0.6B's o and down projections (N = 1,024) run 64 programs at BN = 16 and reach 25-35%
# of copy at 8-64 rows (one H100, 2026-12-06, bench/decode_tiles --parts rows; cuBLAS the same).
# Slices bring the grid to about ROWS_SPLIT_PER_SM programs a SM, at most ROWS_SPLIT_MAX of them; the
# last program of each N tile adds the partials up (kernels/grid.py) and applies the epilogue.
# Off: timed mixed (one H100, 2026-12-07, reports/inference.md): the captured batch-64 step 3.007 ms
# against 3.162, the compiled batch-8 step 1.687 against 1.576.
ROWS_SPLIT_K = False
ROWS_SPLIT_MAX = 4
ROWS_SPLIT_PER_SM = 2
ROWS_SPLIT_COUNTERS = 1 << 14  # N tiles the counts cover (N <= 262,144 at BN = 16)
# The norm prologue's statistics in the rows kernel: a [BM, BK] fp32 tile of squares carried to the
# end (as shipped), or summed a row per tile (ROWS_NORM_ROW_SUMS: [BM] values carried, a reduction
# a tile). At 64 rows the norm prologue doubled q/k/v and gate/up (one H100, 2026-12-06: 11.4 and
# 14.0 µs against 6.2 and 7.1 without the norm); the carried tile is 64 registers a thread there.
# Off: no gain measured (one H100, 2026-12-07, reports/inference.md: the captured steps at batch 8
# and 64 within 0.6% of the shipped form; with the K split, the compiled batch-8 step 1.7% faster).
ROWS_NORM_ROW_SUMS = False


def _k_slices(N: int, K: int, BN: int, BK: int, device: torch.device) -> int:
    """Slices of K for the rows kernel: enough for ROWS_SPLIT_PER_SM programs a SM, at most
    ROWS_SPLIT_MAX and one K tile each, none empty."""
    tiles = triton.cdiv(K, BK)
    want = min(ROWS_SPLIT_MAX, tiles, max(1, triton.cdiv(ROWS_SPLIT_PER_SM * sm_count(device), triton.cdiv(N, BN))))
    return triton.cdiv(tiles, triton.cdiv(tiles, want))


# (N, K) -> (BN, BK, warps, stages) of the one-row kernel for 2-byte weights, measured in the step
# where it differs from the tile autotuned alone (python -m deepwish.bench.decode_tiles, one H200,
# 2026-12-05, qwen3_0.6b with decode_fusion, decode_pdl and the L2 prefetch on; µs a launch, autotuned
# alone -> this, in one run): o + residual 3.34 -> 2.46, down + SwiGLU + residual 4.89 -> 3.81
# (q/k/v and gate/up: no tile beat the autotuned one beyond the run-to-run noise; the LM head runs
# on cuBLAS in the model, already at the copy bandwidth). The captured, compiled step: 0.900 ->
# 0.846 ms. Other shapes are autotuned; USE_IN_STEP_TILES = False autotunes these too. The down
# projection's entry was measured with SwiGLU in its prologue, where it is a plain product now
# (the step with every tile autotuned alone, one H100, 2026-12-06: 1.003 ms against 0.923 shipped).
IN_STEP_TILES = {(1024, 2048): (2, 2048, 8, 1), (1024, 3072): (4, 1024, 8, 2)}
USE_IN_STEP_TILES = True


def _in_step_tiles(configs, named_args, **kwargs):
    """The autotuner's pruning hook: IN_STEP_TILES' entry for this (N, K), else every config."""
    pick = IN_STEP_TILES.get((named_args["N"], named_args["K"])) if USE_IN_STEP_TILES else None
    if pick is None or named_args["W"].element_size() != 2:
        return configs
    bn, bk, w, s = pick
    return [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)]


NORM_NONE, NORM_PLAIN, NORM_ZERO_CENTERED = 0, 1, 2  # the NORM constexpr (model/norm.py's two forms)
# under PDL, each program's rows of W sent to L2 before the wait (kernels/pdl.py prefetch_to_l2);
# bench/decode_tiles times the GEMVs with it and without
PREFETCH_UNDER_PDL = True


@triton.jit
def _x_tile(x_ptrs, mask, NW, rk, K, NORM: tl.constexpr):
    """(x's tile as the product reads it, in fp32; its squares, for the norm's statistics).

    The norm is applied after the product: W(w ⊙ x̂) = rsqrt(mean(x²) + eps) · W(w ⊙ x), so the
    statistics accumulate in the same pass over x as the product (no first pass, no wait for it)
    and the kernel scales each output at the end. Unlike the separate ops, x̂ is not rounded to x's
    dtype on the way (fp32 throughout: nearer the exact norm, not bit-equal to model/norm.py)."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    sq = x * x
    if NORM == 1:  # w·x
        x = x * tl.load(NW + rk, mask=rk < K, other=0.0).to(tl.float32)
    elif NORM == 2:  # x·(1 + w), Qwen3-Next's zero-centred weight
        x = x * (1.0 + tl.load(NW + rk, mask=rk < K, other=0.0).to(tl.float32))
    return x, sq


@triton.jit
def _glu(gate, up, dt: tl.constexpr):
    """silu(gate)·up as the separate ops round it: the projection's outputs in x's dtype, silu's
    in x's dtype (F.silu's), the product in x's dtype; returned in fp32."""
    g = gate.to(dt).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    return (a * up.to(dt).to(tl.float32)).to(dt).to(tl.float32)


@triton.jit
def _prefetch_rows(W, N, K, s_wn, BN: tl.constexpr, GLU: tl.constexpr):
    """This program's BN rows of W (contiguous: s_wn == K; GLU: and the BN up rows N further on)
    on their way to L2 (kernels/pdl.py)."""
    n0 = tl.program_id(0) * BN
    rows = tl.minimum(N - n0, BN)
    nbytes = rows * K * (W.dtype.element_ty.primitive_bitwidth // 8)
    prefetch_to_l2(W + tl.cast(n0, tl.int64) * s_wn, nbytes)
    if GLU:
        prefetch_to_l2(W + tl.cast(n0 + N, tl.int64) * s_wn, nbytes)


@triton.autotune(configs=_ONE_ROW, key=["N", "K", "NORM", "GLU"], prune_configs_by={"early_config_prune": _in_step_tiles})
@triton.jit
def _one_row_kernel(X, W, Bias, NW, R, Y, N, K, eps, s_wn, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                    GLU: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr):
    """N outputs (GLU: W has 2N rows, gate then up)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = rn < N
    if PREFETCH:
        _prefetch_rows(W, N, K, s_wn, BN, GLU)
    w_rows = W + tl.cast(rn, tl.int64)[:, None] * s_wn
    u_rows = w_rows + tl.cast(N, tl.int64) * s_wn  # GLU's up rows
    rk = tl.arange(0, BK)
    first_ok = n_ok[:, None] & (rk < K)[None, :]
    w_first = tl.load(w_rows + rk[None, :], mask=first_ok, other=0.0)
    if GLU:
        u_first = tl.load(u_rows + rk[None, :], mask=first_ok, other=0.0)
    wait_for_inputs(PDL)
    x, ss = _x_tile(X + rk, rk < K, NW, rk, K, NORM)
    acc = tl.sum(w_first.to(tl.float32) * x[None, :], axis=1)
    if GLU:
        acc_u = tl.sum(u_first.to(tl.float32) * x[None, :], axis=1)
    for k0 in range(BK, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        tile_ok = n_ok[:, None] & k_ok[None, :]
        w = tl.load(w_rows + rk[None, :], mask=tile_ok, other=0.0)
        x, sq = _x_tile(X + rk, k_ok, NW, rk, K, NORM)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if GLU:
            acc_u += tl.sum(tl.load(u_rows + rk[None, :], mask=tile_ok, other=0.0).to(tl.float32) * x[None, :], axis=1)
        if NORM != 0:
            ss += sq
    if NORM != 0:
        scale = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
        acc *= scale
        if GLU:
            acc_u *= scale
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)
    if GLU:
        acc = _glu(acc, acc_u, Y.dtype.element_ty)
    if RESIDUAL:  # x + h.to(x.dtype), as the block adds
        r = tl.load(R + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc = r + acc.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + rn, acc.to(Y.dtype.element_ty), mask=n_ok)


@triton.jit
def _dot_tile(x, w, acc, PREC: tl.constexpr):
    """acc + x wᵀ for x [BM, BK] in fp32 (as _x_tile gives it) and w [BN, BK] as loaded: PREC
    "native" multiplies in w's dtype, "tf32"/"ieee" in fp32 (bf16/fp16 values are exact in tf32;
    the norm's w·x is not, tf32 rounds it about as x's dtype would)."""
    if PREC == "native":
        return tl.dot(x.to(w.dtype), tl.trans(w), acc, out_dtype=tl.float32)
    else:
        return tl.dot(x, tl.trans(w.to(tl.float32)), acc, input_precision=PREC)


@triton.jit
def _rows_epilogue(acc, acc_u, ss, rm, rn, m_ok, n_ok, Bias, R, Y, K, eps, s_rm, s_ym, HAS_BIAS: tl.constexpr,
                   NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr):
    """The rows kernel's outputs from its sums over all of K: acc (and GLU's acc_u) [BM, BN], ss [BM]
    the rows' sums of squares (NORM)."""
    if NORM != 0:
        scale = tl.rsqrt(ss / K + eps)[:, None]
        acc *= scale
        if GLU:
            acc_u *= scale
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GLU:
        acc = _glu(acc, acc_u, Y.dtype.element_ty)
    out_ok = m_ok[:, None] & n_ok[None, :]
    if RESIDUAL:
        r = tl.load(R + rm[:, None] * s_rm + rn[None, :], mask=out_ok, other=0.0).to(tl.float32)
        acc = r + acc.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + rm[:, None] * s_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=out_ok)


@triton.autotune(configs=_ROWS, key=["N", "K", "NORM", "GLU", "BM", "PREC", "SPLIT", "ROW_SUMS"])
@triton.jit
def _rows_kernel(X, W, Bias, NW, R, Y, WS, WSS, CNT, M, N, K, eps, s_xm, s_wn, s_rm, s_ym, HAS_BIAS: tl.constexpr,
                 NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
                 PREFETCH: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr, SMAX: tl.constexpr,
                 ROW_SUMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """M <= BM rows, N outputs (GLU: W has 2N rows, gate then up). SPLIT: grid axis 1 cuts K into
    num_programs(1) <= SMAX slices; each program stores its partial sums in WS (fp32 [2, SMAX, BM, N])
    and WSS (the squares' row sums, [N tiles, SMAX, BM]) and the last one of its N tile to finish
    (CNT, kernels/grid.py) adds them up in slice order and writes the outputs. ROW_SUMS (NORM): the
    squares summed a row per tile ([BM] values carried), not kept as a [BM, BK] tile to the end."""
    pid_n = tl.program_id(0)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    n_ok = rn < N
    if SPLIT:
        S = tl.num_programs(1)
        part = tl.program_id(1)
        per = tl.cdiv(tl.cdiv(K, BK), S) * BK
        k_lo = part * per
        k_hi = tl.minimum(K, k_lo + per)
    else:
        k_lo = 0
        k_hi = K
    if PREFETCH:
        _prefetch_rows(W, N, K, s_wn, BN, GLU)
    m_ok = rm < M
    w_rows = W + tl.cast(rn, tl.int64)[:, None] * s_wn
    u_rows = w_rows + tl.cast(N, tl.int64) * s_wn  # GLU's up rows
    x_rows = X + rm[:, None] * s_xm
    rk = k_lo + tl.arange(0, BK)
    first_ok = n_ok[:, None] & (rk < k_hi)[None, :]
    w_first = tl.load(w_rows + rk[None, :], mask=first_ok, other=0.0)
    if GLU:
        u_first = tl.load(u_rows + rk[None, :], mask=first_ok, other=0.0)
    wait_for_inputs(PDL)
    x, ss = _x_tile(x_rows + rk[None, :], m_ok[:, None] & (rk < k_hi)[None, :], NW, rk[None, :], K, NORM)
    if ROW_SUMS:
        ss = tl.sum(ss, axis=1)
    acc = _dot_tile(x, w_first, tl.zeros((BM, BN), dtype=tl.float32), PREC)
    acc_u = acc
    if GLU:
        acc_u = _dot_tile(x, u_first, tl.zeros((BM, BN), dtype=tl.float32), PREC)
    for k0 in range(k_lo + BK, k_hi, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < k_hi
        tile_ok = n_ok[:, None] & k_ok[None, :]
        w = tl.load(w_rows + rk[None, :], mask=tile_ok, other=0.0)
        x, sq = _x_tile(x_rows + rk[None, :], m_ok[:, None] & k_ok[None, :], NW, rk[None, :], K, NORM)
        acc = _dot_tile(x, w, acc, PREC)
        if GLU:
            acc_u = _dot_tile(x, tl.load(u_rows + rk[None, :], mask=tile_ok, other=0.0), acc_u, PREC)
        if NORM != 0:
            if ROW_SUMS:
                ss += tl.sum(sq, axis=1)
            else:
                ss += sq
    if ROW_SUMS:
        ss_rows = ss
    else:
        ss_rows = tl.sum(ss, axis=1)
    if SPLIT:
        at = (part * BM + rm)[:, None] * N + rn[None, :]
        tl.store(WS + at, acc, mask=n_ok[None, :])
        if GLU:
            tl.store(WS + SMAX * BM * N + at, acc_u, mask=n_ok[None, :])
        if NORM != 0:
            tl.store(WSS + (pid_n * SMAX + part) * BM + rm, ss_rows)
        if arrive_last(CNT, pid_n, S):  # the last slice of this N tile: every partial, in slice order (.cg)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            acc_u = acc
            ss_rows = tl.zeros((BM,), dtype=tl.float32)
            for t in range(0, S):
                at = (t * BM + rm)[:, None] * N + rn[None, :]
                acc += tl.load(WS + at, mask=n_ok[None, :], other=0.0, cache_modifier=".cg")
                if GLU:
                    acc_u += tl.load(WS + SMAX * BM * N + at, mask=n_ok[None, :], other=0.0, cache_modifier=".cg")
                if NORM != 0:
                    ss_rows += tl.load(WSS + (pid_n * SMAX + t) * BM + rm, cache_modifier=".cg")
            _rows_epilogue(acc, acc_u, ss_rows, rm, rn, m_ok, n_ok, Bias, R, Y, K, eps, s_rm, s_ym, HAS_BIAS, NORM,
                           GLU, RESIDUAL)
            reset_count(CNT, pid_n)
    else:
        _rows_epilogue(acc, acc_u, ss_rows, rm, rn, m_ok, n_ok, Bias, R, Y, K, eps, s_rm, s_ym, HAS_BIAS, NORM, GLU,
                       RESIDUAL)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm: tuple[torch.Tensor, float, bool] | None = None, glu: bool = False,
         residual: torch.Tensor | None = None, pdl: bool | str = False) -> torch.Tensor:
    """x [..., K] (at most KERNEL_MAX_ROWS = 64 rows in all), weight [N, K], bias [N] or None -> [..., N] in x's dtype.

    norm = (w [K], eps, zero_centered): RMSNorm x's rows first; glu: weight is [2N, K] = [W_gate;
    W_up] and the output silu(x W_gateᵀ)·(x W_upᵀ) [..., N] (no bias); residual [..., N]: returns
    residual + y; pdl: launch with programmatic dependent launch (kernels/pdl.py)."""
    K = weight.shape[-1] if weight.dim() == 2 else -1
    N = weight.shape[0] // 2 if glu else weight.shape[0]
    M = x.numel() // max(x.shape[-1], 1)
    if weight.dim() != 2 or x.shape[-1] != K or (bias is not None and tuple(bias.shape) != (N,)):
        raise ValueError(f"gemv: x [..., {K}] needs weight [N, {K}] and bias [N]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}")
    if glu and (weight.shape[0] % 2 or bias is not None):
        raise ValueError(f"gemv: glu needs weight [2N, K] = [W_gate; W_up] (an even row count) and no bias; got "
                         f"weight {tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}")
    if not 1 <= M <= KERNEL_MAX_ROWS:
        raise ValueError(f"gemv: serves 1..{KERNEL_MAX_ROWS} rows, got {M} (use F.linear)")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"gemv: x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}")
    if norm is not None and tuple(norm[0].shape) != (K,):
        raise ValueError(f"gemv: norm needs a weight [{K}]; got {tuple(norm[0].shape)}")
    if residual is not None and (tuple(residual.shape) != (*x.shape[:-1], N) or residual.dtype != x.dtype):
        raise ValueError(f"gemv: residual must be [..., {N}] in {x.dtype}; got {tuple(residual.shape)} "
                         f"{residual.dtype}")
    if not _INTERPRET and not x.is_cuda:
        raise ValueError("gemv: the Triton kernel needs CUDA tensors (use reference.gemv)")
    nw, eps, zc = norm if norm is not None else (None, 0.0, False)
    y = _gemv_op(x.reshape(M, K).contiguous(), weight if weight.stride(1) == 1 else weight.contiguous(), bias,
                 nw, float(eps), bool(zc), bool(glu),
                 None if residual is None else residual.reshape(M, N).contiguous(), setting(pdl, "gemv"))
    return y.reshape(*x.shape[:-1], N)


@torch.library.custom_op("deepwish::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
             eps: float, zero_centered: bool, glu: bool, residual: Optional[torch.Tensor], pdl: str) -> torch.Tensor:
    M = x.shape[0]
    K = weight.shape[1]
    N = weight.shape[0] // 2 if glu else weight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    placeholder = y  # a pointer for an absent operand, never read
    b = bias if bias is not None else placeholder
    nw = norm_weight if norm_weight is not None else placeholder
    r = residual if residual is not None else placeholder
    norm = NORM_NONE if norm_weight is None else NORM_ZERO_CENTERED if zero_centered else NORM_PLAIN
    pdl, launch = launch_options(pdl, x.device, "gemv")
    # the bulk prefetch needs W's rows back to back from a 16-byte aligned start, whole 16-byte units
    prefetch = (pdl and PREFETCH_UNDER_PDL and weight.stride(0) == K and weight.data_ptr() % 16 == 0
                and K * weight.element_size() % 16 == 0)
    grid = lambda meta: (triton.cdiv(N, meta["BN"]),)  # noqa: E731
    if M == 1:
        _one_row_kernel[grid](x, weight, b, nw, r, y, N, K, eps, weight.stride(0), HAS_BIAS=bias is not None,
                              NORM=norm, GLU=glu, RESIDUAL=residual is not None, PDL=pdl, PREFETCH=prefetch,
                              **launch)
    else:
        BM = max(16, triton.next_power_of_2(M))
        if ROWS_SPLIT_K:
            if triton.cdiv(N, 16) > ROWS_SPLIT_COUNTERS:
                raise ValueError(f"gemv: N = {N} outputs are more tiles than the K split counts")
            ws = torch.empty(2 if glu else 1, ROWS_SPLIT_MAX, BM, N, dtype=torch.float32, device=x.device)
            wss = torch.empty(triton.cdiv(N, 16), ROWS_SPLIT_MAX, BM, dtype=torch.float32, device=x.device)
            cnt = counters(x.device, "gemv (rows kernel, K split)", ROWS_SPLIT_COUNTERS)
            grid = lambda meta: (triton.cdiv(N, meta["BN"]), _k_slices(N, K, meta["BN"], meta["BK"], x.device))  # noqa: E731
        else:
            ws = wss = cnt = placeholder
        _rows_kernel[grid](x, weight, b, nw, r, y, ws, wss, cnt, M, N, K, eps, x.stride(0), weight.stride(0),
                           r.stride(0), y.stride(0), HAS_BIAS=bias is not None, NORM=norm, GLU=glu,
                           RESIDUAL=residual is not None, PDL=pdl, PREFETCH=prefetch and not ROWS_SPLIT_K,
                           PREC="ieee" if x.dtype == torch.float32 else ROWS_DOT, SPLIT=ROWS_SPLIT_K,
                           SMAX=ROWS_SPLIT_MAX, ROW_SUMS=ROWS_NORM_ROW_SUMS and norm != NORM_NONE, BM=BM, **launch)
    return y


@_gemv_op.register_fake
def _(x, weight, bias, norm_weight, eps, zero_centered, glu, residual, pdl):
    return x.new_empty(x.shape[0], weight.shape[0] // 2 if glu else weight.shape[0])
