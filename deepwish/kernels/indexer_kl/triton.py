"""The sparse-stage indexer loss's scores and target at the selected slots in Triton (semantics:
reference.py and the package doc).

Shape legend: B batch, T queries, K selected slots per query, S key slots, Hi index heads of Di
channels, H attention heads of D = D1 + D2 latent channels (D1 the largest power of two <= D,
D2 the rest: 320 = 256 + 64, 576 = 512 + 64, each padded on its own, as sparse_mla splits them).

- `_scores_kernel`, one program per token: the token's Hi index heads are the M rows of one dot
  with BK gathered index keys at a time (all heads in one program: the score is their weighted
  sum), relu, w, the head sum in registers; writes I [B,T,K] (-inf at unused slots).
- `_target_kernel`, one program per (token, BH attention heads): the dots with BK gathered latent
  rows, p = exp2(scaled score·log2 e − lse·log2 e) with the sparse attention's own lse, summed
  over the tile's heads and added into P [B,T,K] (fp32 atomics when H spans several tiles).
- `_backward_kernel`, one program per token: recomputes the dots of `_scores_kernel`, then with
  g = d loss / d I: dw += Σ_s g·relu(z), g_z = w·scale·g where the relu passes, dq += g_z·k in
  registers (the program owns its token), dk_s += g_zᵀ·q by fp32 atomics into [B, S, Di]
  (unused slots are masked: no traffic), as sparse_mla's dkv.
The dots take the inputs' dtype (bf16 under autocast) with fp32 accumulation; fp32 inputs take
IEEE fp32 dots. Offsets are int64.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_INDEX_HEADS = 128  # one program holds every index head of its token (their weighted sum is the score)
# (BK, warps, stages) per kernel; the interpreter takes 16-slot steps
TILES = {"scores": (64, 8, 2), "target": (64, 8, 2), "backward": (32, 8, 2)}
TARGET_HEADS = 32  # BH of `_target_kernel`: heads per program (the dot's M)


@triton.jit
def _token_queries(QI, W, b, t64, sq_b, sq_t, sq_h, sw_b, sw_t, HI, DI, BHI: tl.constexpr, BDI: tl.constexpr):
    """One token's index queries [BHI, BDI] and head weights [BHI] (fp32), with their ranges and masks."""
    hi = tl.arange(0, BHI)
    di = tl.arange(0, BDI)
    hi_ok = hi < HI
    di_ok = di < DI
    qi = tl.load(QI + b * sq_b + t64 * sq_t + hi[:, None] * sq_h + di[None, :],
                 mask=hi_ok[:, None] & di_ok[None, :], other=0.0)
    wv = tl.load(W + b * sw_b + t64 * sw_t + hi, mask=hi_ok, other=0.0).to(tl.float32)
    return hi, di, hi_ok, di_ok, qi, wv


@triton.jit
def _scores_kernel(QI, W, KI, IDX, I_OUT, sq_b, sq_t, sq_h, sw_b, sw_t, sk_b, sk_s, si_b, si_t,
                   T, HI, DI, K, iscale, PREC: tl.constexpr, BHI: tl.constexpr, BDI: tl.constexpr,
                   BK: tl.constexpr):
    t64 = tl.cast(tl.program_id(0), tl.int64)
    b = tl.cast(tl.program_id(1), tl.int64)
    hi, di, hi_ok, di_ok, qi, wv = _token_queries(QI, W, b, t64, sq_b, sq_t, sq_h, sw_b, sw_t, HI, DI, BHI, BDI)
    out = I_OUT + (b * T + t64) * K
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kk_ok = kk < K
        slot = tl.load(IDX + b * si_b + t64 * si_t + kk, mask=kk_ok, other=-1)
        ok = slot >= 0
        krow = tl.load(KI + b * sk_b + tl.cast(slot, tl.int64)[:, None] * sk_s + di[None, :],
                       mask=ok[:, None] & di_ok[None, :], other=0.0)
        z = tl.dot(qi, tl.trans(krow), input_precision=PREC)  # [BHI, BK]
        a = tl.maximum(z * iscale, 0.0)
        score = tl.sum(a * wv[:, None], 0)
        tl.store(out + kk, tl.where(ok, score, float("-inf")), mask=kk_ok)


