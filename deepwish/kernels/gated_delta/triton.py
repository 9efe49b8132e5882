"""Gated delta rule in Triton: chunked forward and backward (training / prefill) and a fused one-step
decode. Math and shape legend: `reference.py`, which is the oracle for every kernel here.

Chunked forward, per chunk of BT = 64 steps (Gated DeltaNet paper, section 3; the kernel split follows
flash-linear-attention's chunk_gated_delta_rule):
    1. `_wy_inverse_kernel`  (parallel over chunks x heads): G = in-chunk cumsum(g);
                             A = strict_lower(beta_i k_i.k_j exp(G_i - G_j)) block by block; Ai = (I + A)^{-1}
                             by forward substitution inside the four 16 x 16 diagonal blocks, then block
                             forward substitution.
       `_wy_apply_kernel`    (parallel): w = Ai (beta exp(G) k), u = Ai (beta v).
    2. `_state_fwd_kernel`   (sequential over chunks; parallel over sequences x heads x V blocks):
                             h_c = S at the chunk start; v' = u - w S; S <- exp(G_last) S + k_dec^T v'.
    3. `_output_fwd_kernel`  (parallel): o = scale (exp(G) q h_c + lower_incl(q k^T exp(G_i - G_j)) v').
Backward reverses it:
    1. `_dv_local_kernel`    dv'_local = scale lower_incl(...)^T do                (parallel)
    2. `_state_bwd_kernel`   dS_c+1 stored per chunk; dv' = dv'_local + k_dec dS_c+1;
                             dS_c = exp(G_last) dS_c+1 + scale (exp(G) q)^T do - w^T dv'   (sequential)
    3. `_chunk_bwd_wy_kernel` the v side of a chunk (reads h, dv', v): dv (final), dw, partial dbeta
                             and the v part of dAi (parallel)
       `_chunk_bwd_qk_kernel` the q/k side (reads h, dh, v', do, q, k): dq (final), partial dk, dG
                             (parallel)
    4. `_wy_bwd_kernel`      the k side of the UT transform (dA = -Ai^T dAi Ai^T), completing dk and
                             dbeta; dg as a reverse in-chunk cumsum of dG (parallel)

Deviations / simplifications
- Intermediates that fla also keeps in the input precision (w, u, v', per-chunk states h and their
  gradients, dv'_local) are stored in the input dtype; the recurrent state itself, G and all
  accumulations are fp32. Ai is formed in fp32 and stored in the input dtype (every reader casts it
  there); dq, dk and dv leave the kernels in the input dtype (grouped value heads: summed in fp32
  first). Matmul operands are cast to the input dtype (tf32 for fp32 input on GPU).
- The forward saves h, v', w and Ai for the backward instead of recomputing them (faster; costs
  T/64 * HV * K * V elements of memory per layer).
- K <= 256 (one K tile). `use_qk_l2norm` in the chunked path normalises with torch ops before the
  kernels (autograd differentiates it); in the decode step it is done inside the kernel.
- Chunk size is fixed at 64.
- Packed input (`cu_seqlens`) costs one host sync per forward to build the chunk tables.
- The two sequential kernels are autotuned over the V split (BV 16..64) once per (N * HV, K, V, dtype);
  the first call at a new shape therefore runs each config once. Under TRITON_INTERPRET=1 a fixed
  config is used instead.
- Decode: one program per (batch, value head, V block of <= 32); BV halves until the grid has >= 4
  programs per SM. The state is read and written once, in place.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from deepwish.kernels.gated_delta.reference import check_inputs, check_step_inputs, l2norm

BT = 64   # chunk size
BS = 16   # sub-block of the UT-transform inverse
BT_C: tl.constexpr = tl.constexpr(BT)
BS_C: tl.constexpr = tl.constexpr(BS)


# ----------------------------------------------------------------------------------------------------------
# helpers
#
# Addressing: every tile is a scalar int64 base pointer (chunk start, head) plus int32 in-tile offsets.
# int64 offset tensors would cost two registers per element and spill.
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN: tl.constexpr):
    """(first time row of chunk i_c, number of valid rows in it) in the flattened [B * T] time axis."""
    i_c = tl.cast(i_c, tl.int64)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        i_n = i_c // NT
        i_t = i_c % NT
        bos = i_n * T
        eos = bos + T
    t0 = bos + i_t * BT_C
    return t0, tl.minimum(eos - t0, BT_C).to(tl.int32)


@triton.jit
def _sequence_bounds(i_n, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN: tl.constexpr):
    """(begin, length, index of its first chunk in the global chunk numbering) of sequence i_n."""
    i_n = tl.cast(i_n, tl.int64)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T
        boh = i_n * NT
    return bos, (eos - bos).to(tl.int32), boh


@triton.jit
def _load_G(p_G, o_i, m_t, nv, HV: tl.constexpr):
    """In-chunk cumulative log decay ([BT] fp32) and its last valid value. Rows past the sequence end
    repeat the last valid value so that exp(G_i - G_j) stays <= 1 there (zero-filled rows would give
    exp(+|G|), and inf * 0)."""
    b_gl = tl.load(p_G + (nv - 1) * HV)
    b_G = tl.load(p_G + o_i * HV, mask=m_t, other=0.)
    return tl.where(m_t, b_G, b_gl), b_gl


@triton.jit
def _substitute(L):
    """(I + L)^{-1} of each strictly lower 16 x 16 block of L [n, 16, 16] at once, by forward
    substitution: row i of the inverse is e_i - sum_{j<i} L_ij row_j (stable; a power series in L
    would grow and cancel)."""
    r = tl.arange(0, BS_C)
    eye = (r[:, None] == r[None, :]).to(tl.float32)[None, :, :]
    Ti = tl.zeros(L.shape, dtype=tl.float32) + eye
    for i in range(1, BS_C):
        sel = (r == i)[None, :, None]
        l_i = tl.sum(tl.where(sel, L, 0.), 1)                        # L[i, :] of each block
        row = tl.sum(l_i[:, :, None] * Ti, 1)                         # sum_j L[i, j] Ti[j, :]
        Ti = tl.where(sel, eye - row[:, None, :], Ti)
    return Ti


@triton.jit
def _merge_blocks(A10, A20, A21, A30, A31, A32, T00, T11, T22, T33, PREC: tl.constexpr):
    """The off-diagonal blocks of Ai = (I + A)^{-1} from A's and the diagonal inverses T_rr, by block
    forward substitution: T_rc = -T_rr sum_{c <= m < r} A_rm T_mc."""
    T10 = -_mm(T11, _mm(A10, T00, PREC), PREC)
    T21 = -_mm(T22, _mm(A21, T11, PREC), PREC)
    T32 = -_mm(T33, _mm(A32, T22, PREC), PREC)
    T20 = -_mm(T22, _mm(A20, T00, PREC) + _mm(A21, T10, PREC), PREC)
    T31 = -_mm(T33, _mm(A31, T11, PREC) + _mm(A32, T21, PREC), PREC)
    T30 = -_mm(T33, _mm(A30, T00, PREC) + _mm(A31, T10, PREC) + _mm(A32, T20, PREC), PREC)
    return T10, T20, T21, T30, T31, T32


@triton.jit
def _diagonal_blocks(Ti):
    """The four [16, 16] blocks of Ti [4, 16, 16]."""
    Tn = tl.arange(0, BT_C // BS_C)[:, None, None]
    return (tl.sum(tl.where(Tn == 0, Ti, 0.), 0), tl.sum(tl.where(Tn == 1, Ti, 0.), 0),
            tl.sum(tl.where(Tn == 2, Ti, 0.), 0), tl.sum(tl.where(Tn == 3, Ti, 0.), 0))


@triton.jit
def _st_lower(p_A, nv, HV: tl.constexpr, T00, T11, T22, T33, T10, T20, T21, T30, T31, T32):
    """Store Ai's ten lower 16 x 16 blocks at p_A (rows past nv not stored)."""
    _st(p_A, 0, 0, nv, HV, T00)
    _st(p_A, 1, 1, nv, HV, T11)
    _st(p_A, 2, 2, nv, HV, T22)
    _st(p_A, 3, 3, nv, HV, T33)
    _st(p_A, 1, 0, nv, HV, T10)
    _st(p_A, 2, 0, nv, HV, T20)
    _st(p_A, 2, 1, nv, HV, T21)
    _st(p_A, 3, 0, nv, HV, T30)
    _st(p_A, 3, 1, nv, HV, T31)
    _st(p_A, 3, 2, nv, HV, T32)


