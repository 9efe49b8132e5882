"""Sparse MLA attention (DeepSeek-V3.2 DSA, weight-absorbed form) in Triton: forward, backward,
and the split-K forward of decoding. Same semantics as `reference.py` (read it first).

Shape legend: B batch, T queries, H heads, S cache rows, K selected slots per query, Dqk = dv + DR
(the latent's dv = 512 value channels, then DR = 64 rope channels at V3 sizes), BH heads per
program, BK slots per step.

Design (the FlashMLA-sparse layout):
- A program owns one query token and BH of its heads: the heads are the rows (the MMA's M
  dimension; at H = 64 one program holds every head). All heads of a token share the token's K
  slots, so each gathered kv row serves BH heads, and it is read once per token, not per head.
- The program walks its token's indices BK at a time, gathers those BK cache rows (int64 row
  offsets), and runs the online softmax in fp32 on exp2. A row is split into its value part
  [0, dv) and its rope tail [dv, Dqk), each padded to a power of two on its own (576 = 512 + 64
  pads to nothing; one 1024-wide pad would double the q·k work): s = q_v·kv_vᵀ + q_r·kv_rᵀ, and
  the values are the kv_v tile already loaded for the scores (MLA's value is the latent itself).
- Slots -1 are masked loads (no memory traffic) with score -inf. The running max starts finite,
  so a token that selects nothing ends with l = 0: lse = -inf, o = 0, no NaN.
- lse is stored in natural log, fp32; the kernels work in base 2 (scale·log2 e folded into one
  multiply) and convert at the edges.
- Backward: a small kernel computes delta = rowsum(dO·O) - dlse (lse is an output the indexer
  loss may differentiate: d lse / d s = p, so dlse enters as a shift of delta). Per (token, head
  tile) a kernel recomputes p, dp = dO·kv_vᵀ, ds = p·(dp - delta) and accumulates dq = ds·kv in
  registers (no atomics: the program owns its token's dq). The gathered rows' dkv share,
  dsᵀ·q + pᵀ·dO (the dots sum over the tile's heads; computed transposed so the 512 channels are
  the MMA's M), is added into an fp32 [B, S, Dqk] buffer with atomics, then cast to kv's dtype.
  Two forms (BACKWARD): "split" stores p and the scaled ds ([B, Tc, H, K] in the input dtype,
  chunks of Tc tokens under PB_BUDGET_BYTES) and a second kernel per (token, head tile) turns them
  into dkv; "fused" does both in one kernel. Same FLOPs (nothing is recomputed); split moves
  4·T·H·K·2 bytes more (4 GiB, ~1.3 ms at S 4096, K 2048, H 64: ~5% of the backward) but never
  holds dq (64 x 576 fp32) and a dkv tile (BK x 576 fp32) in registers together, which at BK 32
  is ~220 of the 255 registers a thread has, before any operand.
- Why atomics and not an inverse index (slot -> the queries that selected it): the dkv of one
  slot is a sum over (query, head) of ds·q; the heads of one query share that query's q rows,
  which is what makes it an MMA (M = channels, N = slots of the step, K = heads). Grouped by
  slot instead, each (slot, query) pair is a GEMV over the query's [H, Dqk] rows, re-reading q
  once per pair: T·K·H·Dqk·2 bytes, about 600 TB at S 4096, K 2048, H 64, D 576, against T·K·Dqk·4
  bytes (19 GB) of fp32 reductions that the L2 absorbs. Building the inverse index would also
  cost a device sort of T·K pairs per layer. The price of atomics: dkv is not bit-deterministic
  run to run (fp32 sums in arbitrary order), as in FlashAttention-2's dq atomics and TileLang's
  sparse MLA backward.
- Decode (few query tokens: T·B·ceil(H/BH) programs cannot fill the GPU) splits each token's K
  slots over NSPLIT programs that write fp32 partial (o, lse); a merge kernel combines them. The
  split count is a function of shapes and the SM count only: no host sync, graph-capturable.
- Offsets are int64 (B·S·Dqk and B·T·H·Dqk pass 2³¹ at long contexts).
- Accumulation is fp32; p and ds go to the input dtype for the tensor-core dots; fp32 inputs
  take IEEE fp32 dots (no tf32).

Launch configs are a fixed table per (kernel, dtype class, Dqk class) — no autotuner (an
autotuner compiles every candidate at start-up); `deepwish bench dsa --parts kernel --sweep` times
candidates. An entry that does not fit the GPU (OutOfResources at launch) is shrunk once, with a
printed line (`_shrink`): speed changes, results do not.
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from deepwish.kernels.grid import sm_count
from deepwish.kernels.online_softmax import online_softmax_step_scaled
from deepwish.kernels.sparse_mla.reference import check_inputs

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (kind, "16bit" | "fp32", "wide" (Dqk > 256) | "narrow"): (BH, BK, warps, stages). kind: fwd;
# bwd (the fused backward); dq and dkv (the two kernels of the split backward).
# Timed on one H200 (2026-12-03, `deepwish bench dsa --parts kernel --sweep`, the goal shape
# S 4096 / KV 8192, H 64, top-k 2048): fwd (64, 64, 8, 2) 4.36 ms, next (32, 64, 4, 2) 5.41 and
# (64, 64, 8, 1) 5.68; dq (64, 64, 8, 1) 18.8 ms vs (64, 32, 8, 1) 21.2; dkv (64, 64, 8, 2) 17.4 vs
# (64, 32, 8, 2) 18.8 (the split backward's two kernels, timed as the whole backward); the fused
# form's best (64, 16, 8, 2) 32.5 ms. Before that, the 16-bit wide rows were picked from
# ahead-of-time compiles for sm_90a (Triton 3.7, ptxas -v; Dqk 576 = 512 + 64):
#   fwd (64, 64, 8, 2): 216 KiB shared, 255 registers, no spills; (64, 64, 8, 1) and
#       (64, 32, 8, 1) spill ~390 bytes, (64, 32, 8, 2) 144 KiB and no spills, 4 warps spill 3 KB;
#   dq  (64, 32, 8, 1): 172 KiB, spills 32 bytes; stages 2 or BK 64 spill 340-520 bytes;
#   dkv (64, 32, 8, 2): 156 KiB, 167 registers, no spills (its atomics compile to v4.f32);
#   bwd (64, 16, 8, 1): 154 KiB, spills ~700 bytes: the fused form carries dq and a dkv tile.
#       On an H200 (Triton 3.6) that config, (64, 16, 4, 1) and (64, 32, 8, 1) fault with an illegal
#       memory access at T 32-256 over 8192 slots, while (64, 16, 8, 2), (32, 16, 8, 1) and
#       (16, 16, 4, 1) run and match the reference (dq 2.0e-3, dkv 2.3e-3): the same code and masks
#       differ only in tiling and pipelining, so the fused form uses (64, 16, 8, 2).
# fp32 (the exact toggle, FMA dots) uses small tiles; its dq kernel spills (slow, still exact).
TILES = {
    ("fwd", "16bit", "wide"): (64, 64, 8, 2),
    ("bwd", "16bit", "wide"): (64, 16, 8, 2),
    ("dq", "16bit", "wide"): (64, 64, 8, 1),
    ("dkv", "16bit", "wide"): (64, 64, 8, 2),
    ("fwd", "16bit", "narrow"): (64, 64, 4, 2),
    ("bwd", "16bit", "narrow"): (64, 32, 4, 2),
    ("dq", "16bit", "narrow"): (64, 32, 4, 2),
    ("dkv", "16bit", "narrow"): (64, 32, 4, 2),
    ("fwd", "fp32", "wide"): (16, 16, 8, 1),
    ("bwd", "fp32", "wide"): (16, 16, 8, 1),
    ("dq", "fp32", "wide"): (16, 16, 8, 1),
    ("dkv", "fp32", "wide"): (16, 16, 4, 1),
    ("fwd", "fp32", "narrow"): (32, 32, 4, 1),
    ("bwd", "fp32", "narrow"): (32, 16, 4, 1),
    ("dq", "fp32", "narrow"): (32, 16, 4, 1),
    ("dkv", "fp32", "narrow"): (32, 16, 4, 1),
}
# The backward's form: "split" (a dq kernel that stores p and the scaled ds, then a dkv kernel
# that reads them) or "fused" (one kernel; dq and each step's dkv tile live in registers at once).
BACKWARD = "split"
# The split form's p and ds buffers [B, Tc, H, K] (input dtype) take at most this many bytes
# together; longer sequences run in chunks of Tc tokens.
PB_BUDGET_BYTES = 1 << 30
# The forward's online softmax (kernels/online_softmax.py online_softmax_step_scaled): False
# rescales acc every step; a number rescales only when a row's maximum grew by more than that many
# powers of two (at dv 512 the [BH, 512] rescale is a multiply per accumulator element per step,
# beside the step's two matmuls).
FWD_LAZY_RESCALE: float | bool = False
# The forward's slot loop with Triton's automatic warp specialization (tl.range warp_specialize).
FWD_WARP_SPECIALIZE = False
# The forward loads the next step's slot indices one step ahead, in registers carried by the
# loop, so a step's gather addresses never wait on a load issued in the same step.
FWD_INDEX_AHEAD = False
# All three off: on one H200 at the goal shape (reports/dsa.md, fifth run) lazy rescale 5.46 ms,
# index-ahead 6.45, warp specialization 4.44, against 4.41 with none.
DECODE_PROGRAMS_PER_SM = 2  # split-K target: this many programs per SM when tokens alone are too few


def tile_key(kind: str, dtype: torch.dtype, dqk: int) -> tuple[str, str, str]:
    return kind, "fp32" if dtype == torch.float32 else "16bit", "wide" if dqk > 256 else "narrow"


def tile_config(kind: str, dtype: torch.dtype, dqk: int, H: int) -> dict:
    """BH, BK, warps, stages for one kernel from TILES; BH never exceeds H rounded up to the MMA
    minimum of 16 rows. The interpreter takes 16-row, 16-slot tiles (a handful of slots then
    crosses several steps)."""
    if _INTERPRET:
        bh, bk, w, st = 16, 16, 1, 1
    else:
        bh, bk, w, st = TILES[tile_key(kind, dtype, dqk)]
    bh = min(bh, max(16, triton.next_power_of_2(H)))
    return dict(BH=bh, BK=bk, num_warps=w, num_stages=st)


def _shrink(key: tuple[str, str, str], err: OutOfResources) -> None:
    """A TILES entry that does not fit this GPU (shared memory, registers) is replaced, loudly and
    once, by the next smaller one: one pipeline stage less, else half the slots per step. Shapes
    and results are unchanged; only speed is. The head tile and warps stay (the grid stays)."""
    bh, bk, w, st = TILES[key]
    if st > 1:
        new = (bh, bk, w, st - 1)
    elif bk > 16:
        new = (bh, bk // 2, w, st)
    else:
        raise err
    print(f"[deepwish] sparse_mla: launch config {'|'.join(key)} {TILES[key]} does not fit this GPU ({err}); "
          f"using {new}", file=sys.stderr)
    TILES[key] = new


def _launch(kernel, kind: str, q: torch.Tensor, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs, **its TILES config), shrinking a config that does not fit."""
    key = tile_key(kind, q.dtype, q.shape[-1])
    while True:
        try:
            kernel[grid](*args, **kwargs, **tile_config(kind, q.dtype, q.shape[-1], q.shape[2]))
            return
        except OutOfResources as e:
            _shrink(key, e)