@triton.jit
def _target_kernel(QA, KV, LSE, IDX, P_OUT, sq_b, sq_t, sq_h, skv_b, skv_s, si_b, si_t,
                   T, H, D1, D2, K, ascale_log2, HAS_TAIL: tl.constexpr, ATOMIC: tl.constexpr,
                   PREC: tl.constexpr, BH: tl.constexpr, BD1: tl.constexpr, BD2: tl.constexpr, BK: tl.constexpr):
    t64 = tl.cast(tl.program_id(0), tl.int64)
    hb = tl.program_id(1)
    b = tl.cast(tl.program_id(2), tl.int64)
    h = hb * BH + tl.arange(0, BH)
    h_ok = h < H
    h64 = tl.cast(h, tl.int64)
    d1 = tl.arange(0, BD1)
    d2 = tl.arange(0, BD2)
    qbase = QA + b * sq_b + t64 * sq_t + h64[:, None] * sq_h
    q1 = tl.load(qbase + d1[None, :], mask=h_ok[:, None] & (d1 < D1)[None, :], other=0.0)
    if HAS_TAIL:
        q2 = tl.load(qbase + D1 + d2[None, :], mask=h_ok[:, None] & (d2 < D2)[None, :], other=0.0)
    else:
        q2 = tl.zeros([BH, BD2], dtype=q1.dtype)
    lse = tl.load(LSE + (b * T + t64) * H + h64, mask=h_ok, other=float("-inf"))
    # padded heads and a row that selects nothing (lse = -inf) contribute exp2(-inf) = 0
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    out = P_OUT + (b * T + t64) * K
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kk_ok = kk < K
        slot = tl.load(IDX + b * si_b + t64 * si_t + kk, mask=kk_ok, other=-1)
        ok = slot >= 0
        row = KV + b * skv_b + tl.cast(slot, tl.int64)[:, None] * skv_s
        kv1 = tl.load(row + d1[None, :], mask=ok[:, None] & (d1 < D1)[None, :], other=0.0)
        s = tl.dot(q1, tl.trans(kv1), input_precision=PREC)
        if HAS_TAIL:
            kv2 = tl.load(row + D1 + d2[None, :], mask=ok[:, None] & (d2 < D2)[None, :], other=0.0)
            s = tl.dot(q2, tl.trans(kv2), s, input_precision=PREC)
        p = tl.exp2(s * ascale_log2 - lse2[:, None])
        p = tl.where(h_ok[:, None] & ok[None, :], p, 0.0)
        total = tl.sum(p, 0)
        if ATOMIC:
            tl.atomic_add(out + kk, total, mask=kk_ok & ok, sem="relaxed")
        else:
            tl.store(out + kk, total, mask=kk_ok)


@triton.jit
def _backward_kernel(QI, W, KI, IDX, G, DQ, DW, DK, sq_b, sq_t, sq_h, sw_b, sw_t, sk_b, sk_s, si_b, si_t,
                     T, S, HI, DI, K, iscale, PREC: tl.constexpr, BHI: tl.constexpr, BDI: tl.constexpr,
                     BK: tl.constexpr):
    t64 = tl.cast(tl.program_id(0), tl.int64)
    b = tl.cast(tl.program_id(1), tl.int64)
    hi, di, hi_ok, di_ok, qi, wv = _token_queries(QI, W, b, t64, sq_b, sq_t, sq_h, sw_b, sw_t, HI, DI, BHI, BDI)
    dq = tl.zeros([BHI, BDI], dtype=tl.float32)
    dw = tl.zeros([BHI], dtype=tl.float32)
    grow = G + (b * T + t64) * K
    dk_base = DK + b * S * DI  # fp32 [B, S, Di], contiguous
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kk_ok = kk < K
        slot = tl.load(IDX + b * si_b + t64 * si_t + kk, mask=kk_ok, other=-1)
        ok = slot >= 0
        slot64 = tl.cast(slot, tl.int64)
        krow = tl.load(KI + b * sk_b + slot64[:, None] * sk_s + di[None, :],
                       mask=ok[:, None] & di_ok[None, :], other=0.0)
        g = tl.load(grow + kk, mask=kk_ok & ok, other=0.0)
        z = tl.dot(qi, tl.trans(krow), input_precision=PREC)  # [BHI, BK]
        a = tl.maximum(z * iscale, 0.0)
        dw += tl.sum(a * g[None, :], 1)
        g_z = tl.where(a > 0.0, (wv * iscale)[:, None] * g[None, :], 0.0).to(krow.dtype)
        dq = tl.dot(g_z, krow, dq, input_precision=PREC)
        dk = tl.dot(tl.trans(g_z), qi, input_precision=PREC)  # [BK, BDI]
        tl.atomic_add(dk_base + slot64[:, None] * DI + di[None, :], dk, mask=ok[:, None] & di_ok[None, :],
                      sem="relaxed")
    tl.store(DQ + ((b * T + t64) * HI + hi[:, None]) * DI + di[None, :], dq, mask=hi_ok[:, None] & di_ok[None, :])
    tl.store(DW + (b * T + t64) * HI + hi, dw, mask=hi_ok)


def _tiles(kind: str) -> tuple[int, int, int]:
    return (16, 1, 1) if _INTERPRET else TILES[kind]


