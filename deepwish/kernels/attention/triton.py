"""Flash attention (forward and backward) in Triton: causal, packed documents, sliding window,
grouped-query heads, soft-capping, any scale; head dims up to 256, Dqk != Dv allowed.

Same semantics as `reference.py` (read it first). Shape legend: B batch, T tokens, H query heads,
Hkv key/value heads, G = H / Hkv, GP = G rounded up to a power of two, BM query rows and BN keys
per tile, BT = BM / GP tokens per query tile.

Design (FlashAttention-2, the online softmax in base 2):
- Grouped heads are folded into the rows of a tile: a program owns one key/value head and BT
  consecutive tokens, and its BM = BT·GP rows are (token, query head of the group) pairs, row
  i = token m0 + i // GP, head hkv·G + i % GP. Every loaded K/V tile then serves all G query
  heads that read it, and K/V are never repeated in memory. Rows of heads >= G (GP > G) and of
  tokens >= T are padding: loaded as zeros, never stored.
- Documents are maximal runs of equal ids, described per token by the start and end of its
  run (int32 [B, T], computed once per call in torch). A program reads those of its first and
  last token and visits only the key tiles from its documents' start (or the window's start)
  up to its last token; in the backward, a key tile visits query tiles from itself up to the
  end of its document (or window). Work is O(sum of doc_len²) and O(T·W), not O(T²).
- In a masked tile a (row, key) pair is visible iff first_key(row) <= key <= row, first_key being
  the later of the row's document start and window start (documents are contiguous runs): two
  compares against per-row values, no per-key document ids.
- Visited tiles are split into three ranges: interior tiles where every (row, key) pair is
  visible run without any mask arithmetic; the tiles at the document/window start and on the
  diagonal apply the full mask.
- Scores go to base 2 once: the forward folds scale·log2(e) (softcap: softcap·log2(e), after the
  tanh) into the exponent's FMA, 2^(c·s - m) (online_softmax_step_scaled), the softmax runs on exp2.
- Forward saves the row log-sum-exp (base 2, fp32 [B, T, H]). Backward: a small kernel computes
  delta = rowsum(dO·O); one kernel per key tile computes dK, dV iterating over query tiles (the
  G heads of the group are summed by the tile's own dot products: no atomics; with SPLIT two
  programs per key tile, one per sum, each holding one fp32 accumulator); a second kernel
  per query tile computes dQ iterating over key tiles. Both are deterministic (BACKWARD_DQ =
  "atomic" instead adds dQ from the dK/dV kernel with fp32 atomics: five matmuls instead of
  seven, not bit-deterministic; see BACKWARD_DQ). The dK/dV kernel
  works on transposed scores (keys as rows: Sᵀ = K·Qᵀ), so Pᵀ and dSᵀ are the left operands of
  their dots straight from registers; the untransposed form needs a register transpose
  (a round trip through shared memory) of two BN×BM tiles per step, which halved its speed.
- The forward and dQ kernels stream K/V tiles of one KV head through tensor descriptors (LOADS:
  Hopper's copy engine fetches a tile with one instruction and zero-fills past T and past the
  head dim); inputs it cannot take keep per-element pointer loads.
- Offsets are int64 (B·T·H·D passes 2³¹ at long T).
- Accumulation is fp32; P and dS are cast to the input dtype for the tensor-core dots; fp32
  inputs take IEEE fp32 dots (no tf32), the exact toggle.

Simplifications: head dims are padded to a power of two inside the kernel (Dqk=192 computes
256-wide dot products); G <= 64; the document description costs two small torch ops per call.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from deepwish.kernels.attention.reference import check_inputs
from deepwish.kernels.documents import document_ends, document_starts
from deepwish.kernels.online_softmax import online_softmax_step_scaled

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
MAX_GROUP = 64
NO_WINDOW = 1 << 30  # "window" of a full-causal call: larger than any T

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Launch configs per (kernel, head-dim class, dtype class, length class): BM query rows (folded
# heads), BN keys, warps, pipeline stages. A fixed table rather than an autotuner: an autotuner
# compiles every candidate for every shape class, minutes of start-up per training run. The bf16
# rows come from the tile sweep (python -m deepwish.bench.attention_tiles) and two bench runs on
# one H200, 2026-12-03 (reports/attention.md). "short" = T < LONG_T: picked on B8 T2k with 4
# documents per row and B1 T16k causal; small dK/dV tiles (32 x 64) waste least where documents
# end inside a tile. "long" = T >= LONG_T: the 64 x 128 dK/dV tile (and 128 x 128 forward)
# was 4-7% faster at T64k (1 or 16 documents), but 3-14% slower at T16k with 4-16 documents per
# row or a 512 window, hence the threshold above 16k.
LONG_T = 32768
TILES = {
    # (kind, "d128" | "d256", "16bit" | "fp32", "short" | "long"): (BM, BN, warps, stages)
    ("fwd", "d128", "16bit", "short"): (128, 128, 8, 3),  # with "tma" loads: the sweep's pick, H100 2026-12-06
    ("dkdv", "d128", "16bit", "short"): (32, 64, 4, 3),
    ("dq", "d128", "16bit", "short"): (128, 64, 8, 3),
    ("fwd", "d128", "16bit", "long"): (128, 128, 8, 3),
    ("dkdv", "d128", "16bit", "long"): (64, 128, 8, 3),  # 64 x 128: 12% faster than 32 x 64 at T16k causal
    ("dq", "d128", "16bit", "long"): (128, 64, 8, 3),
    ("fwd", "d256", "16bit", "short"): (128, 64, 8, 2),
    ("dkdv", "d256", "16bit", "short"): (32, 128, 8, 3, 1),  # SPLIT: 0.758 vs 0.929 ms (64 x 64 w8 s2), B2 T2k
    ("dq", "d256", "16bit", "short"): (128, 32, 8, 2),
    ("fwd", "d256", "16bit", "long"): (128, 64, 8, 2),
    ("dkdv", "d256", "16bit", "long"): (32, 128, 8, 3, 1),  # SPLIT: 24.0 vs 32.4 ms, B1 T32k 4 docs
    ("dq", "d256", "16bit", "long"): (128, 32, 8, 2),
    # the dK/dV kernel with dq atomics (BACKWARD_DQ = "atomic" / "atomic_t"; attention_tiles
    # --kinds dkdvq sweeps the orientation BACKWARD_DQ names), not timed yet: one atomic per
    # (row, channel) per key tile, so the most keys per program (BN 128 at d128); the dq tile
    # [BM, Dqk] fp32 costs registers. Registers (sm_90, triton 3.7, attention_tiles --parts regs,
    # compiled with the launch's 16-divisibility of pointers, strides and sizes): dkdvq d128
    # 32 x 128 w8 232 (atomic) / 250 (atomic_t), no spills; d256 32 x 64 w8 332 bytes of spills
    # (its sᵀ/dpᵀ dots run twice: see SPLIT in _dkdv_kernel). Hence BM 32 (at d128 "atomic" then
    # runs its M = 32 dq dot on mma.sync instead of wgmma).
    # The dK/dV rows above, same compile: dkdv d128 32 x 64 w4 249 registers, no spills; 64 x 128 w8
    # 255, 12 bytes spilled outside the loops; d256 64 x 64 w8 344 bytes, and its 64 keys over
    # 8 warps make both warpgroups compute the same sᵀ and dpᵀ (6 matmul units of work for 4).
    # A fifth entry SPLIT = 1 runs dK and dV in separate programs (no spills at d256 32 x 128 w8):
    # the d256 rows since the focus sweep of 2026-12-03 (18-26% faster than 64 x 64 w8 s2); at
    # d128 it lost (64 x 128 w8 s3: 0.611 vs 0.491 ms at B8 T2k, 104.6 vs 78.6 at T64k causal).
    ("dkdvq", "d128", "16bit", "short"): (32, 128, 8, 3),
    ("dkdvq", "d128", "16bit", "long"): (32, 128, 8, 3),
    ("dkdvq", "d256", "16bit", "short"): (32, 64, 8, 2),
    ("dkdvq", "d256", "16bit", "long"): (32, 64, 8, 2),
    # fp32 (the exact toggle): half the tile of 16-bit inputs, not swept
    ("fwd", "d128", "fp32", "short"): (64, 32, 4, 2),
    ("dkdv", "d128", "fp32", "short"): (32, 64, 4, 1),
    ("dq", "d128", "fp32", "short"): (64, 32, 4, 1),
    ("dkdvq", "d128", "fp32", "short"): (32, 64, 4, 1),
    ("fwd", "d256", "fp32", "short"): (32, 32, 4, 2),
    ("dkdv", "d256", "fp32", "short"): (32, 32, 4, 1),
    ("dq", "d256", "fp32", "short"): (32, 32, 4, 1),
    ("dkdvq", "d256", "fp32", "short"): (32, 32, 4, 1),
}

# How the backward gets dq:
# - "kernel" (default): a second kernel per query tile recomputes s and dp and sums ds·k in
#   registers. Seven matmuls per visited (row, key) tile pair (dK/dV kernel: sᵀ, dv, dpᵀ, dk; dQ
#   kernel: s, dp, dq), no atomics, bit-deterministic.
# - "atomic": the dK/dV kernel also computes ds·k for each query tile it visits and adds it with
#   fp32 atomics into a [B, T, H, Dqk] buffer (FlashAttention-2's way). Five matmuls, and per
#   step BM·Dqk atomic adds, one per (row, channel) and key tile: with BN keys per program that is
#   one atomic per 10·BN flops of the step's five matmuls (d128, BN 128: 1,280). The order of
#   the fp32 sums varies run to run: dq is NOT bit-deterministic (dk and dv still are).
#   The dsᵀ [BN, BM] the kernel holds must become ds [BM, BN] for dq = ds·k: a transposing
#   shared-memory round trip of one 16-bit tile per step (BN·BM·2 bytes: 16 KiB at 128 x 64),
#   where getting ds without it would take a second score and dp dot (two matmuls, the cost the
#   atomic form exists to remove). Its [BM, Dqk] result keeps channels together per thread.
# - "atomic_t": the same, with the dot in the other orientation, dqᵀ = kᵀ·dsᵀ [Dqk, BM]: dsᵀ is
#   the right operand as it is (stored to shared memory, which the right operand takes anyway; no
#   transposing load), kᵀ is loop-invariant; each thread's neighbouring results are rows H·Dqk
#   apart, so the atomics scatter more. Which costs less is for the GPU to say
#   (`deepwish bench attention --dq-forms kernel,atomic,atomic_t`).
BACKWARD_DQ = "kernel"
BACKWARD_DQ_FORMS = ("kernel", "atomic", "atomic_t")

# How the forward and dQ kernels load the K and V tiles they stream (LOADS[kind]):
# - "pointer": a tile of per-element addresses (int64 offsets, masks at T and at the head dim),
#   which Triton pipelines with asynchronous copies (cp.async) over num_stages buffers;
# - "tma": a tensor descriptor over the [B, T, heads, D] tensor (Hopper's tensor memory
#   accelerator: one instruction copies the tile, the copy engine computes the addresses and
#   zero-fills rows past T and channels past D, so the loop holds no address or mask arithmetic).
#   16-bit inputs whose base and strides are 16-byte aligned; anything else takes "pointer".
# Two ways to overlap the forward's softmax with its matmuls were compiled offline for sm_90
# (Triton 3.7, 128 x 64 tile, 8 warps, the descriptors) and dropped: tl.range(warp_specialize=True)
# leaves the loop unpartitioned at 8 warps and fails in its pass at 4; issuing the next tile's
# q·kᵀ before this tile's exponentials (FlashAttention-3's order, written by hand) gets the wait
# for that matmul placed right after it, before the exponentials: no overlap, 55 more registers.
# Timed on one H100 (2026-12-06, attention_tiles --focus --kinds fwd,dq --loads pointer,tma; reports/
# attention.md, run 7): "tma" faster in 31 of 33 (kernel, tile, shape) pairs, within 1.3% in the
# other two (forward 128 x 128 s3 at T16k causal 2.141 -> 2.169 ms; 128 x 64 s3 at B8 T2k 0.2587 ->
# 0.2590); forward 128 x 64 s3 at T16k 2.366 -> 2.275 ms, T64k (128 x 128) 34.07 -> 32.98; dQ T16k
# 2.682 -> 2.549, T64k 47.45 -> 40.69; d256 forward 0.134 -> 0.121 ms.
# The dK/dV kernels stream q and dO tiles of folded rows; through descriptors (a [1, BT, G, D] box
# reshaped to the BM rows, power-of-two groups) they were no faster on the same H100 (32 x 64 w4
# s3: 4.843 -> 4.850 ms at T16k causal; 64 x 128 w8 s3 77.33 -> 77.65 at T64k; d256 SPLIT 1.291 ->
# 1.316 at T4k; run 7): they keep pointers, and the form was removed.
LOADS = {"fwd": "tma", "dq": "tma"}
LOADS_FORMS = ("pointer", "tma")


def tile_key(kind: str, head_dim: int, dtype: torch.dtype, T: int) -> tuple[str, str, str, str]:
    fp32 = dtype == torch.float32
    return (kind, "d128" if head_dim <= 128 else "d256", "fp32" if fp32 else "16bit",
            "long" if T >= LONG_T and not fp32 else "short")


def tile_config(kind: str, head_dim: int, group: int, dtype: torch.dtype, T: int = 0) -> dict:
    """Tile shape for one kernel (kind: fwd | dkdv | dq | dkdvq) from TILES: (BM, BN, warps, stages),
    dK/dV kinds optionally a fifth entry SPLIT (see _dkdv_kernel; 0 when absent). The interpreter
    takes 16 x 16 tiles so a test of a few dozen tokens crosses several tiles, and splits the dK/dV
    sums above head dim 128 as the GPU table does."""
    gp = triton.next_power_of_2(group)
    if _INTERPRET:
        # above head dim 128 the dK/dV sums split and the forward rescales lazily, so the tests'
        # d192/d256 cases run those paths
        bm, bn, w, st, split, rest = max(16, gp), 16, 1, 1, int(head_dim > 128), (8 if head_dim > 128 else 0,)
    else:
        bm, bn, w, st, *rest = TILES[tile_key(kind, head_dim, dtype, T)]
        split = rest[0] if rest else 0
    cfg = dict(BM=max(bm, gp), BN=bn, num_warps=w, num_stages=st)
    if kind in ("dkdv", "dkdvq"):
        cfg["SPLIT"] = int(split)
    if kind == "fwd":  # fifth entry: SLACK (lazy rescale, log2 units; 0 = every tile)
        cfg["SLACK"] = rest[0] if rest else 0
    return cfg


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _rows(m0, T, G, GP: tl.constexpr, BM: tl.constexpr):
    """(token, head-in-group, valid) of the BM folded rows starting at token m0."""
    i = tl.arange(0, BM)
    t = m0 + i // GP
    r = i % GP
    return t, r, (r < G) & (t < T)


@triton.jit
def _query_tile_key_ranges(DS, ds_base, m0, T, W, BT: tl.constexpr, BN: tl.constexpr):
    """Key tiles a query tile [m0, m0+BT) visits: [lo, a) masked, [a, b) interior, [b, hi) masked."""
    t_last = tl.minimum(m0 + BT, T) - 1
    ds_first = tl.load(DS + ds_base + m0)
    ds_last = tl.load(DS + ds_base + t_last)
    lo = tl.maximum(ds_first, m0 - W + 1)
    lo = tl.maximum(lo, 0) // BN * BN
    hi = t_last + 1
    a = tl.maximum(ds_last, t_last - W + 1)
    a = (a + BN - 1) // BN * BN
    b = (m0 + 1) // BN * BN
    empty = a >= b
    a = tl.where(empty, hi, a)
    b = tl.where(empty, hi, b)
    return lo, a, b, hi


@triton.jit
def _first_key(t, ds_row, W):
    """The first key row t sees: its document's start or its window's, whichever is later. Documents
    are contiguous runs, so for a key n <= t "same document" is n >= start of t's document: the
    visibility of a (row, key) pair is lo <= n <= t, two compares against per-row values (no
    per-key document ids to load and hold)."""
    return tl.maximum(ds_row, t - W + 1)


@triton.jit
def _visible(t, n, lo):
    """[rows, keys] visibility (causal, in the window, same document); lo = _first_key(...)."""
    return (n[None, :] <= t[:, None]) & (n[None, :] >= lo[:, None])


@triton.jit
def _end_row(n, de_key, W):
    """One past the last row that sees key n: its document's end or its window's, whichever is
    earlier (the dK/dV kernel's per-key form of _first_key: per-key values stay put across its
    loop over row tiles, and there are BN / (16·warps)·2 of them a thread, not BM / 4·... columns)."""
    return tl.minimum(de_key, n + W)


@triton.jit
def _visible_t(t, n, hi):
    """[keys, rows]: `_visible` transposed, from hi = _end_row(...) of the keys."""
    return (n[:, None] <= t[None, :]) & (t[None, :] < hi[:, None])


@triton.jit
def _kv_tile(X, XD, x_base, sx_t, b32, hkv, n0, T, dx, DX, BN: tl.constexpr, BLOCK: tl.constexpr,
              MASK: tl.constexpr, TMA: tl.constexpr):
    """The [BN, BLOCK] tile of keys (or values) n0.. of one KV head (forward and dQ kernels): rows
    past T and channels past DX are zeros (the descriptor's bounds with TMA; otherwise masked
    loads, the row mask only where a tile can cross T)."""
    if TMA:
        x = tl.reshape(XD.load([b32, n0, hkv, 0]), [BN, BLOCK])
    else:
        n = n0 + tl.arange(0, BN)
        ptr = X + x_base + tl.cast(n, tl.int64)[:, None] * sx_t + dx[None, :]
        if MASK:
            x = tl.load(ptr, mask=(n < T)[:, None] & (dx < DX)[None, :], other=0.0)
        else:
            x = tl.load(ptr, mask=(dx < DX)[None, :], other=0.0)
    return x


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K, V, KD, VD, k_base, v_base, sk_t, sv_t, b32, hkv, t, lo_key,
               start, end, T, W, scale, softcap, dk, dv, DQK, DV,
               BN: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
               SLACK: tl.constexpr, TMA: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The key tiles [start, end) (MASK: apply the visibility mask)."""
    # the exponent's factor (base 2): the step applies it in its FMA (online_softmax_step_scaled)
    if SOFTCAP:
        c = softcap * 1.4426950408889634
    else:
        c = scale * 1.4426950408889634
    for n0 in range(start, end, BN):
        k = _kv_tile(K, KD, k_base, sk_t, b32, hkv, n0, T, dk, DQK, BN, BLOCK_DK, MASK, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        if SOFTCAP:
            s = _tanh(s * (scale / softcap))
        if MASK:
            s = tl.where(_visible(t, n0 + tl.arange(0, BN), lo_key), s, float("-inf"))
        v = _kv_tile(V, VD, v_base, sv_t, b32, hkv, n0, T, dv, DV, BN, BLOCK_DV, MASK, TMA)
        acc, m_i, l_i = online_softmax_step_scaled(acc, m_i, l_i, s, c, v, PREC, SLACK)
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, KD, VD, O, LSE, DS,
                sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h,
                T, H, HKV, G, W, scale, softcap, DQK: tl.constexpr, DV: tl.constexpr,
                BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, GP: tl.constexpr,
                SOFTCAP: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                SLACK: tl.constexpr, TMA: tl.constexpr):
    """SLACK: the online softmax's lazy rescale (online_softmax_step_scaled; 0 = every tile). TMA: K
    and V through the descriptors KD, VD (LOADS["fwd"])."""
    BT: tl.constexpr = BM // GP
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BT  # the longest (last) query tiles start first
    bh = tl.program_id(1)
    b32 = bh // HKV
    b = tl.cast(b32, tl.int64)
    hkv = bh % HKV
    t, r, row_ok = _rows(m0, T, G, GP, BM)
    h = hkv * G + r
    t64, h64 = tl.cast(t, tl.int64), tl.cast(h, tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    ds_base = b * T
    q = tl.load(Q + b * sq_b + t64[:, None] * sq_t + h64[:, None] * sq_h + dk[None, :],
                mask=row_ok[:, None] & (dk < DQK)[None, :], other=0.0)
    lo_key = _first_key(t, tl.load(DS + ds_base + t, mask=row_ok, other=0), W)
    k_base = b * sk_b + tl.cast(hkv, tl.int64) * sk_h
    v_base = b * sv_b + tl.cast(hkv, tl.int64) * sv_h
    lo, a, bb, hi = _query_tile_key_ranges(DS, ds_base, m0, T, W, BT, BN)
    acc = tl.zeros([BM, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)  # finite: a fully masked tile row stays NaN-free
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, KD, VD, k_base, v_base, sk_t, sv_t, b32, hkv, t, lo_key,
                               lo, a, T, W, scale, softcap, dk, dv, DQK, DV, BN, True, SOFTCAP, PREC, SLACK, TMA,
                               BLOCK_DK, BLOCK_DV)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, KD, VD, k_base, v_base, sk_t, sv_t, b32, hkv, t, lo_key,
                               a, bb, T, W, scale, softcap, dk, dv, DQK, DV, BN, False, SOFTCAP, PREC, SLACK, TMA,
                               BLOCK_DK, BLOCK_DV)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, KD, VD, k_base, v_base, sk_t, sv_t, b32, hkv, t, lo_key,
                               bb, hi, T, W, scale, softcap, dk, dv, DQK, DV, BN, True, SOFTCAP, PREC, SLACK, TMA,
                               BLOCK_DK, BLOCK_DV)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_i[:, None]
    tl.store(O + b * so_b + t64[:, None] * so_t + h64[:, None] * so_h + dv[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (dv < DV)[None, :])
    tl.store(LSE + (b * T + t64) * H + h64, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _delta_kernel(O, DO, DELTA, ROWS, DV, BR: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta[row] = sum_d dO[row, d] · O[row, d] over the rows of contiguous [rows, DV] tensors."""
    row = tl.program_id(0) * BR + tl.arange(0, BR)
    row64 = tl.cast(row, tl.int64)
    d = tl.arange(0, BLOCK_DV)
    m = (row < ROWS)[:, None] & (d < DV)[None, :]
    o = tl.load(O + row64[:, None] * DV + d[None, :], mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + row64[:, None] * DV + d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + row64, tl.sum(o * do, 1), mask=row < ROWS)


@triton.jit
def _dkdv_tiles(dk_acc, dv_acc, k, v, Q, DO, LSE, DELTA, DQA, sq_t, sq_h, sdo_t, sdo_h, n, hi_row, start, end, T, H, G, W, scale, softcap, dk, dv, DQK, DV,
                GP: tl.constexpr, BM: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                PREC: tl.constexpr, DQ_ATOMIC: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr):
    """Keys are rows here: sᵀ [BN, BM] = k · qᵀ, so pᵀ and dsᵀ feed their dots from registers.
    Q, DO, LSE, DELTA, DQA point at the program's batch row and first query head of its group
    (offsets from them: token and head in the group).
    DO_DK / DO_DV: which of the two sums this program makes (DKDV split: see _dkdv_kernel).
    DQ_ATOMIC (0: off): also add this key tile's share of dq, ds · k, into the fp32 buffer DQA
    (contiguous [B, T, H, Dqk], unscaled) with atomics; 1: as dq [BM, Dqk] = (dsᵀ)ᵀ · k, 2: as
    dqᵀ [Dqk, BM] = kᵀ · dsᵀ (see BACKWARD_DQ)."""
    BT: tl.constexpr = BM // GP
    qk_scale = scale * 1.4426950408889634
    for m0 in range(start, end, BT):
        t, r, row_ok = _rows(m0, T, G, GP, BM)
        t64, h64 = tl.cast(t, tl.int64), tl.cast(r, tl.int64)
        q_t = tl.load(Q + t64[None, :] * sq_t + h64[None, :] * sq_h + dk[:, None],
                      mask=row_ok[None, :] & (dk < DQK)[:, None], other=0.0)  # [BLOCK_DK, BM]
        row = t64 * H + h64
        lse = tl.load(LSE + row, mask=row_ok, other=0.0)
        s_t = tl.dot(k, q_t, input_precision=PREC)
        if SOFTCAP:
            tc = _tanh(s_t * (scale / softcap))
            p_t = tl.exp2((softcap * 1.4426950408889634) * tc - lse[None, :])
        else:
            p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        if MASK:
            p_t = tl.where(_visible_t(t, n, hi_row), p_t, 0.0)
        # padded rows (heads >= G, tokens >= T) load q = dO = 0 and lse = delta = 0: in unmasked
        # tiles their p is 1 but their dO and ds are 0, so they add nothing
        do = tl.load(DO + t64[:, None] * sdo_t + h64[:, None] * sdo_h + dv[None, :],
                     mask=row_ok[:, None] & (dv < DV)[None, :], other=0.0)
        # pᵀ is kept only in the input dtype (the dv dot's operand; ds below uses it too): no fp32
        # copy held across the dpᵀ dot (16-bit inputs: p rounded once, as the dv dot sees it)
        p_t = p_t.to(do.dtype)
        if DO_DV:
            dv_acc = tl.dot(p_t, do, dv_acc, input_precision=PREC)
        if DO_DK:
            delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
            ds_t = p_t.to(tl.float32) * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * (1.0 - tc * tc)
            ds_t = ds_t.to(q_t.dtype)
            dk_acc = tl.dot(ds_t, tl.trans(q_t), dk_acc, input_precision=PREC)
        if DO_DK and DQ_ATOMIC == 1:
            # ds = dsᵀ transposed: one shared-memory round trip of a BN x BM 16-bit tile (the
            # dot's left operand), not a recomputed s and dp; the [BM, Dqk] result holds neighbouring
            # channels in each thread, so the atomics of a row hit consecutive addresses.
            # Masked pairs and padded rows have ds = 0 (a masked pair adds 0.0); the mask keeps
            # padded rows (heads >= G, tokens >= T) from touching memory at all: their address
            # may be another group's head or past the buffer.
            dq_part = tl.dot(tl.trans(ds_t), k, input_precision=PREC)
            tl.atomic_add(DQA + row[:, None] * DQK + dk[None, :], dq_part,
                          mask=row_ok[:, None] & (dk < DQK)[None, :], sem="relaxed")
        if DO_DK and DQ_ATOMIC == 2:
            # dsᵀ as it is, as the right operand (which the tensor cores read from shared memory
            # anyway: one store, no transposing load); kᵀ is loop-invariant. Each thread's
            # neighbouring results are neighbouring rows, H·Dqk apart in memory.
            dq_part_t = tl.dot(tl.trans(k), ds_t, input_precision=PREC)
            tl.atomic_add(DQA + row[None, :] * DQK + dk[:, None], dq_part_t,
                          mask=row_ok[None, :] & (dk < DQK)[:, None], sem="relaxed")
    return dk_acc, dv_acc


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DS, DE, DKO, DVO, DQA,
                 sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
                 sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
                 T, H, HKV, G, W, scale, softcap, DQK: tl.constexpr, DV: tl.constexpr,
                 BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, GP: tl.constexpr,
                 SOFTCAP: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 DQ_ATOMIC: tl.constexpr, SPLIT: tl.constexpr):
    """SPLIT = 0: one program per key tile sums dK and dV. SPLIT = 1 (grid axis 2 of size 2): the
    programs of part 0 sum dK (and the dq atomics), those of part 1 dV; each holds one [BN, D] fp32
    accumulator instead of two, the price being the sᵀ dot done twice (five matmuls, not four).
    At D256 two accumulators are 256 fp32 registers a thread at BN = 16·warps (the most keys per
    program whose sᵀ/dpᵀ dots are not computed twice by two warpgroups over the same 64 rows)."""
    if SPLIT:
        if tl.program_id(2) == 0:
            _dkdv_program(Q, K, V, DO, LSE, DELTA, DS, DE, DKO, DVO, DQA, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h,
                          sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h, sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
                          T, H, HKV, G, W, scale, softcap, DQK, DV, BLOCK_DK, BLOCK_DV, GP, SOFTCAP, PREC, BM, BN,
                          DQ_ATOMIC, True, False)
        else:
            _dkdv_program(Q, K, V, DO, LSE, DELTA, DS, DE, DKO, DVO, DQA, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h,
                          sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h, sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
                          T, H, HKV, G, W, scale, softcap, DQK, DV, BLOCK_DK, BLOCK_DV, GP, SOFTCAP, PREC, BM, BN,
                          0, False, True)
    else:
        _dkdv_program(Q, K, V, DO, LSE, DELTA, DS, DE, DKO, DVO, DQA, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h,
                      sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h, sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
                      T, H, HKV, G, W, scale, softcap, DQK, DV, BLOCK_DK, BLOCK_DV, GP, SOFTCAP, PREC, BM, BN,
                      DQ_ATOMIC, True, True)


@triton.jit
def _dkdv_program(Q, K, V, DO, LSE, DELTA, DS, DE, DKO, DVO, DQA,
                  sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
                  sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
                  T, H, HKV, G, W, scale, softcap, DQK: tl.constexpr, DV: tl.constexpr,
                  BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, GP: tl.constexpr,
                  SOFTCAP: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  DQ_ATOMIC: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr):
    BT: tl.constexpr = BM // GP
    n0 = tl.program_id(0) * BN
    bh = tl.program_id(1)
    b = tl.cast(bh // HKV, tl.int64)
    hkv = bh % HKV
    n = n0 + tl.arange(0, BN)
    n64 = tl.cast(n, tl.int64)
    key_ok = n < T
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    ds_base = b * T
    hkv64 = tl.cast(hkv, tl.int64)
    k = tl.load(K + b * sk_b + hkv64 * sk_h + n64[:, None] * sk_t + dk[None, :],
                mask=key_ok[:, None] & (dk < DQK)[None, :], other=0.0)
    v = tl.load(V + b * sv_b + hkv64 * sv_h + n64[:, None] * sv_t + dv[None, :],
                mask=key_ok[:, None] & (dv < DV)[None, :], other=0.0)
    # rows t >= T, and padded keys (de 0), see nothing
    hi_row = _end_row(n, tl.load(DE + ds_base + n, mask=key_ok, other=0), W)
    # query tiles that see this key tile: [lo, a) masked, [a, b) interior, [b, hi) masked
    n_last = tl.minimum(n0 + BN, T) - 1
    de_first = tl.load(DE + ds_base + n0)
    de_last = tl.load(DE + ds_base + n_last)
    lo = n0 // BT * BT
    hi = tl.minimum(tl.minimum(de_last, n_last + W), T)
    a = (n_last + BT - 1) // BT * BT
    bb = tl.minimum(tl.minimum(de_first, n0 + W), T) // BT * BT
    empty = (a >= bb) | (de_first <= n_last)
    a = tl.where(empty, hi, a)
    bb = tl.where(empty, hi, bb)
    dk_acc = tl.zeros([BN, BLOCK_DK], dtype=tl.float32)
    dv_acc = tl.zeros([BN, BLOCK_DV], dtype=tl.float32)
    # the batch row's base pointers (the tiles' offsets are relative to them)
    h0 = tl.cast(hkv * G, tl.int64)  # the group's first query head
    Qb = Q + b * sq_b + h0 * sq_h
    DOb = DO + b * sdo_b + h0 * sdo_h
    LSEb = LSE + ds_base * H + h0
    DELTAb = DELTA + ds_base * H + h0
    DQAb = DQA + (ds_base * H + h0) * DQK
    dk_acc, dv_acc = _dkdv_tiles(dk_acc, dv_acc, k, v, Qb, DOb, LSEb, DELTAb, DQAb,
                                 sq_t, sq_h, sdo_t, sdo_h, n, hi_row, lo, a, T, H, G, W, scale, softcap,
                                 dk, dv, DQK, DV, GP, BM, True, SOFTCAP, PREC, DQ_ATOMIC, DO_DK, DO_DV)
    dk_acc, dv_acc = _dkdv_tiles(dk_acc, dv_acc, k, v, Qb, DOb, LSEb, DELTAb, DQAb,
                                 sq_t, sq_h, sdo_t, sdo_h, n, hi_row, a, bb, T, H, G, W, scale, softcap,
                                 dk, dv, DQK, DV, GP, BM, False, SOFTCAP, PREC, DQ_ATOMIC, DO_DK, DO_DV)
    dk_acc, dv_acc = _dkdv_tiles(dk_acc, dv_acc, k, v, Qb, DOb, LSEb, DELTAb, DQAb,
                                 sq_t, sq_h, sdo_t, sdo_h, n, hi_row, bb, hi, T, H, G, W, scale, softcap,
                                 dk, dv, DQK, DV, GP, BM, True, SOFTCAP, PREC, DQ_ATOMIC, DO_DK, DO_DV)
    if DO_DK:
        tl.store(DKO + b * sdk_b + hkv64 * sdk_h + n64[:, None] * sdk_t + dk[None, :],
                 (dk_acc * scale).to(DKO.dtype.element_ty), mask=key_ok[:, None] & (dk < DQK)[None, :])
    if DO_DV:
        tl.store(DVO + b * sdv_b + hkv64 * sdv_h + n64[:, None] * sdv_t + dv[None, :],
                 dv_acc.to(DVO.dtype.element_ty), mask=key_ok[:, None] & (dv < DV)[None, :])


@triton.jit
def _dq_tiles(dq_acc, q, do, lse, delta, K, V, KD, VD, k_base, v_base, sk_t, sv_t, b32, hkv, t, lo_key,
              start, end, T, W, scale, softcap, dk, dv, DQK, DV,
              BN: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
              TMA: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    qk_scale = scale * 1.4426950408889634
    for n0 in range(start, end, BN):
        k = _kv_tile(K, KD, k_base, sk_t, b32, hkv, n0, T, dk, DQK, BN, BLOCK_DK, MASK, TMA)
        v = _kv_tile(V, VD, v_base, sv_t, b32, hkv, n0, T, dv, DV, BN, BLOCK_DV, MASK, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        if SOFTCAP:
            tc = _tanh(s * (scale / softcap))
            p = tl.exp2((softcap * 1.4426950408889634) * tc - lse[:, None])
        else:
            p = tl.exp2(s * qk_scale - lse[:, None])
        if MASK:
            p = tl.where(_visible(t, n0 + tl.arange(0, BN), lo_key), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        dsc = p * (dp - delta[:, None])
        if SOFTCAP:
            dsc = dsc * (1.0 - tc * tc)
        dq_acc = tl.dot(dsc.to(k.dtype), k, dq_acc, input_precision=PREC)
    return dq_acc


@triton.jit
def _dq_kernel(Q, K, V, KD, VD, DO, LSE, DELTA, DS, DQO,
               sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
               sdq_b, sdq_t, sdq_h,
               T, H, HKV, G, W, scale, softcap, DQK: tl.constexpr, DV: tl.constexpr,
               BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, GP: tl.constexpr,
               SOFTCAP: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               TMA: tl.constexpr):
    """TMA: K and V through the descriptors KD, VD (LOADS["dq"])."""
    BT: tl.constexpr = BM // GP
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BT  # the longest (last) query tiles start first
    bh = tl.program_id(1)
    b32 = bh // HKV
    b = tl.cast(b32, tl.int64)
    hkv = bh % HKV
    t, r, row_ok = _rows(m0, T, G, GP, BM)
    h = hkv * G + r
    t64, h64 = tl.cast(t, tl.int64), tl.cast(h, tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    ds_base = b * T
    q = tl.load(Q + b * sq_b + t64[:, None] * sq_t + h64[:, None] * sq_h + dk[None, :],
                mask=row_ok[:, None] & (dk < DQK)[None, :], other=0.0)
    do = tl.load(DO + b * sdo_b + t64[:, None] * sdo_t + h64[:, None] * sdo_h + dv[None, :],
                 mask=row_ok[:, None] & (dv < DV)[None, :], other=0.0)
    row = (ds_base + t64) * H + h64
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    lo_key = _first_key(t, tl.load(DS + ds_base + t, mask=row_ok, other=0), W)
    k_base = b * sk_b + tl.cast(hkv, tl.int64) * sk_h
    v_base = b * sv_b + tl.cast(hkv, tl.int64) * sv_h
    lo, a, bb, hi = _query_tile_key_ranges(DS, ds_base, m0, T, W, BT, BN)
    dq_acc = tl.zeros([BM, BLOCK_DK], dtype=tl.float32)
    dq_acc = _dq_tiles(dq_acc, q, do, lse, delta, K, V, KD, VD, k_base, v_base, sk_t, sv_t, b32, hkv, t, lo_key,
                       lo, a, T, W, scale, softcap, dk, dv, DQK, DV, BN, True, SOFTCAP, PREC, TMA,
                       BLOCK_DK, BLOCK_DV)
    dq_acc = _dq_tiles(dq_acc, q, do, lse, delta, K, V, KD, VD, k_base, v_base, sk_t, sv_t, b32, hkv, t, lo_key,
                       a, bb, T, W, scale, softcap, dk, dv, DQK, DV, BN, False, SOFTCAP, PREC, TMA,
                       BLOCK_DK, BLOCK_DV)
    dq_acc = _dq_tiles(dq_acc, q, do, lse, delta, K, V, KD, VD, k_base, v_base, sk_t, sv_t, b32, hkv, t, lo_key,
                       bb, hi, T, W, scale, softcap, dk, dv, DQK, DV, BN, True, SOFTCAP, PREC, TMA,
                       BLOCK_DK, BLOCK_DV)
    tl.store(DQO + b * sdq_b + t64[:, None] * sdq_t + h64[:, None] * sdq_h + dk[None, :],
             (dq_acc * scale).to(DQO.dtype.element_ty), mask=row_ok[:, None] & (dk < DQK)[None, :])


def _check(q, k, v, doc_ids, window, softcap):
    check_inputs(q, k, v, doc_ids, window, softcap)
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM or min(q.shape[-1], v.shape[-1]) < 16:
        raise ValueError(f"flash_attention: head dims must be in [16, {MAX_HEAD_DIM}], "
                         f"got Dqk={q.shape[-1]}, Dv={v.shape[-1]}")
    if q.shape[2] // k.shape[2] > MAX_GROUP:
        raise ValueError(f"flash_attention: at most {MAX_GROUP} query heads per key/value head, "
                         f"got {q.shape[2] // k.shape[2]}")
    if q.shape[1] == 0:
        raise ValueError("flash_attention: empty sequence (T = 0)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"flash_attention: {name} must be contiguous in its last dim")
    if not _INTERPRET and not q.is_cuda:
        raise ValueError("flash_attention: the Triton kernel needs CUDA tensors "
                         "(use deepwish.kernels.attention.reference on CPU)")


def _meta(q, k, v, window, softcap):
    B, T, H, Dqk = q.shape
    G = H // k.shape[2]
    return dict(T=T, H=H, HKV=k.shape[2], G=G, W=window if window > 0 else NO_WINDOW,
                softcap=float(softcap) if softcap > 0 else 1.0, DQK=Dqk, DV=v.shape[-1],
                BLOCK_DK=max(16, triton.next_power_of_2(Dqk)), BLOCK_DV=max(16, triton.next_power_of_2(v.shape[-1])),
                GP=triton.next_power_of_2(G), SOFTCAP=softcap > 0,
                PREC="ieee" if q.dtype == torch.float32 else "tf32")


def document_bounds(doc_ids: torch.Tensor | None, B: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) [B, T] int32 of each token's document, the kernels' description of doc_ids
    (a dozen small torch ops: compute once per batch and pass as `bounds` to every layer)."""
    if doc_ids is None:
        zero = torch.zeros(B, T, dtype=torch.int32, device=device)
        return zero, torch.full((B, T), T, dtype=torch.int32, device=device)
    return document_starts(doc_ids).to(torch.int32), document_ends(doc_ids).to(torch.int32)


def _tile_descriptor(x: torch.Tensor, box: list[int]):
    """A descriptor over x [B, T, heads, D] copying `box`-shaped tiles, or None where the copy
    engine cannot take x (not 16-bit; base or strides not 16-byte aligned; a box side over 256,
    e.g. NSA's selected blocks with nsa_select_len > 256)."""
    if x.dtype not in (torch.float16, torch.bfloat16) or x.data_ptr() % 16 or max(box) > 256:
        return None
    if any(st * x.element_size() % 16 for st in x.stride()[:-1]):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(x, list(x.shape), list(x.stride()), box)


def _kv_pair_descriptors(k, v, rows: int, meta: dict):
    """(k, v) descriptors of one KV head's [rows, head dim] tiles (meta: BLOCK_DK, BLOCK_DV), or
    (None, None) where the copy engine cannot take either: one load form per launch."""
    kd = _tile_descriptor(k, [1, rows, 1, meta["BLOCK_DK"]])
    vd = _tile_descriptor(v, [1, rows, 1, meta["BLOCK_DV"]])
    return (kd, vd) if kd is not None and vd is not None else (None, None)


def _kv_descriptors(kind: str, k, v, rows: int, meta: dict):
    """`_kv_pair_descriptors` where LOADS[kind] is "tma"; (None, None) for the "pointer" form."""
    form = LOADS[kind]
    if form not in LOADS_FORMS:
        raise ValueError(f"attention LOADS[{kind!r}] must be one of {LOADS_FORMS}, got {form!r}")
    return (None, None) if form == "pointer" else _kv_pair_descriptors(k, v, rows, meta)


def forward(q, k, v, doc_start, scale, window, softcap):
    B, T, H, _ = q.shape
    meta = _meta(q, k, v, window, softcap)
    o = torch.empty(B, T, H, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    cfg = tile_config("fwd", max(q.shape[-1], v.shape[-1]), meta["G"], q.dtype, T)
    grid = (triton.cdiv(T, cfg["BM"] // meta["GP"]), B * meta["HKV"])
    kd, vd = _kv_descriptors("fwd", k, v, cfg["BN"], meta)
    _fwd_kernel[grid](q, k, v, kd, vd, o, lse, doc_start, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                      *o.stride()[:3], scale=scale, TMA=kd is not None, **meta, **cfg)
    return o, lse


def backward_delta(o, do):
    """delta = rowsum(dO · O) [B, T, H] fp32 (o and do contiguous)."""
    B, T, H, DV = o.shape
    delta = torch.empty(B, T, H, dtype=torch.float32, device=o.device)
    rows = B * T * H
    BR = 16 if _INTERPRET else 64
    _delta_kernel[(triton.cdiv(rows, BR),)](o, do, delta, rows, DV, BR=BR,
                                            BLOCK_DV=max(16, triton.next_power_of_2(DV)))
    return delta


def backward_dkdv(q, k, v, do, lse, delta, doc_start, doc_end, scale, window, softcap):
    B, T = q.shape[:2]
    meta = _meta(q, k, v, window, softcap)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    cfg = tile_config("dkdv", max(q.shape[-1], v.shape[-1]), meta["G"], q.dtype, T)
    # DQA (dv in its place) is never touched without DQ_ATOMIC
    _dkdv_kernel[(triton.cdiv(T, cfg["BN"]), B * meta["HKV"], 1 + cfg["SPLIT"])](
        q, k, v, do, lse, delta, doc_start, doc_end, dk, dv, dv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], scale=scale, **meta, **cfg, DQ_ATOMIC=0)
    return dk, dv


def backward_dq(q, k, v, do, lse, delta, doc_start, scale, window, softcap):
    B, T = q.shape[:2]
    meta = _meta(q, k, v, window, softcap)
    dq = torch.empty_like(q)
    cfg = tile_config("dq", max(q.shape[-1], v.shape[-1]), meta["G"], q.dtype, T)
    kd, vd = _kv_descriptors("dq", k, v, cfg["BN"], meta)
    _dq_kernel[(triton.cdiv(T, cfg["BM"] // meta["GP"]), B * meta["HKV"])](
        q, k, v, kd, vd, do, lse, delta, doc_start, dq, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *do.stride()[:3], *dq.stride()[:3], scale=scale, TMA=kd is not None, **meta, **cfg)
    return dq


def backward_dkdvq(q, k, v, do, lse, delta, doc_start, doc_end, scale, window, softcap):
    """dq, dk, dv from the dK/dV kernel alone: dq accumulated with fp32 atomics (BACKWARD_DQ =
    "atomic" or "atomic_t": the orientation of the dq dot)."""
    B, T = q.shape[:2]
    meta = _meta(q, k, v, window, softcap)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # contiguous [B, T, H, Dqk]
    cfg = tile_config("dkdvq", max(q.shape[-1], v.shape[-1]), meta["G"], q.dtype, T)
    _dkdv_kernel[(triton.cdiv(T, cfg["BN"]), B * meta["HKV"], 1 + cfg["SPLIT"])](
        q, k, v, do, lse, delta, doc_start, doc_end, dk, dv, dq_acc, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], scale=scale, **meta, **cfg,
        DQ_ATOMIC=2 if BACKWARD_DQ == "atomic_t" else 1)
    return dq_acc.mul_(scale).to(q.dtype), dk, dv


def backward(q, k, v, o, lse, do, doc_start, doc_end, scale, window, softcap):
    if BACKWARD_DQ not in BACKWARD_DQ_FORMS:
        raise ValueError(f"flash_attention: BACKWARD_DQ must be one of {BACKWARD_DQ_FORMS}, got {BACKWARD_DQ!r}")
    delta = backward_delta(o, do)
    if BACKWARD_DQ != "kernel":
        return backward_dkdvq(q, k, v, do, lse, delta, doc_start, doc_end, scale, window, softcap)
    dk, dv = backward_dkdv(q, k, v, do, lse, delta, doc_start, doc_end, scale, window, softcap)
    dq = backward_dq(q, k, v, do, lse, delta, doc_start, scale, window, softcap)
    return dq, dk, dv


# Custom ops: torch.compile (the trainer compiles each block) treats the kernels as opaque
# calls with known output shapes instead of tracing into the launcher or breaking the graph.
@torch.library.custom_op("deepwish::flash_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: torch.Tensor, doc_end: torch.Tensor,
            scale: float, window: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(q, k, v, doc_start, scale, window, softcap)


@_fwd_op.register_fake
def _(q, k, v, doc_start, doc_end, scale, window, softcap):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, T, H, dtype=torch.float32)


@torch.library.custom_op("deepwish::flash_attention_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            do: torch.Tensor, doc_start: torch.Tensor, doc_end: torch.Tensor, scale: float, window: int,
            softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(q, k, v, o, lse, do, doc_start, doc_end, scale, window, softcap)


@_bwd_op.register_fake
def _(q, k, v, o, lse, do, doc_start, doc_end, scale, window, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, doc_start, doc_end, scale, window, softcap = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, doc_start, doc_end)
    ctx.opts = (scale, window, softcap)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, doc_start, doc_end = ctx.saved_tensors
    dq, dk, dv = _bwd_op(q, k, v, o, lse, do.contiguous(), doc_start, doc_end, *ctx.opts)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, doc_ids: torch.Tensor | None = None,
                    window: int = 0, softcap: float = 0.0, scale: float | None = None,
                    bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention, q [B, T, H, Dqk], k [B, T, Hkv, Dqk], v [B, T, Hkv, Dv] -> [B, T, H, Dv];
    see reference.attention for the semantics. Differentiable in q, k, v. `bounds`: the
    `document_bounds(doc_ids, B, T, device)` of the same doc_ids, computed once per batch."""
    _check(q, k, v, doc_ids, window, softcap)
    B, T = q.shape[:2]
    if bounds is None:
        bounds = document_bounds(doc_ids, B, T, q.device)
    elif any(tuple(x.shape) != (B, T) or x.dtype != torch.int32 for x in bounds):
        raise ValueError(f"flash_attention: bounds must be two int32 [B, T] = {(B, T)} tensors from document_bounds")
    doc_start, doc_end = bounds
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _fwd_op(q, k, v, doc_start, doc_end, scale, int(window), float(softcap))[0]