@triton.jit
def _chunk_G(g, G, t0, nv, i_hv, HV: tl.constexpr):
    """G = the chunk's in-chunk cumsum of g ([BT] fp32), stored (the state and output passes read it)."""
    o_i = tl.arange(0, BT_C)
    m_t = o_i < nv
    p_g = t0 * HV + i_hv
    b_G = tl.cumsum(tl.load(g + p_g + o_i * HV, mask=m_t, other=0.).to(tl.float32), axis=0)
    tl.store(G + p_g + o_i * HV, b_G, mask=m_t)   # padded rows have g = 0: they repeat the last valid G
    return b_G


@triton.jit
def _chunk_k_beta(k, beta, t0, nv, i_h, i_hv, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                  BK: tl.constexpr):
    """One chunk's k [BT, BK] (input dtype) and beta [BT] (fp32), rows past nv zero."""
    o_i = tl.arange(0, BT_C)
    m_t = o_i < nv
    o_k = tl.arange(0, BK)
    b_k = tl.load(k + (t0 * H + i_h) * K + o_i[:, None] * (H * K) + o_k[None, :],
                  mask=m_t[:, None] & (o_k < K)[None, :], other=0.)
    b_beta = tl.load(beta + t0 * HV + i_hv + o_i * HV, mask=m_t, other=0.).to(tl.float32)
    return b_k, b_beta