def _prec(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


def _check(q, w, k, indices):
    B, T, Hi, Di = q.shape
    if w.shape != (B, T, Hi) or k.dim() != 3 or k.shape[0] != B or k.shape[2] != Di or indices.shape[:2] != (B, T):
        raise ValueError(f"indexer_kl: q {tuple(q.shape)}, w {tuple(w.shape)}, k {tuple(k.shape)}, indices "
                         f"{tuple(indices.shape)} do not match [B,T,Hi,Di], [B,T,Hi], [B,S,Di], [B,T,K]")
    if Hi > MAX_INDEX_HEADS:
        raise ValueError(f"indexer_kl: at most {MAX_INDEX_HEADS} index heads (one program holds them all), got {Hi}")
    if q.dtype != k.dtype:
        raise ValueError(f"indexer_kl: q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if not _INTERPRET and not q.is_cuda:
        raise ValueError("indexer_kl: the Triton kernels need CUDA tensors (use the torch reference on CPU)")


def _last_dense(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def scores_and_target(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_abs: torch.Tensor, kv: torch.Tensor,
                      lse: torch.Tensor, indices: torch.Tensor, *, index_scale: float,
                      attn_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """I, P [B,T,K] fp32 (package doc). q and k share a dtype, as do q_abs and kv."""
    _check(q, w, k, indices)
    B, T, Hi, Di = q.shape
    H, D = q_abs.shape[2:]
    K = indices.shape[2]
    if q_abs.shape[:2] != (B, T) or kv.shape[0] != B or kv.shape[2] != D or lse.shape != (B, T, H):
        raise ValueError(f"indexer_kl: q_abs {tuple(q_abs.shape)}, kv {tuple(kv.shape)}, lse {tuple(lse.shape)} "
                         "do not match [B,T,H,D], [B,S,D], [B,T,H]")
    if q_abs.dtype != kv.dtype:
        raise ValueError(f"indexer_kl: q_abs and kv must share a dtype, got {q_abs.dtype} and {kv.dtype}")
    q, w, k, q_abs, kv, indices = _last_dense(q, w, k, q_abs, kv, indices)
    lse = lse.float().contiguous()
    i_out = torch.empty(B, T, K, dtype=torch.float32, device=q.device)
    if T == 0 or K == 0:
        return i_out, torch.zeros_like(i_out)
    bk, warps, stages = _tiles("scores")
    _scores_kernel[(T, B)](q, w, k, indices, i_out, *q.stride()[:3], *w.stride()[:2], *k.stride()[:2],
                           *indices.stride()[:2], T, Hi, Di, K, float(index_scale), PREC=_prec(q),
                           BHI=_pow2(Hi), BDI=_pow2(Di), BK=bk, num_warps=warps, num_stages=stages)
    d1 = 1 << (D.bit_length() - 1)
    d2 = D - d1
    bh = 16 if _INTERPRET else min(TARGET_HEADS, _pow2(H))
    nhb = triton.cdiv(H, bh)
    p_out = (torch.zeros if nhb > 1 else torch.empty)(B, T, K, dtype=torch.float32, device=q.device)
    bk, warps, stages = _tiles("target")
    _target_kernel[(T, nhb, B)](q_abs, kv, lse, indices, p_out, *q_abs.stride()[:3], *kv.stride()[:2],
                                *indices.stride()[:2], T, H, d1, d2, K, float(attn_scale) * LOG2E,
                                HAS_TAIL=d2 > 0, ATOMIC=nhb > 1, PREC=_prec(q_abs), BH=bh, BD1=_pow2(d1),
                                BD2=_pow2(d2), BK=bk, num_warps=warps, num_stages=stages)
    return i_out, p_out


def scores_backward(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, indices: torch.Tensor, g: torch.Tensor, *,
                    index_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of Σ g·I in q, w, k, fp32 (package doc)."""
    _check(q, w, k, indices)
    B, T, Hi, Di = q.shape
    S, K = k.shape[1], indices.shape[2]
    q, w, k, indices = _last_dense(q, w, k, indices)
    g = g.float().contiguous()
    dq = torch.zeros(B, T, Hi, Di, dtype=torch.float32, device=q.device)
    dw = torch.zeros(B, T, Hi, dtype=torch.float32, device=q.device)
    dk = torch.zeros(B, S, Di, dtype=torch.float32, device=q.device)
    if T == 0 or K == 0:
        return dq, dw, dk
    bk, warps, stages = _tiles("backward")
    _backward_kernel[(T, B)](q, w, k, indices, g, dq, dw, dk, *q.stride()[:3], *w.stride()[:2], *k.stride()[:2],
                             *indices.stride()[:2], T, S, Hi, Di, K, float(index_scale), PREC=_prec(q),
                             BHI=_pow2(Hi), BDI=_pow2(Di), BK=bk, num_warps=warps, num_stages=stages)
    return dq, dw, dk
