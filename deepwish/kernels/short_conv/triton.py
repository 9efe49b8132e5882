"""Short depthwise causal convolution in Triton: forward, backward and the decode update.

Same semantics as `reference.py` (read it first). Shape legend: T tokens (all documents packed
into one stream), D channels, W kernel width, N documents.

Design (the op is memory-bound: a few flops per byte):
- Every input is viewed as one stream [T, D] of documents: a batch of B rows is B documents of
  length seq_len (document bounds computed in the kernel); packed input (cu_seqlens) carries
  per-token `doc_start` / `doc_idx` (int32 [T]) instead. One kernel serves both (PACKED).
- Forward tiles (T-block, D-block); each of the W taps is a shifted load of the same tile that
  mostly hits L1/L2, so DRAM traffic is close to the minimum (read x, write y).
- Backward recomputes the pre-activation z (nothing but x is saved). For a tile of source rows s
  it needs dz at t = s + j for j < W: dx[s] = sum_j w[W-1-j] dz[s+j]. The kernel is written for
  exactly 4 taps (narrower filters are zero-padded): the 7 shifted tiles x[s-3 .. s+3] are loaded
  once each and combined in registers. (Generic-W versions -- W*W shifted loads, or the W shifts
  held in a [W, BT, BD] tensor -- compiled for sm_90 to as many or more registers, with 16 tile
  loads or cross-thread shuffles instead of 7.) dweight and dbias
  are reduced per program into fp32 partial sums over a run of T-blocks, then summed in torch
  (deterministic, no atomics). The dweight terms whose source is x come from the same tile
  (dw[3-j] += dz(s+j) * x[s]); the terms whose source is the initial state, and d(initial_state),
  come from a small per-document kernel that revisits the first W-1 tokens of each document.
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
# Measured on sm_90 compiles: forward 16x128 -> 56 registers; backward 8x128 -> ~167 registers (the
# 7 shifted x tiles, 4 dy tiles and 5 partial sums are live at once), 3 programs per SM.
FWD_BLOCK_T, FWD_BLOCK_D, FWD_WARPS = 16, 128, 4
BWD_BLOCK_T, BWD_BLOCK_D, BWD_WARPS = 8, 128, 4
BWD_TARGET_PROGRAMS = 4096   # ~10 waves on an H100: a small tail, and small partial-sum buffers
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
def _load_dy(dy_ptr, doc_start_ptr, s, start_s, s_ok, d, d_ok, T, seq_len, stride_dy, j: tl.constexpr,
             PACKED: tl.constexpr):
    """fp32 dL/dy at t = s + j, zero where t is past T or in a later document than s."""
    t = s + j
    in_range = s_ok & (t < T)
    start_t, _ = _doc_of(t, in_range, doc_start_ptr, doc_start_ptr, seq_len, PACKED, False)
    t_ok = in_range & (start_t == start_s)
    t64 = tl.cast(t, tl.int64)
    return tl.load(dy_ptr + t64[:, None] * stride_dy + d[None, :],
                   mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _conv4_bwd_kernel(x_ptr, w_ptr, b_ptr, init_ptr, doc_idx_ptr, doc_start_ptr, dy_ptr, dx_ptr,
                      dw_part_ptr, db_part_ptr,
                      T, D, seq_len, blocks_per_program, stride_x, stride_dy, stride_dx, stride_wd,
                      stride_wk, stride_in, stride_id, stride_iw,
                      HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                      PACKED: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Backward for exactly 4 taps (narrower kernels are zero-padded on the left by the caller).
    Source rows s of the tile reach outputs t = s + j (j < 4) through tap 3 - j. z(s + j) needs
    x at s-3 .. s+3: the 7 shifted tiles are loaded once each (mostly L1/L2 hits) and combined
    in registers (see the module docstring for the generic-W versions that were dropped)."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BD + tl.arange(0, BD)
    d_ok = d < D
    w0 = tl.load(w_ptr + d * stride_wd + 0 * stride_wk, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(w_ptr + d * stride_wd + 1 * stride_wk, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + d * stride_wd + 2 * stride_wk, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    w3 = tl.load(w_ptr + d * stride_wd + 3 * stride_wk, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    bias = tl.zeros((1, BD), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    # Per-element partial sums, reduced over rows once at the end.
    dw0 = tl.zeros((BT, BD), dtype=tl.float32)
    dw1 = tl.zeros((BT, BD), dtype=tl.float32)
    dw2 = tl.zeros((BT, BD), dtype=tl.float32)
    dw3 = tl.zeros((BT, BD), dtype=tl.float32)
    db = tl.zeros((BT, BD), dtype=tl.float32)
    for i in range(blocks_per_program):
        tb = pid_c * blocks_per_program + i
        s = tb * BT + tl.arange(0, BT)
        s_ok = s < T
        start_s, doc_s = _doc_of(s, s_ok, doc_idx_ptr, doc_start_ptr, seq_len, PACKED, HAS_INIT)
        xm3 = _load_source(x_ptr, init_ptr, s - 3, start_s, doc_s, s_ok, d, d_ok, T, stride_x,
                           stride_in, stride_id, stride_iw, 4, HAS_INIT)
        xm2 = _load_source(x_ptr, init_ptr, s - 2, start_s, doc_s, s_ok, d, d_ok, T, stride_x,
                           stride_in, stride_id, stride_iw, 4, HAS_INIT)
        xm1 = _load_source(x_ptr, init_ptr, s - 1, start_s, doc_s, s_ok, d, d_ok, T, stride_x,
                           stride_in, stride_id, stride_iw, 4, HAS_INIT)
        x0 = _load_source(x_ptr, init_ptr, s, start_s, doc_s, s_ok, d, d_ok, T, stride_x,
                          stride_in, stride_id, stride_iw, 4, HAS_INIT)
        # Sources after s are only used for outputs in the same document (others get dy = 0).
        xp1 = _load_source(x_ptr, init_ptr, s + 1, start_s, doc_s, s_ok, d, d_ok, T, stride_x,
                           stride_in, stride_id, stride_iw, 4, HAS_INIT)
        xp2 = _load_source(x_ptr, init_ptr, s + 2, start_s, doc_s, s_ok, d, d_ok, T, stride_x,
                           stride_in, stride_id, stride_iw, 4, HAS_INIT)
        xp3 = _load_source(x_ptr, init_ptr, s + 3, start_s, doc_s, s_ok, d, d_ok, T, stride_x,
                           stride_in, stride_id, stride_iw, 4, HAS_INIT)
        dz0 = _silu_grad(_load_dy(dy_ptr, doc_start_ptr, s, start_s, s_ok, d, d_ok, T, seq_len, stride_dy, 0,
                                  PACKED),
                         bias + w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * x0, SILU)
        dz1 = _silu_grad(_load_dy(dy_ptr, doc_start_ptr, s, start_s, s_ok, d, d_ok, T, seq_len, stride_dy, 1,
                                  PACKED),
                         bias + w0 * xm2 + w1 * xm1 + w2 * x0 + w3 * xp1, SILU)
        dz2 = _silu_grad(_load_dy(dy_ptr, doc_start_ptr, s, start_s, s_ok, d, d_ok, T, seq_len, stride_dy, 2,
                                  PACKED),
                         bias + w0 * xm1 + w1 * x0 + w2 * xp1 + w3 * xp2, SILU)
        dz3 = _silu_grad(_load_dy(dy_ptr, doc_start_ptr, s, start_s, s_ok, d, d_ok, T, seq_len, stride_dy, 3,
                                  PACKED),
                         bias + w0 * x0 + w1 * xp1 + w2 * xp2 + w3 * xp3, SILU)
        dx = w3 * dz0 + w2 * dz1 + w1 * dz2 + w0 * dz3
        s64 = tl.cast(s, tl.int64)
        tl.store(dx_ptr + s64[:, None] * stride_dx + d[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=s_ok[:, None] & d_ok[None, :])
        # dweight[k] = sum_t dz(t) x(t - 3 + k): indexed by the source row s, t = s + 3 - k.
        # (Terms whose source is the initial state come from _conv_bwd_init_kernel.)
        dw0 += dz3 * x0
        dw1 += dz2 * x0
        dw2 += dz1 * x0
        dw3 += dz0 * x0
        db += dz0
    pid_c64 = tl.cast(pid_c, tl.int64)
    base = dw_part_ptr + pid_c64 * 4 * D + d
    tl.store(base + 0 * D, tl.sum(dw0, axis=0), mask=d_ok)
    tl.store(base + 1 * D, tl.sum(dw1, axis=0), mask=d_ok)
    tl.store(base + 2 * D, tl.sum(dw2, axis=0), mask=d_ok)
    tl.store(base + 3 * D, tl.sum(dw3, axis=0), mask=d_ok)
    tl.store(db_part_ptr + pid_c64 * D + d, tl.sum(db, axis=0), mask=d_ok)


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
                  doc_start: torch.Tensor | None, cu: torch.Tensor | None, seq_len: int, silu: bool, block_t: int = BWD_BLOCK_T,
                  block_d: int = BWD_BLOCK_D, num_warps: int = BWD_WARPS):
    """Returns dx2 [T, D] (x2.dtype), dweight [D, W] (fp32), dbias [D] (fp32),
    d initial_state [N, D, W-1] (fp32) or None."""
    T, D = x2.shape
    W = weight.shape[1]
    WP = triton.next_power_of_2(W)
    dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
    dx2 = torch.empty((T, D), dtype=x2.dtype, device=x2.device)
    if T == 0:  # no outputs: nothing flows back (and the kernels would divide by seq_len = 0)
        dinit = torch.zeros(initial_state.shape, dtype=torch.float32, device=x2.device) \
            if initial_state is not None else None
        return (dx2, torch.zeros(D, W, dtype=torch.float32, device=x2.device),
                torch.zeros(D, dtype=torch.float32, device=x2.device), dinit)
    n_dblocks = triton.cdiv(D, block_d)
    n_tblocks = max(1, triton.cdiv(T, block_t))
    n_chunks = max(1, min(n_tblocks, BWD_TARGET_PROGRAMS // n_dblocks))
    blocks_per_program = triton.cdiv(n_tblocks, n_chunks)
    n_chunks = triton.cdiv(n_tblocks, blocks_per_program)
    dw_part = torch.empty((n_chunks, 4, D), dtype=torch.float32, device=x2.device)
    db_part = torch.empty((n_chunks, D), dtype=torch.float32, device=x2.device)
    has_init = initial_state is not None
    # The main kernel is written for 4 taps: narrower filters get zero taps (and zero state
    # slots) on the left, which leaves every output unchanged.
    pad = 4 - W
    w4 = F.pad(weight, (pad, 0)) if pad else weight
    init4 = F.pad(initial_state, (pad, 0)).contiguous() if has_init and pad else initial_state
    _conv4_bwd_kernel[(n_chunks, n_dblocks)](
        x2, w4, bias if bias is not None else x2, init4 if has_init else x2,
        _or(doc_idx, x2), _or(doc_start, x2), dy2, dx2, dw_part, db_part,
        T, D, seq_len, blocks_per_program, x2.stride(0), dy2.stride(0), dx2.stride(0),
        w4.stride(0), w4.stride(1), *_init_strides(init4),
        HAS_BIAS=bias is not None, HAS_INIT=has_init, SILU=silu, PACKED=doc_start is not None,
        BT=block_t, BD=block_d, num_warps=num_warps)
    dweight = dw_part.sum(0).t()[:, pad:]                     # [D, W]
    dbias = db_part.sum(0)
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