@triton.jit
def _row_block(x, r: tl.constexpr):
    """Rows r·16 .. r·16 + 15 of a chunk's [64] vector."""
    n = tl.arange(0, BT_C // BS_C)
    return tl.sum(tl.where((n == r)[:, None], tl.reshape(x, [BT_C // BS_C, BS_C]), 0.), 0)


@triton.jit
def _scaled_block(acc, b_beta, b_G, r: tl.constexpr, c: tl.constexpr):
    """Block (r, c) of A = strict_lower(beta_i k_i.k_j exp(G_i - G_j)) from its k_r k_c^T product."""
    G_r, G_c = _row_block(b_G, r), _row_block(b_G, c)
    x = _row_block(b_beta, r)[:, None] * acc * tl.exp(G_r[:, None] - G_c[None, :])
    if r == c:
        o = tl.arange(0, BS_C)
        x = tl.where(o[:, None] > o[None, :], x, 0.)
    return x


@triton.jit
def _k_rows(k, t0, nv, i_h, H: tl.constexpr, K: tl.constexpr, r: tl.constexpr, o_k, m_k):
    """k's rows r·16 .. r·16 + 15 of the chunk at columns o_k ([16, BKS]; rows past nv zero)."""
    rows = r * BS_C + tl.arange(0, BS_C)
    return tl.load(k + (t0 * H + i_h) * K + rows[:, None] * (H * K) + o_k[None, :],
                   mask=(rows < nv)[:, None] & m_k[None, :], other=0.)


@triton.jit
def _ut_inverse(k, g, beta, G, Ai, t0, nv, i_h, i_hv, H: tl.constexpr, HV: tl.constexpr,
                K: tl.constexpr, BKS: tl.constexpr):
    """G (stored) and Ai = (I + A)^{-1} of one chunk, A formed block by block: its ten lower 16 x 16
    blocks k_r k_c^T accumulated over K in slices of BKS columns, so that only four [16, BKS] tiles of k
    and ten [16, 16] sums are live. (One [64, K] x [K, 64] product holds all of k and all of A, and
    cutting A's blocks out of it costs a masked reduction each, or a trip through memory: both were
    measured twice as slow, reports/kernels.md run 6.) The diagonal blocks are inverted by forward
    substitution, the others by block forward substitution; only Ai is stored, in the input dtype."""
    o_i = tl.arange(0, BT_C)
    b_G = _chunk_G(g, G, t0, nv, i_hv, HV)
    b_beta = tl.load(beta + t0 * HV + i_hv + o_i * HV, mask=o_i < nv, other=0.).to(tl.float32)
    a00 = tl.zeros([BS_C, BS_C], dtype=tl.float32)
    a11 = tl.zeros([BS_C, BS_C], dtype=tl.float32)
    a22 = tl.zeros([BS_C, BS_C], dtype=tl.float32)
    a33 = tl.zeros([BS_C, BS_C], dtype=tl.float32)
    a10 = tl.zeros([BS_C, BS_C], dtype=tl.float32)
    a20 = tl.zeros([BS_C, BS_C], dtype=tl.float32)
    a21 = tl.zeros([BS_C, BS_C], dtype=tl.float32)
    a30 = tl.zeros([BS_C, BS_C], dtype=tl.float32)
    a31 = tl.zeros([BS_C, BS_C], dtype=tl.float32)
    a32 = tl.zeros([BS_C, BS_C], dtype=tl.float32)
    PREC: tl.constexpr = "ieee" if k.dtype.element_ty == tl.float32 else "tf32"
    for i_k in range(0, tl.cdiv(K, BKS)):
        o_k = tl.cast(i_k, tl.int64) * BKS + tl.arange(0, BKS)
        m_k = o_k < K
        k0 = _k_rows(k, t0, nv, i_h, H, K, 0, o_k, m_k)
        k1 = _k_rows(k, t0, nv, i_h, H, K, 1, o_k, m_k)
        k2 = _k_rows(k, t0, nv, i_h, H, K, 2, o_k, m_k)
        k3 = _k_rows(k, t0, nv, i_h, H, K, 3, o_k, m_k)
        a00 = tl.dot(k0, tl.trans(k0), a00, input_precision=PREC)
        a11 = tl.dot(k1, tl.trans(k1), a11, input_precision=PREC)
        a22 = tl.dot(k2, tl.trans(k2), a22, input_precision=PREC)
        a33 = tl.dot(k3, tl.trans(k3), a33, input_precision=PREC)
        a10 = tl.dot(k1, tl.trans(k0), a10, input_precision=PREC)
        a20 = tl.dot(k2, tl.trans(k0), a20, input_precision=PREC)
        a21 = tl.dot(k2, tl.trans(k1), a21, input_precision=PREC)
        a30 = tl.dot(k3, tl.trans(k0), a30, input_precision=PREC)
        a31 = tl.dot(k3, tl.trans(k1), a31, input_precision=PREC)
        a32 = tl.dot(k3, tl.trans(k2), a32, input_precision=PREC)
    # the four diagonal blocks stacked [4, 16, 16] (block n = 2q + p of join(join(00, 11), join(22, 33)))
    L = tl.reshape(tl.permute(tl.join(tl.join(_scaled_block(a00, b_beta, b_G, 0, 0),
                                                _scaled_block(a11, b_beta, b_G, 1, 1)),
                                        tl.join(_scaled_block(a22, b_beta, b_G, 2, 2),
                                                _scaled_block(a33, b_beta, b_G, 3, 3))), (3, 2, 0, 1)),
                   [BT_C // BS_C, BS_C, BS_C])
    T00, T11, T22, T33 = _diagonal_blocks(_substitute(L))
    T10, T20, T21, T30, T31, T32 = _merge_blocks(
        _scaled_block(a10, b_beta, b_G, 1, 0), _scaled_block(a20, b_beta, b_G, 2, 0),
        _scaled_block(a21, b_beta, b_G, 2, 1), _scaled_block(a30, b_beta, b_G, 3, 0),
        _scaled_block(a31, b_beta, b_G, 3, 1), _scaled_block(a32, b_beta, b_G, 3, 2), T00, T11, T22, T33, PREC)
    _st_lower(Ai + (t0 * HV + i_hv) * BT_C, nv, HV, T00, T11, T22, T33, T10, T20, T21, T30, T31, T32)


@triton.jit
def _block_ptrs(p, R: tl.constexpr, C: tl.constexpr, nv, HV: tl.constexpr):
    """Pointers and row mask of block (R, C), 16 x 16, of a per-chunk [BT, BT] matrix stored as
    [time, HV, BT]; p points at (chunk start, head)."""
    r = tl.arange(0, BS_C)
    rows = R * BS_C + r
    return p + rows[:, None] * (HV * BT_C) + C * BS_C + r[None, :], (rows < nv)[:, None]


@triton.jit
def _st(p, R: tl.constexpr, C: tl.constexpr, nv, HV: tl.constexpr, x):
    ptrs, m = _block_ptrs(p, R, C, nv, HV)
    tl.store(ptrs, x.to(p.dtype.element_ty), mask=m)


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    # Products of the 16 x 16 inverse blocks: full fp32 for fp32 inputs; tf32 for 16-bit inputs,
    # whose Ai is rounded to 16 bits for w and u anyway.
    return tl.dot(a, b, input_precision=PREC)


# ----------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _wy_apply(v, w, u, b_k, b_beta, b_G, p_A, t0, nv, i_hv, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr):
    """w = Ai (beta exp(G) k) and u = Ai (beta v) of one chunk, Ai read back from its buffer (p_A)."""
    dt = b_k.dtype
    o_i = tl.arange(0, BT_C)
    m_t = o_i < nv
    o_k = tl.arange(0, BK)
    lower = o_i[:, None] >= o_i[None, :]
    b_Ai = tl.load(p_A + o_i[:, None] * (HV * BT_C) + o_i[None, :], mask=lower & m_t[:, None], other=0.).to(dt)
    b_w = tl.dot(b_Ai, (b_k * (b_beta * tl.exp(b_G))[:, None]).to(dt))
    tl.store(w + (t0 * HV + i_hv) * K + o_i[:, None] * (HV * K) + o_k[None, :], b_w.to(dt),
             mask=m_t[:, None] & (o_k < K)[None, :])
    p_v = (t0 * HV + i_hv) * V
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        o_tv = o_i[:, None] * (HV * V) + o_v[None, :]
        b_v = tl.load(v + p_v + o_tv, mask=m, other=0.)
        b_u = tl.dot(b_Ai, (b_v * b_beta[:, None]).to(dt))
        tl.store(u + p_v + o_tv, b_u.to(dt), mask=m)


@triton.jit
def _wy_operands(k, beta, G, t0, nv, i_h, i_hv, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                 BK: tl.constexpr):
    """k [BT, BK], beta and G [BT] (fp32) of one chunk, read back for `_wy_apply`."""
    o_i = tl.arange(0, BT_C)
    b_k, b_beta = _chunk_k_beta(k, beta, t0, nv, i_h, i_hv, H, HV, K, BK)
    b_G, _ = _load_G(G + t0 * HV + i_hv, o_i, o_i < nv, nv, HV)
    return b_k, b_beta, b_G


@triton.jit
def _wy_inverse_kernel(k, g, beta, G, Ai, cu_seqlens, chunk_indices, T, NT,
                       H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BKS: tl.constexpr,
                       IS_VARLEN: tl.constexpr):
    """The UT transform's first kernel: G and Ai of one chunk."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    t0, nv = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    _ut_inverse(k, g, beta, G, Ai, t0, nv, i_hv // (HV // H), i_hv, H, HV, K, BKS)


@triton.jit
def _wy_apply_kernel(k, v, beta, G, Ai, w, u, cu_seqlens, chunk_indices, T, NT,
                     H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """The UT transform's second kernel: w and u of one chunk from the stored G and Ai."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    t0, nv = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    b_k, b_beta, b_G = _wy_operands(k, beta, G, t0, nv, i_h, i_hv, H, HV, K, BK)
    _wy_apply(v, w, u, b_k, b_beta, b_G, Ai + (t0 * HV + i_hv) * BT_C, t0, nv, i_hv, HV, K, V, BK, BV)


@triton.jit
def _state_fwd_kernel(k, w, u, G, h, v_new, h0, ht, cu_seqlens, chunk_offsets, T, NT, NHV,
                      H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                      IS_VARLEN: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos, L, boh = _sequence_bounds(i_n, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN)
    nt = tl.cdiv(L, BT_C)
    o_i = tl.arange(0, BT_C)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    o_tk_w = o_i[:, None] * (HV * K) + o_k[None, :]
    o_tk_k = o_i[:, None] * (H * K) + o_k[None, :]
    o_tv = o_i[:, None] * (HV * V) + o_v[None, :]
    dt = k.dtype.element_ty

    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_S += tl.load(h0 + tl.cast(i_nh, tl.int64) * (K * V) + o_kv, mask=m_kv, other=0.).to(tl.float32)
    for i_t in range(nt):
        i_t = tl.cast(i_t, tl.int64)
        t0 = bos + i_t * BT_C
        nv = tl.minimum(L - i_t * BT_C, BT_C).to(tl.int32)
        m_t = o_i < nv
        tl.store(h + ((boh + i_t) * HV + i_hv) * (K * V) + o_kv, b_S.to(h.dtype.element_ty), mask=m_kv)
        b_G, b_gl = _load_G(G + t0 * HV + i_hv, o_i, m_t, nv, HV)
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_w = tl.load(w + (t0 * HV + i_hv) * K + o_tk_w, mask=m_tk, other=0.)
        b_k = tl.load(k + (t0 * H + i_h) * K + o_tk_k, mask=m_tk, other=0.)
        p_tv = (t0 * HV + i_hv) * V
        b_u = tl.load(u + p_tv + o_tv, mask=m_tv, other=0.)
        b_vn = b_u.to(tl.float32) - tl.dot(b_w, b_S.to(dt))
        tl.store(v_new + p_tv + o_tv, b_vn.to(v_new.dtype.element_ty), mask=m_tv)
        # (exp(G_last - G) k)^T v' as k^T (exp(G_last - G) v'): the decay scales a [BT, BV] tile, not
        # [BT, K], and k goes from memory straight into the matmul.
        b_vd = (b_vn * tl.exp(b_gl - b_G)[:, None]).to(dt)
        b_S = b_S * tl.exp(b_gl) + tl.dot(tl.trans(b_k), b_vd)
    if STORE_HT:
        tl.store(ht + tl.cast(i_nh, tl.int64) * (K * V) + o_kv, b_S, mask=m_kv)


@triton.jit
def _output_fwd_kernel(q, k, v_new, G, h, o, cu_seqlens, chunk_indices, scale, T, NT,
                       H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_c, i_hv, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    t0, nv = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    o_i = tl.arange(0, BT_C)
    m_t = o_i < nv
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    dt = k.dtype.element_ty

    m_tk = m_t[:, None] & m_k[None, :]
    p_qk = (t0 * H + i_h) * K
    o_tk = o_i[:, None] * (H * K) + o_k[None, :]
    b_q = tl.load(q + p_qk + o_tk, mask=m_tk, other=0.)
    b_k = tl.load(k + p_qk + o_tk, mask=m_tk, other=0.)
    b_h = tl.load(h + (tl.cast(i_c, tl.int64) * HV + i_hv) * (K * V) + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.)
    b_G, b_gl = _load_G(G + t0 * HV + i_hv, o_i, m_t, nv, HV)
    m_tv = m_t[:, None] & m_v[None, :]
    p_tv = (t0 * HV + i_hv) * V
    o_tv = o_i[:, None] * (HV * V) + o_v[None, :]
    b_vn = tl.load(v_new + p_tv + o_tv, mask=m_tv, other=0.)

    lower = o_i[:, None] >= o_i[None, :]
    b_Aqk = tl.dot(b_q, tl.trans(b_k)) * tl.exp(tl.where(lower, b_G[:, None] - b_G[None, :], 0.))
    b_Aqk = tl.where(lower, b_Aqk, 0.)
    b_o = tl.dot(b_q, b_h) * tl.exp(b_G)[:, None] + tl.dot(b_Aqk.to(dt), b_vn)
    tl.store(o + p_tv + o_tv, (b_o * scale).to(o.dtype.element_ty), mask=m_tv)


# ----------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _dv_local_kernel(q, k, G, do, dvl, cu_seqlens, chunk_indices, scale, T, NT,
                     H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_c, i_hv, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    t0, nv = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    o_i = tl.arange(0, BT_C)
    m_t = o_i < nv
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    dt = k.dtype.element_ty

    m_tk = m_t[:, None] & m_k[None, :]
    p_qk = (t0 * H + i_h) * K
    o_tk = o_i[:, None] * (H * K) + o_k[None, :]
    b_q = tl.load(q + p_qk + o_tk, mask=m_tk, other=0.)
    b_k = tl.load(k + p_qk + o_tk, mask=m_tk, other=0.)
    b_G, b_gl = _load_G(G + t0 * HV + i_hv, o_i, m_t, nv, HV)
    # Transposed intra-chunk attention: rows j (keys), columns i (queries), kept where i >= j.
    upper = o_i[:, None] <= o_i[None, :]
    b_At = tl.dot(b_k, tl.trans(b_q)) * tl.exp(tl.where(upper, b_G[None, :] - b_G[:, None], 0.))
    b_At = tl.where(upper, b_At, 0.).to(dt)
    m_tv = m_t[:, None] & m_v[None, :]
    p_tv = (t0 * HV + i_hv) * V
    o_tv = o_i[:, None] * (HV * V) + o_v[None, :]
    b_do = tl.load(do + p_tv + o_tv, mask=m_tv, other=0.).to(dt)
    b_dv = tl.dot(b_At, b_do) * scale
    tl.store(dvl + p_tv + o_tv, b_dv.to(dvl.dtype.element_ty), mask=m_tv)


@triton.jit
def _state_bwd_kernel(q, k, w, G, do, dvl, dh, dv_new, dht, dh0, cu_seqlens, chunk_offsets, scale, T, NT, NHV,
                      H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                      IS_VARLEN: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos, L, boh = _sequence_bounds(i_n, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN)
    nt = tl.cdiv(L, BT_C)
    o_i = tl.arange(0, BT_C)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    o_tk_w = o_i[:, None] * (HV * K) + o_k[None, :]
    o_tk_k = o_i[:, None] * (H * K) + o_k[None, :]
    o_tv = o_i[:, None] * (HV * V) + o_v[None, :]
    dt = k.dtype.element_ty

    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dS += tl.load(dht + tl.cast(i_nh, tl.int64) * (K * V) + o_kv, mask=m_kv, other=0.).to(tl.float32)
    for i_r in range(nt):
        i_t = tl.cast(nt - 1 - i_r, tl.int64)
        t0 = bos + i_t * BT_C
        nv = tl.minimum(L - i_t * BT_C, BT_C).to(tl.int32)
        m_t = o_i < nv
        # dh_c is the gradient of the state at the END of chunk c (= the start of chunk c + 1).
        tl.store(dh + ((boh + i_t) * HV + i_hv) * (K * V) + o_kv, b_dS.to(dh.dtype.element_ty), mask=m_kv)
        b_G, b_gl = _load_G(G + t0 * HV + i_hv, o_i, m_t, nv, HV)
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_qk = (t0 * H + i_h) * K
        b_q = tl.load(q + p_qk + o_tk_k, mask=m_tk, other=0.)
        b_k = tl.load(k + p_qk + o_tk_k, mask=m_tk, other=0.)
        b_w = tl.load(w + (t0 * HV + i_hv) * K + o_tk_w, mask=m_tk, other=0.)
        p_tv = (t0 * HV + i_hv) * V
        b_do = tl.load(do + p_tv + o_tv, mask=m_tv, other=0.).to(dt)
        b_dvl = tl.load(dvl + p_tv + o_tv, mask=m_tv, other=0.)
        # Decays scale the [BT, BV] tiles rather than q and k (as in the forward).
        b_dSd = b_dS.to(dt)
        b_dvn = b_dvl.to(tl.float32) + tl.dot(b_k, b_dSd) * tl.exp(b_gl - b_G)[:, None]
        tl.store(dv_new + p_tv + o_tv, b_dvn.to(dv_new.dtype.element_ty), mask=m_tv)
        b_dog = (b_do.to(tl.float32) * (tl.exp(b_G) * scale)[:, None]).to(dt)
        b_dS = (b_dS * tl.exp(b_gl) + tl.dot(tl.trans(b_q), b_dog)
                - tl.dot(tl.trans(b_w), b_dvn.to(dt)))
    if STORE_DH0:
        tl.store(dh0 + tl.cast(i_nh, tl.int64) * (K * V) + o_kv, b_dS, mask=m_kv)


@triton.jit
def _v_block(i_v, o_i, m_t, o_k, m_k, HV: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    """Offsets and masks of V block i_v: into a [K, V] state (o_kv, m_kv) and into a chunk's [BT, V]
    rows of a [.., T, HV, V] tensor (o_tv, m_tv)."""
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    return (o_k[:, None] * V + o_v[None, :], m_k[:, None] & m_v[None, :],
            o_i[:, None] * (HV * V) + o_v[None, :], m_t[:, None] & m_v[None, :])


@triton.jit
def _chunk_bwd_wy_kernel(k, v, beta, Ai, h, dv_new, dw, dv, dbeta, dT,
                         cu_seqlens, chunk_indices, T, NT,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """The v side of one chunk's backward: through v' = u - w S and u = Ai (beta v), dv (final),
    dw = -dv' hᵀ, dbeta's v part and the v part of dAi (dT), the last two for `_wy_bwd_kernel`."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    t0, nv = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    o_i = tl.arange(0, BT_C)
    m_t = o_i < nv
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    dt = k.dtype.element_ty
    p_g = t0 * HV + i_hv
    b_beta = tl.load(beta + p_g + o_i * HV, mask=m_t, other=0.).to(tl.float32)
    lower = o_i[:, None] >= o_i[None, :]
    p_A = p_g * BT_C + o_i[:, None] * (HV * BT_C) + o_i[None, :]
    b_Ait = tl.trans(tl.load(Ai + p_A, mask=lower & m_t[:, None], other=0.)).to(dt)
    b_dw = tl.zeros([BT_C, BK], dtype=tl.float32)     # -dv' h^T
    b_dT = tl.zeros([BT_C, BT_C], dtype=tl.float32)   # gradient of Ai through u = Ai (beta v)
    b_dbeta = tl.zeros([BT_C], dtype=tl.float32)
    p_h = h + (tl.cast(i_c, tl.int64) * HV + i_hv) * (K * V)
    p_tv = (t0 * HV + i_hv) * V
    for i_v in range(tl.cdiv(V, BV)):
        o_kv, m_kv, o_tv, m_tv = _v_block(i_v, o_i, m_t, o_k, m_k, HV, V, BV)
        b_h = tl.load(p_h + o_kv, mask=m_kv, other=0.)
        b_dvn = tl.load(dv_new + p_tv + o_tv, mask=m_tv, other=0.)
        b_v = tl.load(v + p_tv + o_tv, mask=m_tv, other=0.)
        b_dw -= tl.dot(b_dvn, tl.trans(b_h))
        # u = Ai (beta v), du = dv'
        b_dXv = tl.dot(b_Ait, b_dvn)
        tl.store(dv + p_tv + o_tv, (b_dXv * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_tv)
        b_dbeta += tl.sum(b_dXv * b_v.to(tl.float32), 1)
        b_dT += tl.dot(b_dvn, tl.trans((b_v * b_beta[:, None]).to(dt)))
    p_tk = (t0 * HV + i_hv) * K
    o_tk_hv = o_i[:, None] * (HV * K) + o_k[None, :]
    tl.store(dw + p_tk + o_tk_hv, b_dw.to(dw.dtype.element_ty), mask=m_tk)
    tl.store(dT + p_A, b_dT, mask=m_t[:, None])
    tl.store(dbeta + p_g + o_i * HV, b_dbeta, mask=m_t)


@triton.jit
def _chunk_bwd_qk_kernel(q, k, G, h, dh, v_new, do, dq, dk, dG,
                         cu_seqlens, chunk_indices, scale, T, NT,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """The q/k side of one chunk's backward: through the output (inter-chunk read of h and the
    intra-chunk attention) and the state update, dq (final), the partial dk that `_wy_bwd_kernel`
    completes, and the in-chunk cumulative dG."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    t0, nv = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    o_i = tl.arange(0, BT_C)
    m_t = o_i < nv
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    dt = k.dtype.element_ty
    p_g = t0 * HV + i_hv
    b_G, b_gl = _load_G(G + p_g, o_i, m_t, nv, HV)
    lower = o_i[:, None] >= o_i[None, :]
    b_dq = tl.zeros([BT_C, BK], dtype=tl.float32)     # do h^T
    b_dkd = tl.zeros([BT_C, BK], dtype=tl.float32)    # v' dh^T  (gradient of the decayed keys)
    b_dP = tl.zeros([BT_C, BT_C], dtype=tl.float32)   # do v'^T
    b_hdh = tl.zeros([BK], dtype=tl.float32)          # rows of h * dh (a [BK, BV] tile held 4.7% slower)
    p_h = h + (tl.cast(i_c, tl.int64) * HV + i_hv) * (K * V)
    p_dh = dh + (tl.cast(i_c, tl.int64) * HV + i_hv) * (K * V)
    p_tv = (t0 * HV + i_hv) * V
    for i_v in range(tl.cdiv(V, BV)):
        o_kv, m_kv, o_tv, m_tv = _v_block(i_v, o_i, m_t, o_k, m_k, HV, V, BV)
        b_h = tl.load(p_h + o_kv, mask=m_kv, other=0.)
        b_dh = tl.load(p_dh + o_kv, mask=m_kv, other=0.)
        b_vn = tl.load(v_new + p_tv + o_tv, mask=m_tv, other=0.)
        b_do = tl.load(do + p_tv + o_tv, mask=m_tv, other=0.).to(dt)
        b_dq += tl.dot(b_do, tl.trans(b_h))
        b_dkd += tl.dot(b_vn, tl.trans(b_dh))
        b_dP += tl.dot(b_do, tl.trans(b_vn))
        b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)
    p_tk = (t0 * HV + i_hv) * K
    o_tk_hv = o_i[:, None] * (HV * K) + o_k[None, :]
    p_qk = (t0 * H + i_h) * K
    o_tk = o_i[:, None] * (H * K) + o_k[None, :]
    b_q = tl.load(q + p_qk + o_tk, mask=m_tk, other=0.)
    b_k = tl.load(k + p_qk + o_tk, mask=m_tk, other=0.)
    # inter-chunk read: o += scale exp(G) q h
    b_dq = b_dq * (scale * tl.exp(b_G))[:, None]
    b_dG = tl.sum(b_dq * b_q.to(tl.float32), 1)
    # intra-chunk attention: o += scale lower_incl(q k^T exp(G_i - G_j)) v'
    b_Z = tl.where(lower, b_dP * tl.exp(tl.where(lower, b_G[:, None] - b_G[None, :], 0.)), 0.) * scale
    b_Zqk = b_Z * tl.dot(b_q, tl.trans(b_k))
    b_dG += tl.sum(b_Zqk, 1) - tl.sum(b_Zqk, 0)
    b_Zd = b_Z.to(dt)
    b_dq += tl.dot(b_Zd, b_k)
    tl.store(dq + p_tk + o_tk_hv, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    # state update: S' = exp(G_last) S + (exp(G_last - G) k)^T v'
    b_kdec = tl.exp(b_gl - b_G)
    b_dk = tl.dot(tl.trans(b_Zd), b_q) + b_dkd * b_kdec[:, None]
    tl.store(dk + p_tk + o_tk_hv, b_dk, mask=m_tk)
    b_t2 = tl.sum(b_dkd * b_k.to(tl.float32), 1) * b_kdec
    # dG_last moves every g of the chunk: put it on the last valid row, the reverse cumsum spreads it.
    b_dgl = tl.sum(b_t2, 0) + tl.exp(b_gl) * tl.sum(b_hdh, 0)
    b_dG = b_dG - b_t2 + tl.where(o_i == nv - 1, b_dgl, 0.)
    tl.store(dG + p_g + o_i * HV, b_dG, mask=m_t)


@triton.jit
def _wy_bwd_kernel(k, G, beta, Ai, dw, dT, dk, dk_out, dbeta, dG, dg, cu_seqlens, chunk_indices, T, NT,
                   H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                   BKS: tl.constexpr, IS_VARLEN: tl.constexpr):
    """k-side of the UT-transform backward (w = Ai (beta exp(G) k), Ai = (I + A)^{-1}); completes dk
    (the partial dk in fp32 plus this part, stored at dk_out in its dtype: the same buffer, or the
    gradient in the input dtype) and dbeta in place, and turns dG into dg by the reverse in-chunk cumsum.
    K is walked in slices of BKS twice, so no [BT, K] tile is held whole (at a full K they kept one
    CTA an SM): first the two sums over K, M = k dw^T and k k^T, from which dAi's k-part and the
    row sums for dbeta and dG follow ([BT, BT] work); then dk slice by slice. The row sums are taken
    from M after the loop, not accumulated inside it: per-slice row sums of the dot's accumulator
    gave run-to-run different dbeta and dg on an H100 (triton 3.6) at some BKS / warps."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    t0, nv = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    o_i = tl.arange(0, BT_C)
    m_t = o_i < nv
    o_k = tl.arange(0, BKS)
    dt = k.dtype.element_ty

    p_g = t0 * HV + i_hv
    b_G, b_gl = _load_G(G + p_g, o_i, m_t, nv, HV)
    b_beta = tl.load(beta + p_g + o_i * HV, mask=m_t, other=0.).to(tl.float32)
    b_eG = tl.exp(b_G)
    b_bG = b_beta * b_eG
    lower = o_i[:, None] >= o_i[None, :]
    p_A = p_g * BT_C + o_i[:, None] * (HV * BT_C) + o_i[None, :]
    b_Ait = tl.trans(tl.load(Ai + p_A, mask=lower & m_t[:, None], other=0.)).to(dt)
    b_M = tl.zeros([BT_C, BT_C], dtype=tl.float32)     # k dw^T
    b_KK = tl.zeros([BT_C, BT_C], dtype=tl.float32)    # k k^T
    p_k = k + (t0 * H + i_h) * K + o_i[:, None] * (H * K) + o_k[None, :]
    p_tk = (t0 * HV + i_hv) * K + o_i[:, None] * (HV * K) + o_k[None, :]
    for i_k in range(tl.cdiv(K, BKS)):
        k0 = tl.cast(i_k, tl.int64) * BKS
        m_tk = m_t[:, None] & (o_k + k0 < K)[None, :]
        b_k = tl.load(p_k + k0, mask=m_tk, other=0.)
        b_dw = tl.load(dw + p_tk + k0, mask=m_tk, other=0.).to(dt)
        b_M += tl.dot(b_k, tl.trans(b_dw))
        b_KK += tl.dot(b_k, tl.trans(b_k))
    # with dXk = Ai^T dw (the gradient of X = beta exp(G) k): sum_k dXk_ik k_ik = sum_j Ait_ij M_ij,
    # and dw X^T = M^T scaled by the columns' beta exp(G)
    b_r = tl.sum(b_Ait.to(tl.float32) * b_M, 1)
    b_dbeta = b_r * b_eG
    b_dG = b_r * b_bG
    b_dT = tl.load(dT + p_A, mask=m_t[:, None], other=0.) + tl.trans(b_M) * b_bG[None, :]
    # dA = -Ai^T dAi Ai^T on the strict lower triangle
    strict = o_i[:, None] > o_i[None, :]
    b_dA = -tl.dot(tl.dot(b_Ait, b_dT.to(dt)).to(dt), b_Ait)
    b_dA = tl.where(strict, b_dA, 0.)
    b_Ds = tl.exp(tl.where(strict, b_G[:, None] - b_G[None, :], 0.))
    b_dAkk = b_dA * b_KK * b_Ds    # = dA * A / beta_i
    b_dbeta += tl.sum(b_dAkk, 1)
    b_dAA = b_dAkk * b_beta[:, None]
    b_dG += tl.sum(b_dAA, 1) - tl.sum(b_dAA, 0)
    b_F = (b_dA * b_Ds * b_beta[:, None]).to(dt)
    b_Ft = tl.trans(b_F)
    for i_k in range(tl.cdiv(K, BKS)):
        k0 = tl.cast(i_k, tl.int64) * BKS
        m_tk = m_t[:, None] & (o_k + k0 < K)[None, :]
        b_k = tl.load(p_k + k0, mask=m_tk, other=0.)
        b_dw = tl.load(dw + p_tk + k0, mask=m_tk, other=0.).to(dt)
        b_dk = tl.dot(b_Ait, b_dw) * b_bG[:, None] + tl.dot(b_F, b_k) + tl.dot(b_Ft, b_k)
        b_dk += tl.load(dk + p_tk + k0, mask=m_tk, other=0.)
        tl.store(dk_out + p_tk + k0, b_dk.to(dk_out.dtype.element_ty), mask=m_tk)

    tl.store(dbeta + p_g + o_i * HV, tl.load(dbeta + p_g + o_i * HV, mask=m_t, other=0.) + b_dbeta, mask=m_t)
    # G = cumsum(g) within the chunk, so dg is the reverse cumsum of dG.
    b_dG = tl.where(m_t, b_dG + tl.load(dG + p_g + o_i * HV, mask=m_t, other=0.), 0.)
    b_dg = tl.sum(b_dG, 0) - tl.cumsum(b_dG, axis=0) + b_dG
    tl.store(dg + p_g + o_i * HV, b_dg, mask=m_t)


# ----------------------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _decode_step_kernel(q, k, v, g, beta, state, o, scale,
                        H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_S = state + tl.cast(i_bh, tl.int64) * (K * V) + o_k[:, None] * V + o_v[None, :]
    b_S = tl.load(p_S, mask=m_kv, other=0.)
    p_qk = (i_b * H + i_h) * K + o_k
    b_q = tl.load(q + p_qk, mask=m_k, other=0.).to(tl.float32)
    b_k = tl.load(k + p_qk, mask=m_k, other=0.).to(tl.float32)
    if L2NORM:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q, 0) + 1e-6)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, 0) + 1e-6)
    b_v = tl.load(v + i_bh * V + o_v, mask=m_v, other=0.).to(tl.float32)
    b_g = tl.load(g + i_bh).to(tl.float32)
    b_beta = tl.load(beta + i_bh).to(tl.float32)
    b_S = b_S * tl.exp(b_g)
    b_delta = b_beta * (b_v - tl.sum(b_S * b_k[:, None], 0))
    b_S += b_k[:, None] * b_delta[None, :]
    b_o = tl.sum(b_S * b_q[:, None], 0) * scale
    tl.store(p_S, b_S, mask=m_kv)
    tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


# ----------------------------------------------------------------------------------------------------------
# launch
# ----------------------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The sequential kernels are latency-bound (two small dots a chunk on the critical path). fla's state
# pass on Hopper searches 2 and 4 warps with 2-4 stages (fla/ops/common/chunk_delta_h.py), and ours
# trails its forward from T = 32k up (reports/kernels.md), so the forward also tries 2 warps (mma.sync:
# wgmma needs a warp group) where ptxas keeps them in registers: at K = V = 128 (sm_90, triton 3.7)
# BV 16 w2 s2 255 registers, no spills; BV 32 w2 s2 168 bytes; BV 32 w2 s3 and BV 64 w2 936-15k
# (left out). The backward's 2-warp forms spill 1-11 kB and are left out.
_SEQ_BWD_CONFIGS = [triton.Config({"BV": bv}, num_warps=nw, num_stages=ns)
                    for bv, nw, ns in ((16, 4, 2), (32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 8, 2))]
_SEQ_FWD_CONFIGS = _SEQ_BWD_CONFIGS + [triton.Config({"BV": bv}, num_warps=nw, num_stages=ns)
                                       for bv, nw, ns in ((16, 2, 2), (32, 2, 2), (16, 4, 3))]
_V_TILE_CONFIGS = [triton.Config({"BV": bv}, num_warps=nw) for bv in (64, 128) for nw in (4, 8)]
# small programs: ten [16, 16] sums and four [16, BKS] tiles of k (1-4 warps, as many CTAs an SM as fit)
_INVERSE_CONFIGS = [triton.Config({"BKS": bks}, num_warps=nw) for bks in (32, 64) for nw in (1, 2, 4)]
# The chunk backward in two kernels, so that each holds few enough [BT, K] accumulators for 4 warps and
# two CTAs an SM (one kernel holding all five needed 8 warps, one CTA an SM: 2.39 ms at T 64k on an H100
# against 0.77 + 1.27 split, reports/kernels.md run 9). Autotuning's timings on an H100 at K = V = 128,
# T 4k: the v side BV 128 w4 53 us (BV 64 w4 58, w8 68), the q/k side BV 64 w4 92 us (BV 32 w4 136,
# BV 64 w8 104, BV 128 147, BV 64 w2 1,496).
_CHUNK_BWD_V_CONFIGS = [triton.Config({"BV": bv}, num_warps=nw) for bv, nw in ((64, 4), (128, 4), (128, 8))]
_CHUNK_BWD_QK_CONFIGS = [triton.Config({"BV": bv}, num_warps=nw) for bv, nw in ((32, 4), (64, 4), (64, 8))]
# `_wy_bwd_kernel`'s K slice and warps, fixed (it accumulates in place, so it is not autotuned): on an
# H100 at T = 64k, D 128 it took 0.89 ms at (64, 4) against 1.59 ms holding the whole K at 8 warps;
# (32, 4) ~1.0 ms, (32, 8) no gain (reports/kernels.md, run 8)
WY_BWD_BKS, WY_BWD_WARPS = 64, 4
# Launch shapes are measured once per (shape, dtype), since no GPU timing informed the defaults. Every
# autotuned kernel writes only outputs (or scratch it rewrites), so repeated trial launches are safe;
# `_wy_bwd_kernel` accumulates into dk / dbeta in place and is therefore not autotuned. The sequential
# kernels carry the whole run's latency, and their best V split depends on N * HV.
_state_fwd_tuned = triton.autotune(configs=_SEQ_FWD_CONFIGS, key=["NHV", "K", "V"])(_state_fwd_kernel)
_state_bwd_tuned = triton.autotune(configs=_SEQ_BWD_CONFIGS, key=["NHV", "K", "V"])(_state_bwd_kernel)
_wy_inverse_tuned = triton.autotune(configs=_INVERSE_CONFIGS, key=["K"])(_wy_inverse_kernel)
_wy_apply_tuned = triton.autotune(configs=_V_TILE_CONFIGS, key=["K", "V"])(_wy_apply_kernel)
_output_fwd_tuned = triton.autotune(configs=_V_TILE_CONFIGS, key=["K", "V"])(_output_fwd_kernel)
_dv_local_tuned = triton.autotune(configs=_V_TILE_CONFIGS, key=["K", "V"])(_dv_local_kernel)
_chunk_bwd_wy_tuned = triton.autotune(configs=_CHUNK_BWD_V_CONFIGS, key=["K", "V"])(_chunk_bwd_wy_kernel)
_chunk_bwd_qk_tuned = triton.autotune(configs=_CHUNK_BWD_QK_CONFIGS, key=["K", "V"])(_chunk_bwd_qk_kernel)


def _launch(tuned, raw, grid, args, kw, interpreter_meta: dict):
    """Autotuned launch on a GPU; under the interpreter, one fixed config (`interpreter_meta`).
    grid: meta-parameters -> launch grid."""
    if _interpreting():
        raw[grid(interpreter_meta)](*args, **kw, **interpreter_meta)
    else:
        tuned[grid](*args, **kw)


def _chunk_layout(B: int, T: int, cu_seqlens: torch.Tensor | None, device):
    """(cu_seqlens int32 | None, chunk_indices [NC, 2] | None, chunk_offsets [N + 1] | None, NT, NC, N):
    NT = chunks per sequence without packing, NC = chunks in all."""
    if cu_seqlens is None:
        NT = triton.cdiv(T, BT)
        return None, None, None, NT, B * NT, B
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    nts = [triton.cdiv(n, BT) for n in lens]
    offsets = [0]
    for n in nts:
        offsets.append(offsets[-1] + n)
    idx = [(n, t) for n, c in enumerate(nts) for t in range(c)]
    chunk_indices = torch.tensor(idx if idx else [(0, 0)], dtype=torch.int32, device=device)
    chunk_offsets = torch.tensor(offsets, dtype=torch.int32, device=device)
    return cu_seqlens.to(device=device, dtype=torch.int32), chunk_indices, chunk_offsets, 0, offsets[-1], len(lens)


def _block_k(K: int) -> int:
    if K > 256:
        raise ValueError(f"gated delta (triton): key head dim K={K} > 256 is not supported")
    return max(16, triton.next_power_of_2(K))


def _fwd(q, k, v, g, beta, scale, h0, output_final_state, layout):
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    cu, chunk_indices, chunk_offsets, NT, NC, N = layout
    varlen = cu is not None
    BK = _block_k(K)
    dt = k.dtype
    f32 = torch.float32
    G = torch.empty(B, T, HV, dtype=f32, device=q.device)
    Ai = torch.empty(B, T, HV, BT, dtype=dt, device=q.device)
    w = torch.empty(B, T, HV, K, dtype=dt, device=q.device)
    u = torch.empty(B, T, HV, V, dtype=dt, device=q.device)
    bv_interp = {"BV": max(16, min(64, triton.next_power_of_2(V)))}
    if NC > 0:
        _launch(_wy_inverse_tuned, _wy_inverse_kernel, lambda meta: (NC, HV),
                (k, g, beta, G, Ai, cu, chunk_indices, T, NT), dict(H=H, HV=HV, K=K, IS_VARLEN=varlen),
                {"BKS": min(32, BK)})
        _launch(_wy_apply_tuned, _wy_apply_kernel, lambda meta: (NC, HV),
                (k, v, beta, G, Ai, w, u, cu, chunk_indices, T, NT),
                dict(H=H, HV=HV, K=K, V=V, BK=BK, IS_VARLEN=varlen), bv_interp)
    h = torch.empty(max(NC, 1), HV, K, V, dtype=dt, device=q.device)
    v_new = torch.empty(B, T, HV, V, dtype=dt, device=q.device)
    ht = torch.empty(N, HV, K, V, dtype=f32, device=q.device) if output_final_state else None
    args = (k, w, u, G, h, v_new, h0, ht, cu, chunk_offsets, T, NT, N * HV)
    kw = dict(H=H, HV=HV, K=K, V=V, BK=BK, USE_H0=h0 is not None, STORE_HT=output_final_state, IS_VARLEN=varlen)
    _launch(_state_fwd_tuned, _state_fwd_kernel, lambda meta: (triton.cdiv(V, meta["BV"]), N * HV), args, kw,
            bv_interp)
    o = torch.empty_like(v)
    if NC > 0:
        _launch(_output_fwd_tuned, _output_fwd_kernel, lambda meta: (NC, HV, triton.cdiv(V, meta["BV"])),
                (q, k, v_new, G, h, o, cu, chunk_indices, scale, T, NT),
                dict(H=H, HV=HV, K=K, V=V, BK=BK, IS_VARLEN=varlen), bv_interp)
    return o, ht, (G, Ai, w, h, v_new)


def _bwd(q, k, v, beta, scale, saved, want_dh0: bool, do, dht, layout):
    G, Ai, w, h, v_new = saved
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    cu, chunk_indices, chunk_offsets, NT, NC, N = layout
    varlen = cu is not None
    BK = _block_k(K)
    dt = k.dtype
    f32 = torch.float32
    do = do.contiguous()
    dvl = torch.empty(B, T, HV, V, dtype=dt, device=q.device)
    bv_interp = {"BV": max(16, min(64, triton.next_power_of_2(V)))}
    if NC > 0:
        _launch(_dv_local_tuned, _dv_local_kernel, lambda meta: (NC, HV, triton.cdiv(V, meta["BV"])),
                (q, k, G, do, dvl, cu, chunk_indices, scale, T, NT),
                dict(H=H, HV=HV, K=K, V=V, BK=BK, IS_VARLEN=varlen), bv_interp)
    dh = torch.empty_like(h)
    dv_new = torch.empty(B, T, HV, V, dtype=dt, device=q.device)
    dh0 = torch.empty(N, HV, K, V, dtype=f32, device=q.device) if want_dh0 else None
    dht = dht.contiguous() if dht is not None else None
    args = (q, k, w, G, do, dvl, dh, dv_new, dht, dh0, cu, chunk_offsets, scale, T, NT, N * HV)
    kw = dict(H=H, HV=HV, K=K, V=V, BK=BK, USE_DHT=dht is not None, STORE_DH0=want_dh0, IS_VARLEN=varlen)
    _launch(_state_bwd_tuned, _state_bwd_kernel, lambda meta: (triton.cdiv(V, meta["BV"]), N * HV), args, kw,
            bv_interp)
    # dq, dk and dv leave in the input dtype (no conversion pass after the kernels: three at 64k took
    # 0.78 ms of a 9.5 ms forward + backward, reports/kernels.md run 6), except dq and dk of grouped
    # value heads, summed over each key head's value heads in fp32 first
    dqk_dt = f32 if HV != H else dt
    dq = torch.empty(B, T, HV, K, dtype=dqk_dt, device=q.device)
    dk = torch.empty(B, T, HV, K, dtype=f32, device=q.device)
    dk_out = dk if HV != H or dt == f32 else torch.empty(B, T, HV, K, dtype=dt, device=q.device)
    dw = torch.empty(B, T, HV, K, dtype=dt, device=q.device)
    dv = torch.empty(B, T, HV, V, dtype=dt, device=q.device)
    dbeta = torch.empty(B, T, HV, dtype=f32, device=q.device)
    dG = torch.empty(B, T, HV, dtype=f32, device=q.device)
    dT = torch.empty(B, T, HV, BT, dtype=f32, device=q.device)
    dg = torch.empty(B, T, HV, dtype=f32, device=q.device)
    if NC > 0:
        bv_interp = {"BV": max(16, min(32, triton.next_power_of_2(V)))}
        _launch(_chunk_bwd_wy_tuned, _chunk_bwd_wy_kernel, lambda meta: (NC, HV),
                (k, v, beta, Ai, h, dv_new, dw, dv, dbeta, dT, cu, chunk_indices, T, NT),
                dict(H=H, HV=HV, K=K, V=V, BK=BK, IS_VARLEN=varlen), bv_interp)
        _launch(_chunk_bwd_qk_tuned, _chunk_bwd_qk_kernel, lambda meta: (NC, HV),
                (q, k, G, h, dh, v_new, do, dq, dk, dG, cu, chunk_indices, scale, T, NT),
                dict(H=H, HV=HV, K=K, V=V, BK=BK, IS_VARLEN=varlen), bv_interp)
        _wy_bwd_kernel[(NC, HV)](k, G, beta, Ai, dw, dT, dk, dk_out, dbeta, dG, dg, cu, chunk_indices, T, NT,
                                 H=H, HV=HV, K=K, BKS=min(BK, WY_BWD_BKS), IS_VARLEN=varlen,
                                 num_warps=WY_BWD_WARPS)
    if HV != H:
        dq = dq.view(B, T, H, HV // H, K).sum(3)
        dk_out = dk.view(B, T, H, HV // H, K).sum(3)
    return dq, dk_out, dv, dg, dbeta, dh0


class ChunkGatedDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        h0 = initial_state.contiguous() if initial_state is not None else None
        # Packed input: chunk tables built once on the host (one device sync) and reused by the backward.
        layout = _chunk_layout(q.shape[0], q.shape[1], cu_seqlens, q.device)
        o, ht, saved = _fwd(q, k, v, g, beta, scale, h0, output_final_state, layout)
        ctx.save_for_backward(q, k, v, beta, *saved)
        ctx.scale = scale
        ctx.layout = layout
        ctx.has_h0 = h0 is not None
        ctx.dtypes = (g.dtype, beta.dtype, None if h0 is None else h0.dtype)
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, *saved = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)
        want_dh0 = ctx.has_h0 and ctx.needs_input_grad[6]
        dq, dk, dv, dg, dbeta, dh0 = _bwd(q, k, v, beta, ctx.scale, saved, want_dh0, do, dht, ctx.layout)
        g_dtype, beta_dtype, h0_dtype = ctx.dtypes
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g_dtype), dbeta.to(beta_dtype),
                None, None if dh0 is None else dh0.to(h0_dtype), None, None)


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           scale: float | None = None, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                           use_qk_l2norm: bool = False):
    """Chunked gated delta rule with Triton forward and backward.

    q, k: [B, T, H, K]; v: [B, T, HV, V]; g (log decay, <= 0), beta: [B, T, HV];
    initial_state: [N, HV, K, V] or None; cu_seqlens: [N + 1] int (B == 1) or None.
    Returns (o [B, T, HV, V] in v.dtype, final_state [N, HV, K, V] fp32 or None). Differentiable in
    q, k, v, g, beta and initial_state (a gradient on final_state is accepted).
    """
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"gated delta (triton): q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"gated delta (triton): unsupported dtype {q.dtype}")
    if use_qk_l2norm:
        q, k = l2norm(q.float()).to(q.dtype), l2norm(k.float()).to(k.dtype)
    scale = k.shape[-1] ** -0.5 if scale is None else float(scale)
    return ChunkGatedDeltaRule.apply(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def _decode_block_v(n_heads: int, V: int, device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    bv = max(16, min(32, triton.next_power_of_2(V)))
    # Enough programs to keep every SM streaming state (the step is a pure read + write of it).
    while bv > 16 and n_heads * triton.cdiv(V, bv) < 4 * sms:
        bv //= 2
    return bv


def fused_recurrent_gated_delta_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                     beta: torch.Tensor, state: torch.Tensor, scale: float | None = None,
                                     use_qk_l2norm: bool = False) -> torch.Tensor:
    """One decode step; updates `state` IN PLACE and returns o.

    q, k: [B, H, K]; v: [B, HV, V]; g, beta: [B, HV]; state: [B, HV, K, V] fp32 contiguous.
    Returns o: [B, HV, V] in v.dtype. Not differentiable (inference only).
    """
    B, H, HV, K, V = check_step_inputs(q, k, v, g, beta, state)
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("gated delta step (triton): state must be a contiguous fp32 tensor (updated in place)")
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    scale = K ** -0.5 if scale is None else float(scale)
    o = torch.empty_like(v)
    BK = _block_k(K)
    bv = _decode_block_v(B * HV, V, v.device)
    _decode_step_kernel[(triton.cdiv(V, bv), B * HV)](q, k, v, g, beta, state, o, scale,
                                                      H=H, HV=HV, K=K, V=V, BK=BK, BV=bv, L2NORM=use_qk_l2norm,
                                                      num_warps=4)
    return o
