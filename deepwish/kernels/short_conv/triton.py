"""Short depthwise causal convolution in Triton: forward, backward and the decode update.

Same semantics as `reference.py` (read it first). Shape legend: T tokens (all documents packed
into one stream), D channels, W kernel width, N documents.

Design (the op is memory-bound: a few flops per byte):
- Every input is viewed as one stream [T, D] of documents: a batch of B rows is B documents of
  length seq_len (document bounds computed in the kernel); packed input (cu_seqlens) carries
  per-token `doc_start` / `doc_idx` (int32 [T]) instead. One kernel serves both (PACKED).
- Forward tiles (T-block, D-block); each of the W taps is a shifted load of the same tile that
  mostly hits L1/L2, so DRAM traffic is close to the minimum (read x, write y).
- Backward recomputes the pre-activation z (nothing but x is saved). dx[s] = sum_j w[3-j] dz(s+j)
  needs dz at s..s+3, and z(t) needs x at t-3..t. Each program owns a run of rows and a block of
  channels and walks the rows one at a time with a sliding window in registers (the last three
  x rows and dz values): every x and dy row is loaded once and every dz computed once, each
  load a contiguous BD-wide row (vectorised along D). Four rows are loaded ahead per loop step
  so their loads overlap. (The earlier tiled version loaded 7 shifted x tiles and 4 dy tiles per
  tile and recomputed each dz 4 times; it reached ~31% of copy bandwidth on an H100.) The kernel
  is written for exactly 4 taps (narrower filters are zero-padded). dweight and dbias are
  reduced per program into fp32 partial sums, then summed in torch (deterministic, no atomics).
  The dweight terms whose source is the initial state, and d(initial_state), come from a small
  per-document kernel that revisits the first W-1 tokens of each document (run only when there
  is an initial state).
- The final state is gathered in torch (differentiable): it is W-1 rows per document.

Simplifications: kernel width W <= 4 (Qwen3-Next and Mamba use 4). cu_seqlens values are
trusted on this path (checking them would synchronise with the device); the reference checks
them. The decode update is inference only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from deepwish.kernels.short_conv.reference import check_conv_inputs, check_update_inputs

# Tile sizes (bf16, H100): small per-thread tiles keep registers low so many tiles are in flight.
# Measured on sm_90 compiles: forward 16x128 -> 56 registers. The backward walks rows with a
# BD-wide window (4 channels per thread at 512 / 4 warps); ~2048 programs is ~4 waves.
FWD_BLOCK_T, FWD_BLOCK_D, FWD_WARPS = 16, 128, 4
BWD_BLOCK_D, BWD_WARPS = 512, 4
BWD_TARGET_PROGRAMS = 2048
# The backward compiles to 139 registers (3 programs of 4 warps per SM); capped at 128 it spills
# 8 bytes per thread and fits 4 programs per SM, a third more row loads in flight.
BWD_MAX_REGISTERS = 128
INIT_BLOCK_D = 128


@triton.jit
def _load_source(x_ptr, init_ptr, src, start, doc, row_ok, d, d_ok, T, stride_x,
                 stride_in, stride_id, stride_iw, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """fp32 [BT, BD] input values at packed positions `src` for rows whose document starts at
    `start`: x where src >= start, else the initial state slot src - start + W-1 (or zero)."""
    in_doc = (src >= start) & (src < T) & row_ok
    src64 = tl.cast(src, tl.int64)
    v = tl.load(x_ptr + src64[:, None] * stride_x + d[None, :],
                mask=in_doc[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if HAS_INIT:
        before = (src < start) & row_ok
        slot = src - start + (W - 1)
        doc64 = tl.cast(doc, tl.int64)
        v += tl.load(init_ptr + doc64[:, None] * stride_in + d[None, :] * stride_id
                     + slot[:, None] * stride_iw,
                     mask=before[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _doc_of(rows, ok, doc_idx_ptr, doc_start_ptr, seq_len, PACKED: tl.constexpr, NEED_IDX: tl.constexpr):
    """(start position, index) of the document holding each row."""
    if PACKED:
        start = tl.load(doc_start_ptr + rows, mask=ok, other=0)
        doc = start
        if NEED_IDX:
            doc = tl.load(doc_idx_ptr + rows, mask=ok, other=0)
    else:
        doc = rows // seq_len
        start = doc * seq_len
    return start, doc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, init_ptr, doc_idx_ptr, doc_start_ptr, y_ptr,
                     T, D, seq_len, stride_x, stride_y, stride_wd, stride_wk,
                     stride_in, stride_id, stride_iw,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                     SILU: tl.constexpr, PACKED: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)
    d = pid_d * BD + tl.arange(0, BD)
    t_ok = t < T
    d_ok = d < D
    start, doc = _doc_of(t, t_ok, doc_idx_ptr, doc_start_ptr, seq_len, PACKED, HAS_INIT)
    z = tl.zeros((BT, BD), dtype=tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(W):
        w_k = tl.load(w_ptr + d * stride_wd + k * stride_wk, mask=d_ok, other=0.0).to(tl.float32)
        src = _load_source(x_ptr, init_ptr, t - (W - 1) + k, start, doc, t_ok, d, d_ok, T, stride_x,
                           stride_in, stride_id, stride_iw, W, HAS_INIT)
        z += w_k[None, :] * src
    if SILU:
        z = z * tl.sigmoid(z)
    t64 = tl.cast(t, tl.int64)
    tl.store(y_ptr + t64[:, None] * stride_y + d[None, :], z.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _silu_grad(dy, z, SILU: tl.constexpr):
    if SILU:
        sig = tl.sigmoid(z)
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    return dy


@triton.jit
def _bwd_row_step(t, x_t, dy_t, st, doc_t, xa, xb, xc, dza, dzb, dzc, sb, sc,
                  dw0, dw1, dw2, dw3, dbias, w0, w1, w2, w3, bias, init_ptr, dx_ptr,
                  d, d_ok, c1, emit_from, T, stride_dx, stride_in, stride_id, stride_iw,
                  HAS_INIT: tl.constexpr, SILU: tl.constexpr):
    """One output row t of the sliding window. In: raw x rows t-3..t (xa, xb, xc, x_t), dz at
    t-3..t-1 (dza, dzb, dzc), document starts of rows t-2, t-1, t (sb, sc, st). Computes dz(t),
    emits dx[t-3] and adds row t's dweight/dbias terms if t is this program's own row (< c1).
    Returns the window shifted by one row and the updated sums."""
    # Sources of z(t) at p = t-3+k: x when p is in t's document, else the initial state slot
    # p - st + 3 (or zero). x_t itself is always in the document.
    xo0 = tl.where(t - 3 >= st, xa, 0.0)
    xo1 = tl.where(t - 2 >= st, xb, 0.0)
    xo2 = tl.where(t - 1 >= st, xc, 0.0)
    z = bias + w0 * xo0 + w1 * xo1 + w2 * xo2 + w3 * x_t
    if HAS_INIT:
        init_row = init_ptr + tl.cast(doc_t, tl.int64) * stride_in + d * stride_id
        in_t = t < T
        z += w0 * tl.load(init_row + (t - st) * stride_iw, mask=d_ok & in_t & (t - 3 < st),
                          other=0.0).to(tl.float32)
        z += w1 * tl.load(init_row + (t - st + 1) * stride_iw, mask=d_ok & in_t & (t - 2 < st),
                          other=0.0).to(tl.float32)
        z += w2 * tl.load(init_row + (t - st + 2) * stride_iw, mask=d_ok & in_t & (t - 1 < st),
                          other=0.0).to(tl.float32)
    dz = _silu_grad(dy_t, z, SILU)      # dy_t is zero past T, so dz is too
    # dx[s] = sum_j w[3-j] dz(s+j) over outputs s+j in s's document (start <= s).
    s = t - 3
    dx = w3 * dza + w2 * tl.where(sb <= s, dzb, 0.0) + w1 * tl.where(sc <= s, dzc, 0.0) \
        + w0 * tl.where(st <= s, dz, 0.0)
    tl.store(dx_ptr + tl.cast(s, tl.int64) * stride_dx + d, dx.to(dx_ptr.dtype.element_ty),
             mask=d_ok & (s >= emit_from) & (s < c1))
    # dweight[k] = sum_t dz(t) x(t-3+k) over x sources in t's document (the initial-state terms
    # come from _conv_bwd_init_kernel); each row t is counted by the program that owns it.
    dz_own = tl.where(t < c1, dz, 0.0)
    dw0 += dz_own * xo0
    dw1 += dz_own * xo1
    dw2 += dz_own * xo2
    dw3 += dz_own * x_t
    dbias += dz_own
    return xb, xc, x_t, dzb, dzc, dz, sc, st, dw0, dw1, dw2, dw3, dbias


@triton.jit
def _load_row(ptr, r, d, d_ok, T, stride):
    ok = (r >= 0) & (r < T)
    return tl.load(ptr + tl.cast(r, tl.int64) * stride + d, mask=d_ok & ok, other=0.0).to(tl.float32)


@triton.jit
def _load_row_and_doc(x_ptr, dy_ptr, doc_idx_ptr, doc_start_ptr, t, d, d_ok, T, seq_len, stride_x,
                      stride_dy, PACKED: tl.constexpr, HAS_INIT: tl.constexpr):
    """x and dy rows t (fp32 [BD], zero past T), and the start and index of t's document."""
    x_t = _load_row(x_ptr, t, d, d_ok, T, stride_x)
    dy_t = _load_row(dy_ptr, t, d, d_ok, T, stride_dy)
    if PACKED:
        st = tl.load(doc_start_ptr + t, mask=t < T, other=0)
        doc = st
        if HAS_INIT:
            doc = tl.load(doc_idx_ptr + t, mask=t < T, other=0)
    else:
        doc = t // seq_len
        st = doc * seq_len
    return x_t, dy_t, st, doc