def plan_splits(n_programs: int, K: int, BK: int, device: torch.device) -> tuple[int, int]:
    """(splits, slots per split, a multiple of BK) of the forward: 1 split while the tokens'
    programs alone fill DECODE_PROGRAMS_PER_SM per SM, else enough to, at >= 2 steps each."""
    sms = sm_count(device)
    want = DECODE_PROGRAMS_PER_SM * sms
    K = max(K, 1)
    if n_programs >= want:
        return 1, triton.cdiv(K, BK) * BK
    splits = min(triton.cdiv(want, n_programs), max(1, triton.cdiv(K, 2 * BK)))
    chunk = triton.cdiv(triton.cdiv(K, splits), BK) * BK
    return triton.cdiv(K, chunk), chunk


def _meta(q: torch.Tensor, dv: int) -> dict:
    dqk = q.shape[-1]
    dr = dqk - dv
    return dict(DV=dv, DR=dr, BLOCK_V=max(16, triton.next_power_of_2(dv)),
                BLOCK_R=max(16, triton.next_power_of_2(max(dr, 1))), HAS_TAIL=dr > 0,
                PREC="ieee" if q.dtype == torch.float32 else "tf32")


@triton.jit
def _load_q(Q, base, h64, h_ok, dvr, dr, DV, DR, stride_h, HAS_TAIL: tl.constexpr, BH: tl.constexpr,
            BLOCK_R: tl.constexpr):
    """The BH rows' value part [BH, BLOCK_V] and rope tail [BH, BLOCK_R] (zeros without a tail)."""
    qv = tl.load(Q + base + h64[:, None] * stride_h + dvr[None, :], mask=h_ok[:, None] & (dvr < DV)[None, :], other=0.0)
    if HAS_TAIL:
        qr = tl.load(Q + base + h64[:, None] * stride_h + DV + dr[None, :],
                     mask=h_ok[:, None] & (dr < DR)[None, :], other=0.0)
    else:
        qr = tl.zeros([BH, BLOCK_R], dtype=qv.dtype)
    return qv, qr


