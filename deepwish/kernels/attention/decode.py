"""Split-KV ("flash-decoding") attention of a few new queries over a long static KV cache, in
Triton: one new token per row (decode) or the k+1 tokens of speculative verification.

Same semantics as `reference.decode_attention` (read it first): q [B, Tq, H, Dqk] at positions
q_pos [B, Tq] over the cache layout of model/cache.py, k [B, Hkv, L, Dqk], v [B, Hkv, L, Dv];
slot j holds position k_pos[b, j] (`None`: slot j holds position j, a plain KVCache; a ring
cache passes its stored positions, see model/ring_cache.py). Slot j is visible to query i iff
k_pos[j] <= q_pos[i] and, with a window, k_pos[j] > q_pos[i] - window.

Design (decode reads the whole visible cache once; it is bound by memory bandwidth):
- The slots are cut into `splits` equal chunks and each program owns one (batch row, KV head,
  chunk): B·Hkv alone is far too few programs to fill the GPU at batch 1. The Tq·G query rows
  that read one KV head (G = H / Hkv query heads, Tq tokens) are one tile of the program
  (row i = token i // GP, head i % GP), so each K/V tile is read from memory once for all of
  them. Each program writes its partial output (normalised) and log-sum-exp; a second small
  kernel merges the chunks per row.
- With a plain KVCache, a program stops at the highest query position (slots above it hold
  nothing yet); chunks wholly above it return at once. The cost then follows the context, not
  the cache length. With a window much shorter than the cache (NSA's window branch, the GPT
  family's short layers over a plain cache) the chunks tile the window's span from the first
  slot any query sees, and the last chunk takes the rest up to the highest query position: a
  few programs, each with work, and a merge of a few partials instead of one per SM's share of
  the whole cache.
- The split count depends only on shapes (host arithmetic, no device reads): the step can be
  captured in a CUDA graph.
- `pdl` (model.decode_pdl, kernels/pdl.py): the split, merge and prologue kernels are launched
  with programmatic dependent launch; every program waits for the previous kernel's writes before
  it reads them. With a plain cache whose slots are contiguous and whose bytes fit in about half of
  L2 (PREFETCH_UNDER_PDL, PREFETCH_MAX_BYTES), a split program first reads the query positions and
  sends its chunk's older keys and values (slots below every new token, written by earlier steps)
  towards L2 with bulk prefetches, so the loop's loads after the wait find them there.
- One split (a short cache, or enough rows to fill the GPU without cutting the cache: batch 64 at
  Qwen3-0.6B): the program's output is the answer, stored as it is; no partials, no merge. Where
  that grid is more than two programs a SM, a 32-key tile (DECODE_DIRECT_TILE) keeps four resident.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from deepwish.kernels.grid import sm_count
from deepwish.kernels.online_softmax import online_softmax_step
from deepwish.kernels.pdl import launch_options, prefetch_to_l2, setting, wait_for_inputs

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
NO_WINDOW = 1 << 62
FAR = tl.constexpr(NO_WINDOW)  # a position beyond every query (kernels read only constexpr globals)


# Keys per tile: 64 x 128 bf16 K and V tiles, three stages in flight (fixed, not autotuned:
# compile time per shape class matters more than the last few percent here).
DECODE_BN, DECODE_WARPS, DECODE_STAGES = (16, 1, 1) if _INTERPRET else (64, 4, 3)
# One split over a grid of more programs than DECODE_PROGRAMS_PER_SM a SM (batch 64 at Qwen3-0.6B:
# 512 programs, each the whole cache of its row and KV head): 32-key tiles need half the shared
# memory, so four programs stay resident a SM and the grid runs in one wave, not two. Measured on
# an H200 (2026-12-06, bf16, 28 launches in a graph): one launch at batch 64, context 512, 40.1 ->
# 35.3 µs (80% -> 91% of copy); Qwen3-0.6B's captured step at batch 64, 3.490 -> 3.313 ms at
# context 512 and 10.30 -> 9.16 ms at 4096. Where the cache is cut into splits the 64-key tile
# stays (batch 8: -2.6% at context 512 but +2.8% at 4096; batch 1: +0.7%).
DECODE_DIRECT_TILE = (16, 1, 1) if _INTERPRET else (32, 4, 3)
# under PDL, each split program's keys and values sent to L2 before the wait (kernels/pdl.py
# prefetch_to_l2; tests/test_decode_fused_gpu.py holds its output to the kernel's without it). On
# an H200, Qwen3-0.6B's captured step at batch 1, context 512: 0.848 -> 0.834 and 0.843 -> 0.828 ms
# in two runs (2026-12-06). Only where the whole cache (every row, head and slot) takes at most
# PREFETCH_MAX_BYTES, about half of an H100's or H200's 50 MB L2: past that the programs' prefetches
# together would evict each other's slots before the loads come (not measured: kept out).
PREFETCH_UNDER_PDL = True
PREFETCH_MAX_BYTES = 24 << 20


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _norm_rope(rows, ok, W, cs, COS, SIN, d, D, eps, R: tl.constexpr, ZERO_CENTERED: tl.constexpr):
    """QK-norm and rotary of M rows: rows [M] point at each row's D values (ok [M]: the rows to
    read), cs [M] at each row's place in COS / SIN -> fp32 [M, len(d)]. Each row RMS-normed with
    the weight W [D] as model/norm.py rounds it (x̂ in the input's dtype, then times w; Qwen3-Next's
    zero-centred x̂·(1 + w)), then its first R channels rotated, channel i with i ± R/2; also the
    normed rows before rotary (NSA's compression reads them)."""
    dt = rows.dtype.element_ty
    d_ok = d < D
    rot = d < R
    first = d < R // 2
    pd = tl.where(first, d + R // 2, d - R // 2)  # each rotated channel's partner, normed the same way
    x = tl.load(rows[:, None] + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    xp = tl.load(rows[:, None] + pd[None, :], mask=ok[:, None] & (rot & d_ok)[None, :], other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    w = tl.load(W + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    wp = tl.load(W + pd, mask=rot & d_ok, other=0.0).to(tl.float32)[None, :]
    if ZERO_CENTERED:
        y = (x * inv * (1.0 + w)).to(dt).to(tl.float32)
        yp = (xp * inv * (1.0 + wp)).to(dt).to(tl.float32)
    else:
        y = (w * (x * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        yp = (wp * (xp * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    jj = tl.where(first, d, d - R // 2)
    c = tl.load(COS + cs[:, None] + jj[None, :], mask=ok[:, None] & rot[None, :], other=1.0)
    sn = tl.load(SIN + cs[:, None] + jj[None, :], mask=ok[:, None] & rot[None, :], other=0.0)
    return tl.where(rot[None, :], tl.where(first[None, :], y * c - yp * sn, y * c + yp * sn), y), y


# TQ (tokens a row) is not specialised: Triton would otherwise compile a separate kernel for TQ == 1
# (the decode step) and for a prefill or verification chunk, so the first prefill after the captured
# step's warm-up compiled both kernels again (a second or more before a first token).
@triton.jit(do_not_specialize=["TQ"])
def _split_kernel(Q, K, V, QPOS, KPOS, OP, LP, O,
                  sq_b, sq_t, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_t, so_h,
                  TQ, HKV, G, L, W, scale, softcap, DQK, DV, SPLITS,
                  CHUNK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BM: tl.constexpr,
                  GP: tl.constexpr, SLOT_POS: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
                  BN: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, DIRECT: tl.constexpr,
                  WIN_SPLITS: tl.constexpr):
    if not PREFETCH:
        wait_for_inputs(PDL)
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = tl.cast(bh // HKV, tl.int64)
    hkv = bh % HKV
    i = tl.arange(0, BM)
    j = i // GP
    r = i % GP
    row_ok = (r < G) & (j < TQ)
    h64 = tl.cast(hkv * G + r, tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    # PREFETCH: the positions are read before the wait (the step writes them before its first
    # kernel, never in the kernel just before this one: kernels/pdl.py's chain makes every kernel
    # but that one complete by now)
    qp = tl.load(QPOS + b * TQ + j, mask=row_ok, other=-1).to(tl.int64)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    if SLOT_POS:  # slots above the last query hold nothing yet; below the window nothing is seen
        first = tl.min(tl.where(row_ok, qp, FAR), 0) - W + 1
        start = tl.cast(tl.maximum(first, 0), tl.int32) // BN * BN
        if WIN_SPLITS:  # the chunks tile the window's span from its first slot; the last takes the rest
            lo = start + split * CHUNK
            hi = tl.where(split == SPLITS - 1, L, tl.minimum(lo + CHUNK, L))
        hi = tl.minimum(hi, tl.cast(tl.max(qp, 0) + 1, tl.int32))
        lo = tl.maximum(lo, start)
    k_base = b * sk_b + tl.cast(hkv, tl.int64) * sk_h
    v_base = b * sv_b + tl.cast(hkv, tl.int64) * sv_h
    if PREFETCH:  # (plain cache, rows contiguous) this chunk's keys and values on their way to L2 while
        # the kernel before still runs: only the slots below every query's position, which earlier
        # steps wrote (the new tokens' slots are the previous kernel's writes)
        top = tl.minimum(hi, tl.cast(tl.min(tl.where(row_ok, qp, FAR), 0), tl.int32))
        if top > lo:
            elt = K.dtype.element_ty.primitive_bitwidth // 8
            prefetch_to_l2(K + k_base + tl.cast(lo, tl.int64) * sk_l, (top - lo) * DQK * elt)
            prefetch_to_l2(V + v_base + tl.cast(lo, tl.int64) * sv_l, (top - lo) * DV * elt)
        wait_for_inputs(PDL)
    q = tl.load(Q + b * sq_b + tl.cast(j, tl.int64)[:, None] * sq_t + h64[:, None] * sq_h + dk[None, :],
                mask=row_ok[:, None] & (dk < DQK)[None, :], other=0.0)
    acc = tl.zeros([BM, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    for n0 in range(lo, hi, BN):
        n = n0 + tl.arange(0, BN)
        n64 = tl.cast(n, tl.int64)
        ok = n < hi
        k = tl.load(K + k_base + n64[:, None] * sk_l + dk[None, :], mask=ok[:, None] & (dk < DQK)[None, :], other=0.0)
        v = tl.load(V + v_base + n64[:, None] * sv_l + dv[None, :], mask=ok[:, None] & (dv < DV)[None, :], other=0.0)
        if SLOT_POS:
            kp = n64
        else:
            kp = tl.load(KPOS + b * L + n64, mask=ok, other=FAR)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        vis = ok[None, :] & (kp[None, :] <= qp[:, None]) & (kp[None, :] > qp[:, None] - W)
        s = tl.where(vis, s * 1.4426950408889634, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, PREC)
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DIRECT:  # one split: its output is the answer (merging one chunk weighs it by exactly 1)
        tl.store(O + b * so_b + tl.cast(j, tl.int64)[:, None] * so_t + h64[:, None] * so_h + dv[None, :],
                 o.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv < DV)[None, :])
        return
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    base = (tl.cast(bh, tl.int64) * SPLITS + split) * BM
    tl.store(OP + (base + i)[:, None] * BLOCK_DV + dv[None, :], o)
    tl.store(LP + base + i, lse)


@triton.jit(do_not_specialize=["TQ"])
def _merge_kernel(OP, LP, O, so_b, so_t, so_h, TQ, HKV, G, DV, SPLITS,
                  BLOCK_DV: tl.constexpr, BM: tl.constexpr, GP: tl.constexpr, BS: tl.constexpr, PDL: tl.constexpr):
    """One program per (batch row, KV head, row): the row's split partials merged and stored as
    o[b, t, h], each chunk's output weighted by its share of the softmax mass, exp2(lse_c - max lse)."""
    wait_for_inputs(PDL)  # every program, the idle rows' too (kernels/pdl.py: the chain of waits)
    bh = tl.program_id(0)
    i = tl.program_id(1)
    j = i // GP
    r = i % GP
    if (r < G) & (j < TQ):
        b = tl.cast(bh // HKV, tl.int64)
        h = tl.cast((bh % HKV) * G + r, tl.int64)
        s = tl.arange(0, BS)
        dv = tl.arange(0, BLOCK_DV)
        at = tl.cast(bh, tl.int64) * SPLITS * BM + s * BM + i
        lse = tl.load(LP + at, mask=s < SPLITS, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, 0))
        part = tl.load(OP + at[:, None] * BLOCK_DV + dv[None, :], mask=(s < SPLITS)[:, None], other=0.0)
        o = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
        tl.store(O + b * so_b + j * so_t + h * so_h + dv, o.to(O.dtype.element_ty), mask=dv < DV)


# Programs per SM the split count aims at: B·Hkv is far too few at batch 1 (8 at Qwen3-0.6B), so
# the cache is cut until the grid fills every SM a few times over (tile sweep on an H200).
DECODE_PROGRAMS_PER_SM = 2


# Chunks are a multiple of this many cache slots (bench/decode_tiles sweeps it with the split count)
DECODE_CHUNK_UNIT = 16 if _INTERPRET else 128


def plan_splits(B: int, Hkv: int, L: int, device, per_sm: int | None = None) -> tuple[int, int]:
    """(splits, chunk): about `per_sm` (DECODE_PROGRAMS_PER_SM) programs per SM, chunks a multiple
    of DECODE_CHUNK_UNIT slots. Shapes only, so a captured graph keeps it."""
    unit = DECODE_CHUNK_UNIT
    per_sm = DECODE_PROGRAMS_PER_SM if per_sm is None else per_sm
    want = max(1, -(-per_sm * sm_count(torch.device(device)) // (B * Hkv)))
    chunk = max(unit, -(-L // want))
    chunk = -(-chunk // unit) * unit
    return -(-L // chunk), chunk


def _check_tile(name: str, DQK: int, DV: int, TQ: int, G: int) -> None:
    """What one split program holds: head dims <= 256, the Tq·G query rows of a KV head <= 128."""
    if max(DQK, DV) > 256 or max(16, triton.next_power_of_2(TQ * triton.next_power_of_2(G))) > 128:
        raise ValueError(f"{name}: head dims <= 256 and Tq·G <= 128 rows; got Dqk={DQK}, Dv={DV}, Tq={TQ}, G={G}")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                     k_pos: torch.Tensor | None = None, *, window: int = 0, softcap: float = 0.0,
                     scale: float | None = None, splits: int | None = None, pdl: bool | str = False) -> torch.Tensor:
    """q [B, Tq, H, Dqk], k [B, Hkv, L, Dqk], v [B, Hkv, L, Dv], q_pos [B, Tq], k_pos [B, L] or None
    -> [B, Tq, H, Dv] in q's dtype. Inference only (no gradient). pdl: programmatic dependent launch."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"decode_attention: want q [B,Tq,H,D], k/v [B,Hkv,L,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, TQ, H, DQK = q.shape
    HKV, L = k.shape[1], k.shape[2]
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[3] != DQK or H % HKV:
        raise ValueError(f"decode_attention: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"decode_attention: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if tuple(q_pos.shape) != (B, TQ) or (k_pos is not None and tuple(k_pos.shape) != (B, L)):
        raise ValueError(f"decode_attention: q_pos must be [B, Tq] and k_pos [B, L]; got {tuple(q_pos.shape)}, "
                         f"{None if k_pos is None else tuple(k_pos.shape)}")
    _check_tile("decode_attention", DQK, v.shape[-1], TQ, H // HKV)
    if not _INTERPRET and not q.is_cuda:
        raise ValueError("decode_attention: the Triton kernel needs CUDA tensors (use reference.decode_attention)")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode_attention: q, k, v must be contiguous in their last dim")
    return _decode_op(q, k, v, q_pos.to(torch.int64).contiguous(),
                      None if k_pos is None else k_pos.to(torch.int64).contiguous(),
                      int(window), float(softcap), D_scale(DQK, scale), -1 if splits is None else int(splits),
                      setting(pdl, "decode_attention"))


# A custom op: torch.compile (of a decode step) sees one opaque call with a known output shape.
@torch.library.custom_op("deepwish::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: Optional[torch.Tensor],
               window: int, softcap: float, scale: float, splits: int, pdl: str) -> torch.Tensor:
    return _split_launch(q, k, v, q_pos, k_pos, window, softcap, scale, splits, pdl)


def _split_launch(q, k, v, q_pos, k_pos, window, softcap, scale, splits, pdl):
    """The split kernel's launch (and the merge kernel's where there are several splits)."""
    B, TQ, H, DQK = q.shape
    pdl, launch = launch_options(pdl, q.device, "decode_attention")
    HKV, L = k.shape[1], k.shape[2]
    G = H // HKV
    GP = triton.next_power_of_2(G)
    BM = max(16, triton.next_power_of_2(TQ * GP))
    DV = v.shape[-1]
    # a window much shorter than the cache over slot = position: the splits cut the window's span
    # (at most W + Tq - 1 slots from the first one a query sees), not the whole cache, so no
    # program runs empty and the merge reads a few partials, not one per SM
    win_splits = splits < 0 and window > 0 and k_pos is None and window + TQ + DECODE_CHUNK_UNIT < L
    if splits < 0:
        splits, chunk = plan_splits(B, HKV, window + TQ + DECODE_CHUNK_UNIT if win_splits else L, q.device)
    else:
        chunk = -(-L // splits)
        chunk = -(-chunk // DECODE_CHUNK_UNIT) * DECODE_CHUNK_UNIT
        splits = -(-L // chunk)
    BLOCK_DK = max(16, triton.next_power_of_2(DQK))
    BLOCK_DV = max(16, triton.next_power_of_2(DV))
    kp = q_pos if k_pos is None else k_pos
    o = torch.empty(B, TQ, H, DV, dtype=q.dtype, device=q.device)
    direct = splits == 1  # one chunk a (row, KV head): the split kernel stores o itself, nothing to merge
    if direct:
        op = lp = torch.empty(1, dtype=torch.float32, device=q.device)  # never read or written
    else:
        op = torch.empty(B * HKV, splits, BM, BLOCK_DV, dtype=torch.float32, device=q.device)
        lp = torch.empty(B * HKV, splits, BM, dtype=torch.float32, device=q.device)
    wide = direct and B * HKV > DECODE_PROGRAMS_PER_SM * sm_count(q.device)
    bn, warps, stages = DECODE_DIRECT_TILE if wide else (DECODE_BN, DECODE_WARPS, DECODE_STAGES)
    # the bulk prefetch needs each head's slots back to back from a 16-byte aligned start
    elt = k.element_size()
    prefetch = (pdl and PREFETCH_UNDER_PDL and k_pos is None and k.stride(2) == DQK and v.stride(2) == DV
                and B * HKV * L * (DQK + DV) * elt <= PREFETCH_MAX_BYTES
                and all(t.data_ptr() % 16 == 0 and all(st * elt % 16 == 0 for st in t.stride()[:3]) for t in (k, v)))
    _split_kernel[(splits, B * HKV)](
        q, k, v, q_pos, kp, op, lp, o,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        TQ, HKV, G, L, window if window > 0 else NO_WINDOW, scale,
        softcap if softcap > 0 else 1.0, DQK, DV, splits,
        CHUNK=chunk, BLOCK_DK=BLOCK_DK, BLOCK_DV=BLOCK_DV, BM=BM, GP=GP, SLOT_POS=k_pos is None,
        SOFTCAP=softcap > 0, PREC="ieee" if k.dtype == torch.float32 else "tf32",
        BN=bn, PDL=pdl, PREFETCH=prefetch, DIRECT=direct, WIN_SPLITS=win_splits,
        num_warps=warps, num_stages=stages, **launch)
    if direct:
        return o
    _merge_kernel[(B * HKV, BM)](op, lp, o, *o.stride()[:3], TQ, HKV, G, DV, splits,
                                 BLOCK_DV=BLOCK_DV, BM=BM, GP=GP, BS=max(2, triton.next_power_of_2(splits)), PDL=pdl,
                                 **launch)
    return o


@_decode_op.register_fake
def _(q, k, v, q_pos, k_pos, window, softcap, scale, splits, pdl):
    return q.new_empty(*q.shape[:3], v.shape[-1])


def D_scale(D: int, scale: float | None) -> float:
    return D ** -0.5 if scale is None else float(scale)


# ---- the step's prologue: QK-norm, rotary and the cache write, one launch ---------------------
# Between the fused q/k/v projection and the split kernel, a decode step's attention layer norms and
# rotates q and k and writes k and v into the cache. Compiled, that was five small kernels a layer
# (the norm's statistics, the normed and rotated q/k, the k and v cache writes, q made contiguous
# for the attention op), each far shorter than its launch. Here one program per (token, head)
# does all of it for its head: q heads write q, k heads their cache slot, v heads copy theirs.
# debug: the position check below (a step past the cache stops with a device-side assertion, as the
# cache write it replaces did; a host check would synchronise every step). T unspecialised as in _split_kernel.
@triton.jit(debug=True, do_not_specialize=["T"])
def _prologue_kernel(Y, WQ, WK, COS, SIN, POS, QO, KC, VC, KR,
                     s_yb, s_yt, s_qb, s_qt, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_rb, s_rh, s_rl, s_cb, s_ct,
                     s_pb, s_pt, T, H, HKV, L, eps, D: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr,
                     ZERO_CENTERED: tl.constexpr, PDL: tl.constexpr, RAW: tl.constexpr):
    wait_for_inputs(PDL)
    head = tl.program_id(0)  # 0..H-1 query heads, then Hkv key heads, then Hkv value heads
    bt = tl.program_id(1)
    b = tl.cast(bt // T, tl.int64)
    t = bt % T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    row = Y + b * s_yb + t * s_yt + tl.cast(head, tl.int64) * D
    pos = tl.load(POS + b * s_pb + t * s_pt).to(tl.int64)
    in_cache = (pos >= 0) & (pos < L)
    tl.device_assert(in_cache, "decode_prologue: a position past the cache")
    if head >= H + HKV:  # a value head: its row goes into the cache as it is
        hv = tl.cast(head - H - HKV, tl.int64)
        v_row = tl.load(row + d, mask=d_ok, other=0.0)
        tl.store(VC + b * s_vb + hv * s_vh + pos * s_vl + d, v_row.to(VC.dtype.element_ty), mask=d_ok & in_cache)
    else:  # a query or key head: normed and rotated (_norm_rope)
        one = tl.zeros([1], dtype=tl.int64)
        cs = one + b * s_cb + t * s_ct
        if head < H:
            q, _ = _norm_rope(row + one, one == 0, WQ, cs, COS, SIN, d, D, eps, R, ZERO_CENTERED)
            tl.store(QO + b * s_qb + t * s_qt + tl.cast(head, tl.int64) * s_qh + d[None, :],
                     q.to(QO.dtype.element_ty), mask=d_ok[None, :])
        else:
            k, k_normed = _norm_rope(row + one, one == 0, WK, cs, COS, SIN, d, D, eps, R, ZERO_CENTERED)
            hk = tl.cast(head - H, tl.int64)
            tl.store(KC + b * s_kb + hk * s_kh + pos * s_kl + d[None, :], k.to(KC.dtype.element_ty),
                     mask=(d_ok & in_cache)[None, :])
            if RAW:  # the key before rotary into its own cache (NSA's compression reads it)
                tl.store(KR + b * s_rb + hk * s_rh + pos * s_rl + d[None, :], k_normed.to(KR.dtype.element_ty),
                         mask=(d_ok & in_cache)[None, :])


def decode_prologue(y: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                    cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, n_heads: int, zero_centered: bool = False, pdl: bool | str = False,
                    k_raw_cache: torch.Tensor | None = None) -> torch.Tensor:
    """`reference.decode_prologue` in one launch: y [B, T, (H + 2·Hkv)·D] -> q [B, T, H, D]; k and v
    written into the caches [B, Hkv, L, D] at `positions` [B, T] (and k normed before rotary into
    k_raw_cache, NSA's). A position outside the cache writes nothing and stops the kernel with a
    device-side assertion (no host synchronisation). pdl: programmatic dependent launch (kernels/pdl.py)."""
    B, T, F = y.shape
    Hkv, D = k_cache.shape[1], k_cache.shape[-1]
    if (F != (n_heads + 2 * Hkv) * D or v_cache.shape[-1] != D or tuple(q_weight.shape) != (D,)
            or tuple(k_weight.shape) != (D,) or tuple(positions.shape) != (B, T)
            or cos.shape[:2] != (B, T) or 2 * cos.shape[-1] > D or cos.shape != sin.shape
            or (k_raw_cache is not None and k_raw_cache.shape != k_cache.shape)):
        raise ValueError(f"decode_prologue: y {tuple(y.shape)} must be [B, T, (H + 2·Hkv)·D] for H={n_heads}, "
                         f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}, weights [D], positions [B, T], "
                         f"cos/sin [B, T, <= D/2]; got weights {tuple(q_weight.shape)} / {tuple(k_weight.shape)}, "
                         f"positions {tuple(positions.shape)}, cos {tuple(cos.shape)}"
                         + ("" if k_raw_cache is None else f", k_raw_cache {tuple(k_raw_cache.shape)} (k_cache's shape)"))
    if y.stride(-1) != 1:
        y = y.contiguous()
    cos, sin = cos.float(), sin.float()
    args = (y, q_weight, k_weight, float(eps), cos, sin, positions, k_cache, v_cache)
    if k_raw_cache is None:
        return _prologue_op(*args, int(n_heads), bool(zero_centered), setting(pdl, "decode_prologue"))
    return _prologue_raw_op(*args, k_raw_cache, int(n_heads), bool(zero_centered), setting(pdl, "decode_prologue"))


def _prologue_launch(y, q_weight, k_weight, eps, cos, sin, positions, k_cache, v_cache, k_raw_cache, n_heads,
                     zero_centered, pdl):
    B, T, _ = y.shape
    # The kernel reads both with cos's strides. Checked here, inside the op, where strides are plain
    # integers: a caller compiled with dynamic shapes hands dynamo symbolic strides, which torch 2.11's
    # dynamo cannot compare (it failed so in the trainer's compiled blocks).
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    pdl, launch = launch_options(pdl, y.device, "decode_prologue")
    Hkv, D = k_cache.shape[1], k_cache.shape[-1]
    q = torch.empty(B, T, n_heads, D, dtype=y.dtype, device=y.device)
    raw = k_raw_cache is not None
    kr = k_raw_cache if raw else k_cache   # never written without RAW
    _prologue_kernel[(n_heads + 2 * Hkv, B * T)](
        y, q_weight, k_weight, cos, sin, positions, q, k_cache, v_cache, kr,
        y.stride(0), y.stride(1), *q.stride()[:3], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), kr.stride(0), kr.stride(1), kr.stride(2),
        cos.stride(0), cos.stride(1), positions.stride(0), positions.stride(1), T, n_heads, Hkv, k_cache.shape[2],
        eps, D=D, R=2 * cos.shape[-1], BLOCK_D=triton.next_power_of_2(D), ZERO_CENTERED=zero_centered, PDL=pdl,
        RAW=raw, num_warps=1 if _INTERPRET else 2, **launch)
    return q


@torch.library.custom_op("deepwish::decode_prologue", mutates_args=("k_cache", "v_cache"))
def _prologue_op(y: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, cos: torch.Tensor,
                 sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 n_heads: int, zero_centered: bool, pdl: str) -> torch.Tensor:
    return _prologue_launch(y, q_weight, k_weight, eps, cos, sin, positions, k_cache, v_cache, None, n_heads,
                            zero_centered, pdl)


# NSA's form: one more cache written (a separate op, so that no mutated input is ever optional or aliased)
@torch.library.custom_op("deepwish::decode_prologue_raw", mutates_args=("k_cache", "v_cache", "k_raw_cache"))
def _prologue_raw_op(y: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, cos: torch.Tensor,
                     sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     k_raw_cache: torch.Tensor, n_heads: int, zero_centered: bool, pdl: str) -> torch.Tensor:
    return _prologue_launch(y, q_weight, k_weight, eps, cos, sin, positions, k_cache, v_cache, k_raw_cache, n_heads,
                            zero_centered, pdl)


@_prologue_op.register_fake
def _(y, q_weight, k_weight, eps, cos, sin, positions, k_cache, v_cache, n_heads, zero_centered, pdl):
    return y.new_empty(y.shape[0], y.shape[1], n_heads, k_cache.shape[-1])


@_prologue_raw_op.register_fake
def _(y, q_weight, k_weight, eps, cos, sin, positions, k_cache, v_cache, k_raw_cache, n_heads, zero_centered, pdl):
    return y.new_empty(y.shape[0], y.shape[1], n_heads, k_cache.shape[-1])