@triton.jit
def _conv4_bwd_kernel(x_ptr, w_ptr, b_ptr, init_ptr, doc_idx_ptr, doc_start_ptr, dy_ptr, dx_ptr,
                      dw_part_ptr, db_part_ptr,
                      T, D, seq_len, rows_per_program, stride_x, stride_dy, stride_dx, stride_wd,
                      stride_wk, stride_in, stride_id, stride_iw,
                      HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                      PACKED: tl.constexpr, BD: tl.constexpr):
    """Backward for exactly 4 taps (narrower kernels are zero-padded on the left by the caller).
    Program (c, d-block) owns rows [c0, c1) and walks t = c0 .. c1+2 one row at a time, keeping
    the last three x rows and dz values in registers (a sliding window), so each x and dy row is
    read once (plus 3 + 3 rows of overlap per program) and each dz is computed once. Four rows
    are loaded ahead per iteration so that their loads are in flight together."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BD + tl.arange(0, BD)
    d_ok = d < D
    w0 = tl.load(w_ptr + d * stride_wd + 0 * stride_wk, mask=d_ok, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + d * stride_wd + 1 * stride_wk, mask=d_ok, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + d * stride_wd + 2 * stride_wk, mask=d_ok, other=0.0).to(tl.float32)
    w3 = tl.load(w_ptr + d * stride_wd + 3 * stride_wk, mask=d_ok, other=0.0).to(tl.float32)
    bias = tl.zeros((BD,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    c0 = pid_c * rows_per_program
    c1 = tl.minimum(c0 + rows_per_program, T)
    xa = _load_row(x_ptr, c0 - 3, d, d_ok, T, stride_x)
    xb = _load_row(x_ptr, c0 - 2, d, d_ok, T, stride_x)
    xc = _load_row(x_ptr, c0 - 1, d, d_ok, T, stride_x)
    # dz before c0 only feeds dx rows before c0, which are not emitted here.
    dza = tl.zeros((BD,), dtype=tl.float32)
    dzb = tl.zeros((BD,), dtype=tl.float32)
    dzc = tl.zeros((BD,), dtype=tl.float32)
    sb = c0 * 0
    sc = c0 * 0
    dw0 = tl.zeros((BD,), dtype=tl.float32)
    dw1 = tl.zeros((BD,), dtype=tl.float32)
    dw2 = tl.zeros((BD,), dtype=tl.float32)
    dw3 = tl.zeros((BD,), dtype=tl.float32)
    dbias = tl.zeros((BD,), dtype=tl.float32)
    for t0 in range(c0, c1 + 3, 4):
        x_0, dy_0, st_0, doc_0 = _load_row_and_doc(x_ptr, dy_ptr, doc_idx_ptr, doc_start_ptr, t0 + 0, d, d_ok,
                                                         T, seq_len, stride_x, stride_dy, PACKED, HAS_INIT)
        x_1, dy_1, st_1, doc_1 = _load_row_and_doc(x_ptr, dy_ptr, doc_idx_ptr, doc_start_ptr, t0 + 1, d, d_ok,
                                                         T, seq_len, stride_x, stride_dy, PACKED, HAS_INIT)
        x_2, dy_2, st_2, doc_2 = _load_row_and_doc(x_ptr, dy_ptr, doc_idx_ptr, doc_start_ptr, t0 + 2, d, d_ok,
                                                         T, seq_len, stride_x, stride_dy, PACKED, HAS_INIT)
        x_3, dy_3, st_3, doc_3 = _load_row_and_doc(x_ptr, dy_ptr, doc_idx_ptr, doc_start_ptr, t0 + 3, d, d_ok,
                                                         T, seq_len, stride_x, stride_dy, PACKED, HAS_INIT)
        xa, xb, xc, dza, dzb, dzc, sb, sc, dw0, dw1, dw2, dw3, dbias = _bwd_row_step(
            t0 + 0, x_0, dy_0, st_0, doc_0, xa, xb, xc, dza, dzb, dzc, sb, sc, dw0, dw1, dw2, dw3,
            dbias, w0, w1, w2, w3, bias, init_ptr, dx_ptr, d, d_ok, c1, c0, T, stride_dx,
            stride_in, stride_id, stride_iw, HAS_INIT, SILU)
        xa, xb, xc, dza, dzb, dzc, sb, sc, dw0, dw1, dw2, dw3, dbias = _bwd_row_step(
            t0 + 1, x_1, dy_1, st_1, doc_1, xa, xb, xc, dza, dzb, dzc, sb, sc, dw0, dw1, dw2, dw3,
            dbias, w0, w1, w2, w3, bias, init_ptr, dx_ptr, d, d_ok, c1, c0, T, stride_dx,
            stride_in, stride_id, stride_iw, HAS_INIT, SILU)
        xa, xb, xc, dza, dzb, dzc, sb, sc, dw0, dw1, dw2, dw3, dbias = _bwd_row_step(
            t0 + 2, x_2, dy_2, st_2, doc_2, xa, xb, xc, dza, dzb, dzc, sb, sc, dw0, dw1, dw2, dw3,
            dbias, w0, w1, w2, w3, bias, init_ptr, dx_ptr, d, d_ok, c1, c0, T, stride_dx,
            stride_in, stride_id, stride_iw, HAS_INIT, SILU)
        xa, xb, xc, dza, dzb, dzc, sb, sc, dw0, dw1, dw2, dw3, dbias = _bwd_row_step(
            t0 + 3, x_3, dy_3, st_3, doc_3, xa, xb, xc, dza, dzb, dzc, sb, sc, dw0, dw1, dw2, dw3,
            dbias, w0, w1, w2, w3, bias, init_ptr, dx_ptr, d, d_ok, c1, c0, T, stride_dx,
            stride_in, stride_id, stride_iw, HAS_INIT, SILU)
    pid_c64 = tl.cast(pid_c, tl.int64)
    base = dw_part_ptr + pid_c64 * 4 * D + d
    tl.store(base + 0 * D, dw0, mask=d_ok)
    tl.store(base + 1 * D, dw1, mask=d_ok)
    tl.store(base + 2 * D, dw2, mask=d_ok)
    tl.store(base + 3 * D, dw3, mask=d_ok)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid_c64 * D + d, dbias, mask=d_ok)


@triton.jit
def _conv_bwd_init_kernel(x_ptr, w_ptr, b_ptr, init_ptr, cu_ptr, dy_ptr, dinit_ptr, dw_part_ptr,
                          N, D, seq_len, stride_x, stride_dy, stride_wd, stride_wk,
                          stride_in, stride_id, stride_iw,
                          W: tl.constexpr, WP: tl.constexpr, HAS_BIAS: tl.constexpr,
                          SILU: tl.constexpr, PACKED: tl.constexpr, BD: tl.constexpr):
    """Per document: gradients that flow through the initial state, i.e. from outputs at the
    first W-1 tokens to the W-1 state slots (d initial_state, and the matching dweight terms).
    Program p handles documents p, p + P, ...; its dweight partial sum goes to row p."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_prog = tl.num_programs(0)
    d = pid_d * BD + tl.arange(0, BD)
    d_ok = d < D
    kk = tl.arange(0, WP)
    bias = tl.zeros((BD,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((WP, BD), dtype=tl.float32)        # row k holds dweight[:, k]
    for n in range(pid, N, n_prog):
        n64 = tl.cast(n, tl.int64)
        if PACKED:
            start = tl.load(cu_ptr + n)
            end = tl.load(cu_ptr + n + 1)
        else:
            start = n * seq_len
            end = start + seq_len
        dinit = tl.zeros((WP, BD), dtype=tl.float32)      # row i holds d initial_state[n, :, i]
        for r in tl.static_range(W - 1):                  # output token t = start + r
            t = start + r
            t_ok = t < end
            t64 = tl.cast(t, tl.int64)
            z = bias
            for k in tl.static_range(W):
                slot = r + k                               # source t-(W-1)+k, as a state slot
                if slot < W - 1:
                    v = tl.load(init_ptr + n64 * stride_in + d * stride_id + slot * stride_iw,
                                mask=d_ok, other=0.0).to(tl.float32)
                else:
                    v = tl.load(x_ptr + (t64 - (W - 1) + k) * stride_x + d,
                                mask=d_ok & t_ok, other=0.0).to(tl.float32)
                z += tl.load(w_ptr + d * stride_wd + k * stride_wk, mask=d_ok, other=0.0).to(tl.float32) * v
            dz = tl.load(dy_ptr + t64 * stride_dy + d, mask=d_ok & t_ok, other=0.0).to(tl.float32)
            if SILU:
                sig = tl.sigmoid(z)
                dz = dz * sig * (1.0 + z * (1.0 - sig))
            for k in tl.static_range(W):
                slot = r + k
                if slot < W - 1:
                    w_k = tl.load(w_ptr + d * stride_wd + k * stride_wk, mask=d_ok, other=0.0).to(tl.float32)
                    v = tl.load(init_ptr + n64 * stride_in + d * stride_id + slot * stride_iw,
                                mask=d_ok, other=0.0).to(tl.float32)
                    dinit += tl.where((kk == slot)[:, None], (w_k * dz)[None, :], 0.0)
                    dw_acc += tl.where((kk == k)[:, None], (v * dz)[None, :], 0.0)
        tl.store(dinit_ptr + n64 * stride_in + d[None, :] * stride_id + kk[:, None] * stride_iw,
                 dinit.to(dinit_ptr.dtype.element_ty), mask=(kk < W - 1)[:, None] & d_ok[None, :])
    pid64 = tl.cast(pid, tl.int64)
    tl.store(dw_part_ptr + (pid64 * WP + kk[:, None]) * D + d[None, :], dw_acc,
             mask=(kk < W)[:, None] & d_ok[None, :])


@triton.jit
def _conv_update_kernel(x_ptr, state_ptr, w_ptr, b_ptr, y_ptr, D, stride_xb, stride_yb,
                        stride_sb, stride_sd, stride_sw, stride_wd, stride_wk,
                        W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                        BD: tl.constexpr):
    b = tl.cast(tl.program_id(0), tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = d < D
    z = tl.zeros((BD,), dtype=tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    state = state_ptr + b * stride_sb + d * stride_sd
    # Each lane owns its channel across all slots, so shifting the state in place is safe.
    for k in tl.static_range(W - 1):
        cur = tl.load(state + k * stride_sw, mask=d_ok, other=0.0)
        z += tl.load(w_ptr + d * stride_wd + k * stride_wk, mask=d_ok, other=0.0).to(tl.float32) * cur.to(tl.float32)
        if k > 0:
            tl.store(state + (k - 1) * stride_sw, cur, mask=d_ok)
    x = tl.load(x_ptr + b * stride_xb + d, mask=d_ok, other=0.0)
    z += tl.load(w_ptr + d * stride_wd + (W - 1) * stride_wk, mask=d_ok, other=0.0).to(tl.float32) * x.to(tl.float32)
    if W > 1:
        tl.store(state + (W - 2) * stride_sw, x.to(state_ptr.dtype.element_ty), mask=d_ok)
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(y_ptr + b * stride_yb + d, z.to(y_ptr.dtype.element_ty), mask=d_ok)


def _init_strides(initial_state: torch.Tensor | None) -> tuple[int, int, int]:
    return tuple(initial_state.stride()) if initial_state is not None else (0, 0, 0)


def conv_forward(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 initial_state: torch.Tensor | None, doc_idx: torch.Tensor | None,
                 doc_start: torch.Tensor | None, seq_len: int, silu: bool, block_t: int = FWD_BLOCK_T, block_d: int = FWD_BLOCK_D,
                 num_warps: int = FWD_WARPS) -> torch.Tensor:
    """x2: [T, D] (unit stride along D); documents are given by doc_idx / doc_start (packed) or,
    when those are None, are consecutive runs of seq_len rows. Returns y2: [T, D] in x2.dtype."""
    T, D = x2.shape
    y2 = torch.empty((T, D), dtype=x2.dtype, device=x2.device)
    if T == 0:
        return y2
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _conv_fwd_kernel[grid](
        x2, weight, bias if bias is not None else x2, initial_state if initial_state is not None else x2,
        _or(doc_idx, x2), _or(doc_start, x2), y2, T, D, seq_len, x2.stride(0), y2.stride(0),
        weight.stride(0), weight.stride(1), *_init_strides(initial_state),
        W=weight.shape[1], HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, SILU=silu,
        PACKED=doc_start is not None, BT=block_t, BD=block_d, num_warps=num_warps)
    return y2


def conv_backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  initial_state: torch.Tensor | None, doc_idx: torch.Tensor | None,
                  doc_start: torch.Tensor | None, cu: torch.Tensor | None, seq_len: int, silu: bool,
                  block_d: int = BWD_BLOCK_D, num_warps: int = BWD_WARPS,
                  target_programs: int = BWD_TARGET_PROGRAMS, max_registers: int | None = BWD_MAX_REGISTERS):
    """Returns dx2 [T, D] (x2.dtype), dweight [D, W] (fp32), dbias [D] (fp32) or None without
    bias, d initial_state [N, D, W-1] (fp32) or None. max_registers caps the main kernel's
    registers per thread (None: the compiler's choice); it is not applied with an initial state,
    whose extra loads would spill."""
    T, D = x2.shape
    W = weight.shape[1]
    WP = triton.next_power_of_2(W)
    dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
    dx2 = torch.empty((T, D), dtype=x2.dtype, device=x2.device)
    if T == 0:  # no outputs: nothing flows back (and the kernels would divide by seq_len = 0)
        dinit = torch.zeros(initial_state.shape, dtype=torch.float32, device=x2.device) \
            if initial_state is not None else None
        dbias = torch.zeros(D, dtype=torch.float32, device=x2.device) if bias is not None else None
        return dx2, torch.zeros(D, W, dtype=torch.float32, device=x2.device), dbias, dinit
    n_dblocks = triton.cdiv(D, block_d)
    # Rows per program: a multiple of the 4-row unroll, at least 16 so the 6 rows of window
    # overlap stay a small fraction of the reads.
    rows = max(16, triton.cdiv(T * n_dblocks, target_programs))
    rows = triton.cdiv(rows, 4) * 4
    n_chunks = triton.cdiv(T, rows)
    dw_part = torch.empty((n_chunks, 4, D), dtype=torch.float32, device=x2.device)
    db_part = torch.empty((n_chunks, D), dtype=torch.float32, device=x2.device) if bias is not None else dw_part
    has_init = initial_state is not None
    # The main kernel is written for 4 taps: narrower filters get zero taps (and zero state
    # slots) on the left, which leaves every output unchanged.
    pad = 4 - W
    w4 = F.pad(weight, (pad, 0)) if pad else weight
    init4 = F.pad(initial_state, (pad, 0)).contiguous() if has_init and pad else initial_state
    _conv4_bwd_kernel[(n_chunks, n_dblocks)](
        x2, w4, bias if bias is not None else x2, init4 if has_init else x2,
        _or(doc_idx, x2), _or(doc_start, x2), dy2, dx2, dw_part, db_part,
        T, D, seq_len, rows, x2.stride(0), dy2.stride(0), dx2.stride(0),
        w4.stride(0), w4.stride(1), *_init_strides(init4),
        HAS_BIAS=bias is not None, HAS_INIT=has_init, SILU=silu, PACKED=doc_start is not None,
        BD=block_d, num_warps=num_warps, maxnreg=None if has_init else max_registers)
    dweight = dw_part.sum(0).t()[:, pad:]                     # [D, W]
    dbias = db_part.sum(0) if bias is not None else None
    dinit = None
    if has_init and W > 1:
        N = initial_state.shape[0]
        n_prog = min(N, 64)
        dinit = torch.empty(initial_state.shape, dtype=torch.float32, device=x2.device)
        dw_init_part = torch.empty((n_prog, WP, D), dtype=torch.float32, device=x2.device)
        _conv_bwd_init_kernel[(n_prog, triton.cdiv(D, INIT_BLOCK_D))](
            x2, weight, bias if bias is not None else x2, initial_state, _or(cu, x2), dy2, dinit,
            dw_init_part, N, D, seq_len, x2.stride(0), dy2.stride(0), weight.stride(0), weight.stride(1),
            *_init_strides(initial_state),
            W=W, WP=WP, HAS_BIAS=bias is not None, SILU=silu, PACKED=cu is not None, BD=INIT_BLOCK_D,
            num_warps=4)
        dweight = dweight + dw_init_part.sum(0)[:W].t()
    elif has_init:
        dinit = torch.zeros(initial_state.shape, dtype=torch.float32, device=x2.device)
    return dx2, dweight, dbias, dinit


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, initial_state, doc_idx, doc_start, cu, seq_len, silu):
        y2 = conv_forward(x2, weight, bias, initial_state, doc_idx, doc_start, seq_len, silu)
        ctx.save_for_backward(x2, weight, bias, initial_state, doc_idx, doc_start, cu)
        ctx.seq_len, ctx.silu = seq_len, silu
        return y2

    @staticmethod
    def backward(ctx, dy2):
        x2, weight, bias, initial_state, doc_idx, doc_start, cu = ctx.saved_tensors
        dx2, dweight, dbias, dinit = conv_backward(dy2, x2, weight, bias, initial_state, doc_idx,
                                                   doc_start, cu, ctx.seq_len, ctx.silu)
        return (dx2, dweight.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else None,
                dinit.to(initial_state.dtype) if initial_state is not None else None,
                None, None, None, None, None)


def _or(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """A pointer argument the kernel never reads (its flag is off)."""
    return t if t is not None else dummy


def pack_documents(x: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """[B, T, D] -> x2 [B*T, D] (unit stride along D, uniform row stride) and, for packed input
    only, int32 cu [N+1] and per-token doc_idx / doc_start (int32 [T]); None otherwise."""
    B, T, D = x.shape
    if x.stride(-1) != 1 or (B > 1 and x.stride(0) != T * x.stride(1)):
        x = x.contiguous()
    x2 = x.view(B * T, D)
    if cu_seqlens is None:
        return x2, None, None, None
    cu = cu_seqlens.to(device=x.device, dtype=torch.int32)
    N = cu.numel() - 1
    lengths = (cu[1:] - cu[:-1]).long()
    doc_idx = torch.repeat_interleave(torch.arange(N, device=x.device, dtype=torch.int32), lengths,
                                      output_size=T)
    doc_start = cu[:-1].index_select(0, doc_idx)
    return x2, cu, doc_idx.contiguous(), doc_start.contiguous()


def gather_final_state(x2: torch.Tensor, initial_state: torch.Tensor | None, cu: torch.Tensor,
                       W: int) -> torch.Tensor:
    """Last W-1 inputs of each document (bounds cu: int [N+1] in x2's rows), [N, D, W-1] (oldest
    first), reaching into the initial state (or zeros) for documents shorter than W-1. Plain
    torch indexing, so differentiable."""
    N = cu.numel() - 1
    D = x2.shape[1]
    start = cu[:-1].long()[:, None]
    pos = cu[1:].long()[:, None] - (W - 1) + torch.arange(W - 1, device=x2.device)[None, :]  # [N, W-1]
    from_x = (pos >= start)[:, None, :]                                                   # [N, 1, W-1]
    if x2.shape[0] > 0:
        x_vals = x2[pos.clamp(min=0).reshape(-1)].reshape(N, W - 1, D).transpose(1, 2)    # [N, D, W-1]
    else:
        x_vals = x2.new_zeros(N, D, W - 1)
    if initial_state is not None:
        slot = (pos - start + (W - 1)).clamp(0, max(W - 2, 0))
        init_vals = initial_state.to(x2.dtype).gather(2, slot[:, None, :].expand(N, D, W - 1))
    else:
        init_vals = torch.zeros_like(x_vals)
    return torch.where(from_x, x_vals, init_vals)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = "silu", cu_seqlens: torch.Tensor | None = None,
                  initial_state: torch.Tensor | None = None, output_final_state: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [B, T, D], weight: [D, W], bias: [D] | None, cu_seqlens: int [N+1] | None (B == 1),
    initial_state: [N, D, W-1] | None. Returns y [B, T, D] (x.dtype), final_state [N, D, W-1] | None."""
    check_conv_inputs(x, weight, bias, activation, cu_seqlens, initial_state)
    B, T, D = x.shape
    W = weight.shape[1]
    if W > 4:
        raise ValueError(f"causal_conv1d (triton): kernel width W <= 4 is supported, got W={W}; "
                         "use the reference for wider filters")
    x2, cu, doc_idx, doc_start = pack_documents(x, cu_seqlens)
    if initial_state is not None:
        initial_state = initial_state.contiguous()  # the backward writes d initial_state with its strides
    y2 = _CausalConv1dFn.apply(x2, weight, bias, initial_state, doc_idx, doc_start, cu, T,
                               activation == "silu")
    final_state = None
    if output_final_state:
        if cu is None:
            cu = torch.arange(B + 1, device=x.device, dtype=torch.int32) * T
        final_state = gather_final_state(x2, initial_state, cu, W)
    return y2.view(B, T, D), final_state


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, activation: str | None = "silu") -> torch.Tensor:
    """One decode step (inference only). x: [B, D], conv_state: [B, D, W-1] updated in place,
    weight: [D, W], bias: [D] | None. Returns y: [B, D] (x.dtype)."""
    check_update_inputs(x, conv_state, weight, bias, activation)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise RuntimeError("causal_conv1d_update (triton) is inference only; call it under "
                           "torch.no_grad() or use the reference for gradients")
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, D = x.shape
    W = weight.shape[1]
    y = torch.empty((B, D), dtype=x.dtype, device=x.device)
    block_d = min(1024, triton.next_power_of_2(D))
    _conv_update_kernel[(B, triton.cdiv(D, block_d))](
        x, conv_state, weight, bias if bias is not None else x, y, D, x.stride(0), y.stride(0),
        *conv_state.stride(), weight.stride(0), weight.stride(1),
        W=W, HAS_BIAS=bias is not None, SILU=activation == "silu", BD=block_d, num_warps=4)
    return y