@triton.jit
def _gather(KV, kv_base, slot, ok, dvr, dr, DV, DR, stride_s, HAS_TAIL: tl.constexpr, BK: tl.constexpr,
            BLOCK_R: tl.constexpr):
    """The selected cache rows: value part [BK, BLOCK_V], rope tail [BK, BLOCK_R]; -1 slots load 0."""
    row = kv_base + tl.cast(slot, tl.int64) * stride_s
    kv_v = tl.load(KV + row[:, None] + dvr[None, :], mask=ok[:, None] & (dvr < DV)[None, :], other=0.0)
    if HAS_TAIL:
        kv_r = tl.load(KV + row[:, None] + DV + dr[None, :], mask=ok[:, None] & (dr < DR)[None, :], other=0.0)
    else:
        kv_r = tl.zeros([BK, BLOCK_R], dtype=kv_v.dtype)
    return kv_v, kv_r


@triton.jit
def _scores(qv, qr, kv_v, kv_r, HAS_TAIL: tl.constexpr, PREC: tl.constexpr):
    s = tl.dot(qv, tl.trans(kv_v), input_precision=PREC)
    if HAS_TAIL:
        s = tl.dot(qr, tl.trans(kv_r), s, input_precision=PREC)
    return s


@triton.jit
def _fwd_kernel(Q, KV, IDX, O, LSE, OP, LP,
                sq_b, sq_t, sq_h, skv_b, skv_s, si_b, si_t, so_b, so_t, so_h,
                T, H, K, DV, DR, NSPLIT, CHUNK, scale_log2,
                BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, HAS_TAIL: tl.constexpr, SPLIT: tl.constexpr,
                PREC: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, LAZY: tl.constexpr, WS: tl.constexpr,
                AHEAD: tl.constexpr):
    pid = tl.program_id(0)
    t = pid // NSPLIT
    sp = pid % NSPLIT
    hb = tl.program_id(1)
    b = tl.cast(tl.program_id(2), tl.int64)
    t64 = tl.cast(t, tl.int64)
    h = hb * BH + tl.arange(0, BH)
    h_ok = h < H
    h64 = tl.cast(h, tl.int64)
    dvr = tl.arange(0, BLOCK_V)
    dr = tl.arange(0, BLOCK_R)
    qv, qr = _load_q(Q, b * sq_b + t64 * sq_t, h64, h_ok, dvr, dr, DV, DR, sq_h, HAS_TAIL, BH, BLOCK_R)
    kv_base = b * skv_b
    idx_base = b * si_b + t64 * si_t
    k_lo = sp * CHUNK
    k_hi = tl.minimum(k_lo + CHUNK, K)
    acc = tl.zeros([BH, BLOCK_V], dtype=tl.float32)
    m_i = tl.full([BH], -1.0e30, dtype=tl.float32)  # finite: a step of only -1 slots stays NaN-free
    l_i = tl.zeros([BH], dtype=tl.float32)
    if AHEAD:
        kk = k_lo + tl.arange(0, BK)
        slot_next = tl.load(IDX + idx_base + kk, mask=kk < k_hi, other=-1)
    for k0 in tl.range(k_lo, k_hi, BK, warp_specialize=WS):
        if AHEAD:
            slot = slot_next
            kk = k0 + BK + tl.arange(0, BK)
            slot_next = tl.load(IDX + idx_base + kk, mask=kk < k_hi, other=-1)
        else:
            kk = k0 + tl.arange(0, BK)
            slot = tl.load(IDX + idx_base + kk, mask=kk < k_hi, other=-1)
        ok = slot >= 0
        kv_v, kv_r = _gather(KV, kv_base, slot, ok, dvr, dr, DV, DR, skv_s, HAS_TAIL, BK, BLOCK_R)
        s = tl.where(ok[None, :], _scores(qv, qr, kv_v, kv_r, HAS_TAIL, PREC), float("-inf"))
        acc, m_i, l_i = online_softmax_step_scaled(acc, m_i, l_i, s, scale_log2, kv_v, PREC, LAZY)
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if SPLIT:
        # partials [B, T, NSPLIT, H, BLOCK_V] and [B, T, NSPLIT, H], fp32, contiguous
        prow = ((b * T + t64) * NSPLIT + sp) * H + h64
        tl.store(OP + prow[:, None] * BLOCK_V + dvr[None, :], o, mask=h_ok[:, None])
        tl.store(LP + prow, lse, mask=h_ok)
    else:
        tl.store(O + b * so_b + t64 * so_t + h64[:, None] * so_h + dvr[None, :], o.to(O.dtype.element_ty),
                 mask=h_ok[:, None] & (dvr < DV)[None, :])
        tl.store(LSE + (b * T + t64) * H + h64, lse, mask=h_ok)


@triton.jit
def _merge_kernel(OP, LP, O, LSE, so_b, so_t, so_h, T, H, DV, NSPLIT,
                  BLOCK_V: tl.constexpr, BS: tl.constexpr):
    """One (b, t, h): lse = logsumexp over splits, o = sum_i exp(lse_i - lse) o_i."""
    row = tl.cast(tl.program_id(0), tl.int64)  # (b·T + t)·H + h
    h = row % H
    bt = row // H
    t = bt % T
    b = bt // T
    sp = tl.arange(0, BS)
    sp_ok = sp < NSPLIT
    prow = (bt * NSPLIT + sp) * H + h
    lse_i = tl.load(LP + prow, mask=sp_ok, other=float("-inf"))
    m = tl.max(lse_i, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_i - m_safe)  # 0 for empty splits and padding
    tot = tl.sum(w, 0)
    d = tl.arange(0, BLOCK_V)
    o_i = tl.load(OP + prow[:, None] * BLOCK_V + d[None, :], mask=sp_ok[:, None], other=0.0)
    o = tl.sum(o_i * w[:, None], 0) / tl.where(tot == 0.0, 1.0, tot)
    tl.store(O + b * so_b + t * so_t + h * so_h + d, o.to(O.dtype.element_ty), mask=d < DV)
    tl.store(LSE + row, tl.where(tot == 0.0, float("-inf"), m_safe + tl.log(tl.where(tot == 0.0, 1.0, tot))))


@triton.jit
def _delta_kernel(O, DO, DLSE, DELTA, ROWS, DV, HAS_DLSE: tl.constexpr, BR: tl.constexpr, BLOCK_V: tl.constexpr):
    """delta[row] = sum_d dO·O - dlse over the rows of contiguous [rows, DV] tensors."""
    row = tl.program_id(0) * BR + tl.arange(0, BR)
    row64 = tl.cast(row, tl.int64)
    d = tl.arange(0, BLOCK_V)
    m = (row < ROWS)[:, None] & (d < DV)[None, :]
    o = tl.load(O + row64[:, None] * DV + d[None, :], mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + row64[:, None] * DV + d[None, :], mask=m, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + row64, mask=row < ROWS, other=0.0)
    tl.store(DELTA + row64, delta, mask=row < ROWS)


@triton.jit
def _add_dkv(DKV, dkv_base, slot, ok, qv, qr, do, p, ds, dvr, dr, DV, DR, HAS_TAIL: tl.constexpr,
             PREC: tl.constexpr):
    """One token's share of its gathered rows' gradient, summed over the tile's heads by the dots,
    added into the fp32 [B, S, Dqk] buffer: dkv_v = pᵀ·dO + dsᵀ·q_v, dkv_r = dsᵀ·q_r (p, ds [BH, BK]
    in the dot dtype, ds already scaled). Computed transposed ([channels, BK] = qᵀ·ds): the channel
    dimension (512) is the MMA's M, not BK."""
    drow = dkv_base + tl.cast(slot, tl.int64) * (DV + DR)
    dkv_v = tl.dot(tl.trans(do), p, input_precision=PREC)
    dkv_v = tl.dot(tl.trans(qv), ds, dkv_v, input_precision=PREC)
    tl.atomic_add(DKV + drow[None, :] + dvr[:, None], dkv_v, mask=(dvr < DV)[:, None] & ok[None, :], sem="relaxed")
    if HAS_TAIL:
        dkv_r = tl.dot(tl.trans(qr), ds, input_precision=PREC)
        tl.atomic_add(DKV + drow[None, :] + DV + dr[:, None], dkv_r, mask=(dr < DR)[:, None] & ok[None, :],
                      sem="relaxed")


@triton.jit
def _bwd_kernel(Q, KV, IDX, DO, LSE, DELTA, DQ, DKV, PB, DSB,
                sq_b, sq_t, sq_h, skv_b, skv_s, si_b, si_t, sdo_b, sdo_t, sdo_h, sdq_b, sdq_t, sdq_h,
                S, T, H, K, DV, DR, T0, TC, scale, scale_log2,
                BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, HAS_TAIL: tl.constexpr, FUSED: tl.constexpr,
                PREC: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    """dq of one (token, head tile); FUSED also adds the token's dkv share by atomics, else p and
    the scaled ds go to the [B, TC, H, K] buffers of the chunk of tokens [T0, T0 + TC) for
    `_dkv_kernel`."""
    tc = tl.program_id(0)
    t = T0 + tc
    hb = tl.program_id(1)
    b = tl.cast(tl.program_id(2), tl.int64)
    t64 = tl.cast(t, tl.int64)
    h = hb * BH + tl.arange(0, BH)
    h_ok = h < H
    h64 = tl.cast(h, tl.int64)
    dvr = tl.arange(0, BLOCK_V)
    dr = tl.arange(0, BLOCK_R)
    qv, qr = _load_q(Q, b * sq_b + t64 * sq_t, h64, h_ok, dvr, dr, DV, DR, sq_h, HAS_TAIL, BH, BLOCK_R)
    do = tl.load(DO + b * sdo_b + t64 * sdo_t + h64[:, None] * sdo_h + dvr[None, :],
                 mask=h_ok[:, None] & (dvr < DV)[None, :], other=0.0)
    row = (b * T + t64) * H + h64
    lse = tl.load(LSE + row, mask=h_ok, other=0.0)
    # a token that selected nothing has lse = -inf and every slot masked: keep exp2 NaN-free
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(DELTA + row, mask=h_ok, other=0.0)
    # padded head rows (h >= H) load q = dO = 0, lse = delta = 0: their p is 1 on valid slots but
    # their ds (p·(0 - 0)) and dO are 0, so they add nothing to dkv
    dq_v = tl.zeros([BH, BLOCK_V], dtype=tl.float32)
    dq_r = tl.zeros([BH, BLOCK_R], dtype=tl.float32)
    kv_base = b * skv_b
    dkv_base = b * S * (DV + DR)  # the fp32 dkv buffer is contiguous [B, S, Dqk]
    idx_base = b * si_b + t64 * si_t
    buf_row = ((b * TC + tc) * H + h64) * K
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        slot = tl.load(IDX + idx_base + kk, mask=kk < K, other=-1)
        ok = slot >= 0
        kv_v, kv_r = _gather(KV, kv_base, slot, ok, dvr, dr, DV, DR, skv_s, HAS_TAIL, BK, BLOCK_R)
        s = _scores(qv, qr, kv_v, kv_r, HAS_TAIL, PREC)
        p = tl.exp2(s * scale_log2 - lse2[:, None])
        p = tl.where(ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(kv_v), input_precision=PREC)
        ds = p * (dp - delta[:, None])  # d loss / d (scaled score)
        ds_c = ds.to(kv_v.dtype)
        dq_v = tl.dot(ds_c, kv_v, dq_v, input_precision=PREC)
        if HAS_TAIL:
            dq_r = tl.dot(ds_c, kv_r, dq_r, input_precision=PREC)
        if FUSED:
            _add_dkv(DKV, dkv_base, slot, ok, qv, qr, do, p.to(do.dtype), (ds * scale).to(qv.dtype), dvr, dr,
                     DV, DR, HAS_TAIL, PREC)
        else:
            bm = h_ok[:, None] & (kk < K)[None, :]
            tl.store(PB + buf_row[:, None] + kk[None, :], p.to(PB.dtype.element_ty), mask=bm)
            tl.store(DSB + buf_row[:, None] + kk[None, :], (ds * scale).to(DSB.dtype.element_ty), mask=bm)
    dq_base = b * sdq_b + t64 * sdq_t + h64[:, None] * sdq_h
    tl.store(DQ + dq_base + dvr[None, :], (dq_v * scale).to(DQ.dtype.element_ty),
             mask=h_ok[:, None] & (dvr < DV)[None, :])
    if HAS_TAIL:
        tl.store(DQ + dq_base + DV + dr[None, :], (dq_r * scale).to(DQ.dtype.element_ty),
                 mask=h_ok[:, None] & (dr < DR)[None, :])


@triton.jit
def _dkv_kernel(Q, IDX, DO, DKV, PB, DSB,
                sq_b, sq_t, sq_h, si_b, si_t, sdo_b, sdo_t, sdo_h,
                S, H, K, DV, DR, T0, TC,
                BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, HAS_TAIL: tl.constexpr,
                PREC: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    """The dkv share of one (token, head tile) from the p and ds that `_bwd_kernel` stored."""
    tc = tl.program_id(0)
    t64 = tl.cast(T0 + tc, tl.int64)
    hb = tl.program_id(1)
    b = tl.cast(tl.program_id(2), tl.int64)
    h = hb * BH + tl.arange(0, BH)
    h_ok = h < H
    h64 = tl.cast(h, tl.int64)
    dvr = tl.arange(0, BLOCK_V)
    dr = tl.arange(0, BLOCK_R)
    qv, qr = _load_q(Q, b * sq_b + t64 * sq_t, h64, h_ok, dvr, dr, DV, DR, sq_h, HAS_TAIL, BH, BLOCK_R)
    do = tl.load(DO + b * sdo_b + t64 * sdo_t + h64[:, None] * sdo_h + dvr[None, :],
                 mask=h_ok[:, None] & (dvr < DV)[None, :], other=0.0)
    dkv_base = b * S * (DV + DR)
    idx_base = b * si_b + t64 * si_t
    buf_row = ((b * TC + tc) * H + h64) * K
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        slot = tl.load(IDX + idx_base + kk, mask=kk < K, other=-1)
        ok = slot >= 0
        bm = h_ok[:, None] & ok[None, :]
        p = tl.load(PB + buf_row[:, None] + kk[None, :], mask=bm, other=0.0)
        ds = tl.load(DSB + buf_row[:, None] + kk[None, :], mask=bm, other=0.0)
        _add_dkv(DKV, dkv_base, slot, ok, qv, qr, do, p, ds, dvr, dr, DV, DR, HAS_TAIL, PREC)


def _check(q, kv, indices, dv):
    check_inputs(q, kv, indices, dv)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"sparse_mla: the Triton kernel takes fp32, fp16 or bf16, got {q.dtype}")
    if not _INTERPRET and not q.is_cuda:
        raise ValueError("sparse_mla: the Triton kernel needs CUDA tensors (use backend='torch' on CPU)")
    for name, x in (("q", q), ("kv", kv), ("indices", indices)):
        if x.stride(-1) != 1:
            raise ValueError(f"sparse_mla: {name} must be contiguous in its last dim")
    if q.shape[-1] - dv > 256:
        raise ValueError(f"sparse_mla: the rope tail Dqk - dv must be <= 256, got {q.shape[-1] - dv}")


def forward(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, dv: int, scale: float,
            splits: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse). splits 0 = plan_splits; > 0 forces that many K splits (tests, sweeps)."""
    B, T, H, D = q.shape
    K = indices.shape[2]
    meta = _meta(q, dv)
    o = torch.empty(B, T, H, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    if T == 0 or H == 0:
        return o, lse
    while True:  # once more with a smaller config if this one does not fit (see _shrink)
        cfg = tile_config("fwd", q.dtype, D, H)
        nhb = triton.cdiv(H, cfg["BH"])
        if splits <= 0:
            n_split, chunk = plan_splits(B * T * nhb, K, cfg["BK"], q.device)
        else:
            chunk = triton.cdiv(triton.cdiv(max(K, 1), splits), cfg["BK"]) * cfg["BK"]
            n_split = triton.cdiv(max(K, 1), chunk)
        split = n_split > 1
        if split:
            op = torch.empty(B, T, n_split, H, meta["BLOCK_V"], dtype=torch.float32, device=q.device)
            lp = torch.empty(B, T, n_split, H, dtype=torch.float32, device=q.device)
        else:
            op = lp = lse  # unused
        try:
            _fwd_kernel[(T * n_split, nhb, B)](
                q, kv, indices, o, lse, op, lp, *q.stride()[:3], *kv.stride()[:2], *indices.stride()[:2],
                *o.stride()[:3], T, H, K, meta["DV"], meta["DR"], n_split, chunk, scale * LOG2E,
                BLOCK_V=meta["BLOCK_V"], BLOCK_R=meta["BLOCK_R"], HAS_TAIL=meta["HAS_TAIL"], SPLIT=split,
                PREC=meta["PREC"], LAZY=float(FWD_LAZY_RESCALE or 0.0), WS=bool(FWD_WARP_SPECIALIZE),
                AHEAD=bool(FWD_INDEX_AHEAD), **cfg)
            break
        except OutOfResources as e:
            _shrink(tile_key("fwd", q.dtype, D), e)
    if split:
        _merge_kernel[(B * T * H,)](op, lp, o, lse, *o.stride()[:3], T, H, dv, n_split,
                                    BLOCK_V=meta["BLOCK_V"], BS=max(2, triton.next_power_of_2(n_split)))
    return o, lse


def backward_delta(o: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    """delta = rowsum(dO·O) - dlse, [B, T, H] fp32 (o, do contiguous)."""
    B, T, H, DV = o.shape
    delta = torch.empty(B, T, H, dtype=torch.float32, device=o.device)
    rows = B * T * H
    BR = 16 if _INTERPRET else 32
    _delta_kernel[(triton.cdiv(rows, BR),)](o, do, delta if dlse is None else dlse, delta, rows, DV,
                                            HAS_DLSE=dlse is not None, BR=BR,
                                            BLOCK_V=max(16, triton.next_power_of_2(DV)))
    return delta


def backward(q, kv, indices, o, lse, do, dlse, dv: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dkv) given dO (contiguous) and dlse (contiguous fp32, or None)."""
    B, T, H, D = q.shape
    S, K = kv.shape[1], indices.shape[2]
    meta = _meta(q, dv)
    delta = backward_delta(o, do, dlse)
    dq = torch.empty_like(q)
    dkv = torch.zeros(B, S, D, dtype=torch.float32, device=q.device)
    if T == 0 or H == 0 or K == 0:
        return dq.zero_(), dkv.to(kv.dtype)
    fused = BACKWARD == "fused"
    kind = "bwd" if fused else "dq"
    nhb = triton.cdiv(H, tile_config(kind, q.dtype, D, H)["BH"])
    tc = T if fused else max(1, min(T, PB_BUDGET_BYTES // (2 * B * H * K * q.element_size())))
    if fused:
        pb = dsb = dkv  # unused
    else:
        pb = torch.empty(B, tc, H, K, dtype=q.dtype, device=q.device)
        dsb = torch.empty_like(pb)
        nhb_dkv = triton.cdiv(H, tile_config("dkv", q.dtype, D, H)["BH"])
    common = dict(BLOCK_V=meta["BLOCK_V"], BLOCK_R=meta["BLOCK_R"], HAS_TAIL=meta["HAS_TAIL"], PREC=meta["PREC"])
    for t0 in range(0, T, tc):
        n = min(tc, T - t0)
        _launch(_bwd_kernel, kind, q, (n, nhb, B),
                q, kv, indices, do, lse, delta, dq, dkv, pb, dsb, *q.stride()[:3], *kv.stride()[:2],
                *indices.stride()[:2], *do.stride()[:3], *dq.stride()[:3], S, T, H, K, meta["DV"], meta["DR"],
                t0, tc, scale, scale * LOG2E, FUSED=fused, **common)
        if not fused:
            _launch(_dkv_kernel, "dkv", q, (n, nhb_dkv, B),
                    q, indices, do, dkv, pb, dsb, *q.stride()[:3], *indices.stride()[:2], *do.stride()[:3],
                    S, H, K, meta["DV"], meta["DR"], t0, tc, **common)
    return dq, dkv.to(kv.dtype)


# Custom ops: torch.compile sees opaque calls with known output shapes.
@torch.library.custom_op("deepwish::sparse_mla_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, dv: int, scale: float,
            splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(q, kv, indices, dv, scale, splits)


@_fwd_op.register_fake
def _(q, kv, indices, dv, scale, splits):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, dv), q.new_empty(B, T, H, dtype=torch.float32)


@torch.library.custom_op("deepwish::sparse_mla_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            do: torch.Tensor, dlse: torch.Tensor | None, dv: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return backward(q, kv, indices, o, lse, do, dlse, dv, scale)


@_bwd_op.register_fake
def _(q, kv, indices, o, lse, do, dlse, dv, scale):
    return torch.empty_like(q), torch.empty_like(kv)


def _setup_context(ctx, inputs, output):
    q, kv, indices, dv, scale, splits = inputs
    o, lse = output
    ctx.save_for_backward(q, kv, indices, o, lse)
    ctx.opts = (dv, scale)


def _backward(ctx, do, dlse):
    q, kv, indices, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    dq, dkv = _bwd_op(q, kv, indices, o, lse, do.contiguous(), dlse, *ctx.opts)
    return dq, dkv, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def sparse_mla(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, *, dv: int, scale: float,
               splits: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, dv], lse [B, T, H] fp32); see the package doc. Differentiable in q and kv.
    `splits` > 0 forces the forward's K-split count (0: planned from the shapes)."""
    _check(q, kv, indices, dv)
    return _fwd_op(q, kv, indices, int(dv), float(scale), int(splits))
