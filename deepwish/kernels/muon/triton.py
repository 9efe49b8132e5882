"""Muon's step in Triton: the same ops as `reference.py` (read it first), fused.

Where the time goes (Qwen3-0.6B: 168 matrices, 440M elements, all with min(rows, cols) = 1024):
- Newton–Schulz, per iteration: A = X Xᵀ (2·m²·n FLOPs), A² (2·m³), B X (2·m²·n). A and A² = A Aᵀ
  are symmetric, so `gram` computes only the tiles on and above the diagonal (T(T+1)/2 of T² tiles,
  T = m / 128 = 8: 56%) and writes each off-diagonal tile twice (itself and its transpose). For
  Qwen3-0.6B that is 10.8 -> 8.1 TFLOP per step (-25%).
- torch's baddbmm(C, A, B, beta=β) first copies C into the result, then runs the matmul with β:
  4 bytes per element of X (and of A) per iteration, 12 GB per step here (~3 ms at the H200's
  copy bandwidth). The epilogues below read C once.
- The Frobenius normalisation X0 = U / ||U|| is folded into the first iteration (A0 = s² U Uᵀ,
  X1 = s (a U + B0 U), s = 1 / (||U||·f + eps), per matrix, read from a [N] fp32 tensor): no pass
  over U. (In fp32 accumulation U Uᵀ overflows only for ||U||_F > 1.8e19.)
- Around it, torch ran momentum (2 foreach passes, 20 B/element), the bf16 stack (10 B), the
  norm (2 B), the normalisation (4 B), weight decay (8 B) and the update (10 B): 54 B/element
  (24 GB per step here). `momentum_stack` does momentum + Nesterov + the stack + the per-block
  sums of squares of the rounded update in one pass (14 B); the last iteration's epilogue does
  weight decay + the step (read and write p, 8 B, the last X never stored; with NorMuon the
  separate `apply_update`, 10 B): 22 B/element (10 GB). The passes take their per-matrix tensors
  through a table of addresses (int64), one launch per shape bucket.
Accumulation is fp32; matmul operands are the compute dtype (bf16 on CUDA; fp32 under the
interpreter, where the dots are exact).

The matmul tiles are autotuned once per shape (a few configs; no GPU timing chose a single one);
under TRITON_INTERPRET=1 a fixed small config is used (`INTERPRETER_META`).
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---- symmetric Gram product --------------------------------------------------------------------------
@triton.jit
def _tile_product(a_ptrs, b_ptrs, a_step, b_step, m_ok, n_ok, rk, K, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, IEEE: tl.constexpr):
    """Σ_k A[m, k]·B[k, n] over K in BLOCK_K steps for one [BLOCK_M, BLOCK_N] tile (fp32): a_ptrs /
    b_ptrs address the first [BLOCK_M, BLOCK_K] / [BLOCK_K, BLOCK_N] tiles and advance by a_step /
    b_step elements per step; EVEN (K a multiple of BLOCK_K and full tiles) drops the masks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN:
            at = tl.load(a_ptrs)
            bt = tl.load(b_ptrs)
        else:
            k_ok = rk < K - k * BLOCK_K
            at = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            bt = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(at, bt, acc, input_precision="ieee")
        else:
            acc = tl.dot(at, bt, acc)
        a_ptrs += a_step
        b_ptrs += b_step
    return acc


@triton.jit
def _gram_kernel(p_ptr, o_ptr, y_ptr, c_ptr, scale_ptr, M, K,
                 s_pb, s_pm, s_pk, s_ob, s_om, s_ok, s_yb, s_ym, s_yn, s_cb, s_cm, s_cn, alpha, beta,
                 HAS_Y: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, EVEN: tl.constexpr,
                 OTHER: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """C_b = alpha·scale_b·P_b O_bᵀ + beta·Y_b for the tile (ti, tj), ti <= tj, of program 0's index;
    the tile is stored at (ti, tj) and, off the diagonal, transposed at (tj, ti). O is P itself (a
    Gram product) or (OTHER) a second operand whose product with P the caller knows to be symmetric;
    Y must be symmetric."""
    T = tl.cdiv(M, BLOCK)
    # Upper-triangle tiles, counted from the last row: row T-1-r holds r+1 tiles, rows below
    # it hold r(r+1)/2. q < T(T+1)/2 <= ~10^4, so the fp32 sqrt is exact enough for the floor;
    # the two corrections make it exact regardless.
    q = T * (T + 1) // 2 - 1 - tl.program_id(0)
    r = ((tl.sqrt((8 * q + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    r = tl.where((r + 1) * (r + 2) // 2 <= q, r + 1, r)
    r = tl.where(r * (r + 1) // 2 > q, r - 1, r)
    ti = T - 1 - r
    tj = T - 1 - (q - r * (r + 1) // 2)
    b = tl.program_id(1).to(tl.int64)
    rm = ti * BLOCK + tl.arange(0, BLOCK)
    rn = tj * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = p_ptr + b * s_pb + rm[:, None] * s_pm + rk[None, :] * s_pk   # P[rm, k]   [BLOCK, BLOCK_K]
    bt_ptrs = o_ptr + b * s_ob + rn[None, :] * s_om + rk[:, None] * s_ok  # O[rn, k]ᵀ  [BLOCK_K, BLOCK]
    m_ok = rm < M
    n_ok = rn < M
    acc = _tile_product(a_ptrs, bt_ptrs, BLOCK_K * s_pk, BLOCK_K * s_ok, m_ok, n_ok, rk, K, BLOCK, BLOCK, BLOCK_K,
                        EVEN, IEEE)
    if OTHER:
        if ti == tj:
            # P Pᵀ sums the same products in the same order for (i, j) and (j, i): exactly symmetric.
            # P Oᵀ does not, and a diagonal tile computed whole keeps that rounding asymmetry, which
            # the Gram recurrence compounds (reference.gram): its lower triangle mirrors the upper.
            acc = tl.where(rm[:, None] <= rn[None, :], acc, tl.trans(acc))
    acc = acc * alpha
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + b)
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_Y:
        y = tl.load(y_ptr + b * s_yb + rm[:, None] * s_ym + rn[None, :] * s_yn, mask=mask, other=0.0)
        acc += beta * y.to(tl.float32)
    out = acc.to(c_ptr.dtype.element_ty)
    c_b = c_ptr + b * s_cb
    tl.store(c_b + rm[:, None] * s_cm + rn[None, :] * s_cn, out, mask=mask)
    if ti != tj:
        tl.store(c_b + rn[None, :] * s_cm + rm[:, None] * s_cn, out, mask=mask)


# ---- the update a·Y + L R ----------------------------------------------------------------------------
@triton.jit
def _apply_columns(p_ptr, rm, m_ok, cols, N, x, decay, alpha):
    """p <- decay·p + alpha·x on the rows rm and columns cols of the contiguous [M, N] matrix at p_ptr."""
    ok = m_ok[:, None] & (cols < N)[None, :]
    p_ptrs = p_ptr + rm[:, None] * N + cols[None, :]
    p = tl.load(p_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(p_ptrs, decay * p + alpha * x, mask=ok)


@triton.jit
def _update_kernel(l_ptr, r_ptr, y_ptr, c_ptr, scale_ptr, p_table, p_first, M, N, K,
                   s_lb, s_lm, s_lk, s_rb, s_rk, s_rn, s_yb, s_ym, s_yn, s_cb, s_cm, s_cn, a, decay, alpha,
                   HAS_SCALE: tl.constexpr, APPLY: tl.constexpr, ALIGNED: tl.constexpr, IEEE: tl.constexpr,
                   EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    """C_b = scale_b·(a·Y_b + L_b R_b); program 0 walks the output tiles in groups of GROUP_M tile
    rows (the L and R tiles of a group stay in L2), program 1 is the matrix. APPLY: instead of
    storing C, update the contiguous [M, N] matrix at p_table[b]: p <- decay·p + alpha·C (the last
    iteration and the parameter update in one pass; C is never rounded to the compute dtype)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pm = first_m + (pid % per_group) % size_m
    pn = (pid % per_group) // size_m
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    l_ptrs = l_ptr + b * s_lb + rm[:, None] * s_lm + rk[None, :] * s_lk
    r_ptrs = r_ptr + b * s_rb + rk[:, None] * s_rk + rn[None, :] * s_rn
    m_ok = rm < M
    n_ok = rn < N
    acc = _tile_product(l_ptrs, r_ptrs, BLOCK_K * s_lk, BLOCK_K * s_rk, m_ok, n_ok, rk, K, BLOCK_M, BLOCK_N, BLOCK_K,
                        EVEN, IEEE)
    mask = m_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptr + b * s_yb + rm[:, None] * s_ym + rn[None, :] * s_yn, mask=mask, other=0.0)
    acc += a * y.to(tl.float32)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + b)
    if APPLY:
        p_ptr = tl.load(p_table + b).to(p_first.dtype)
        if ALIGNED:
            p_ptr = tl.multiple_of(p_ptr, 16)
        # two column halves, one after the other: the whole tile of parameters (fp32) beside the
        # fp32 accumulator would not fit in registers on the wide tiles
        lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        first = pn * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        _apply_columns(p_ptr, rm, m_ok, first, N, lo, decay, alpha)
        _apply_columns(p_ptr, rm, m_ok, first + BLOCK_N // 2, N, hi, decay, alpha)
    else:
        tl.store(c_ptr + b * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ---- elementwise passes over a list of same-shape tensors ------------------------------------------
@triton.jit
def _momentum_stack_kernel(g_table, m_table, g_first, m_first, u_ptr, part_ptr, scale_ptr, numel, mu,
                           NESTEROV: tl.constexpr, SCALED: tl.constexpr, ALIGNED: tl.constexpr,
                           BLOCK: tl.constexpr):
    """m <- mu m + g in place; u = g + mu m (or m) rounded into the stack U[j]; the sum of squares
    of the rounded block into part[j, block]. The tables hold each matrix's address (ALIGNED:
    every address is a multiple of 16 bytes, which lets the loads be vectorised). SCALED: g is
    divided by the scalar at scale_ptr as it is read (gradient clipping's 1 / coefficient)."""
    blk = tl.program_id(0)
    j = tl.program_id(1)
    g_ptr = tl.load(g_table + j).to(g_first.dtype)
    m_ptr = tl.load(m_table + j).to(m_first.dtype)
    if ALIGNED:
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if SCALED:
        g = g / tl.load(scale_ptr).to(tl.float32)
    m = mu * tl.load(m_ptr + offs, mask=ok, other=0.0).to(tl.float32) + g
    tl.store(m_ptr + offs, m, mask=ok)
    if NESTEROV:
        u = g + mu * m
    else:
        u = m
    u = u.to(u_ptr.dtype.element_ty)
    tl.store(u_ptr + j.to(tl.int64) * numel + offs, u, mask=ok)
    uf = u.to(tl.float32)
    tl.store(part_ptr + j * tl.num_programs(0) + blk, tl.sum(uf * uf, axis=0))


@triton.jit
def _apply_kernel(p_table, p_first, o_ptr, numel, decay, alpha, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """p_j <- decay·p_j + alpha·O[j] in place."""
    blk = tl.program_id(0)
    j = tl.program_id(1)
    p_ptr = tl.load(p_table + j).to(p_first.dtype)
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + j.to(tl.int64) * numel + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(p_ptr + offs, decay * p + alpha * o, mask=ok)


# ---- launch ------------------------------------------------------------------------------------------
# Tiles, with what ptxas says of them (sm_90, triton 3.7, contiguous operands; registers a thread,
# shared memory a program: <= 113 KB lets two programs share an SM, which overlaps one's epilogue
# with the other's main loop):
#   gram 128 x 128, K 64:  w4 s4 190-244 regs, 128 KB; w4 s3 98 KB; w8 s3 114-134 regs, 98 KB (134
#                          with Y: 2 x 256 x 134 > 64k registers, one program an SM); w8 s4 128 KB;
#                          K 128 w8 s2 154 regs, 128 KB (half the loop's iterations)
#   update 128 x 128 w4 s4 251 regs; 128 x 256 / 256 x 128 w8 s3 245-254; 128 x 128 w8 s3/s4 126.
#   With APPLY (the parameter update in the epilogue) the whole fp32 parameter tile beside the fp32
#   accumulator spilled 660-760 bytes a thread on every w4 and 128 x 256 tile; in two column halves
#   72-76 bytes (128 x 128 w8: 212 -> 170 registers, no spills).
_GRAM_CONFIGS = ([triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=w, num_stages=s)
                  for w, s in ((4, 4), (4, 3), (8, 3), (8, 4))]
                 + [triton.Config({"BLOCK": 128, "BLOCK_K": 128}, num_warps=8, num_stages=2)])
_UPDATE_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=w, num_stages=s)
                   for bm, bn, w, s in ((128, 128, 4, 4), (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 8, 3),
                                        (128, 128, 8, 4))]
# The interpreter runs numpy per tile (~25 ms a program): few, small tiles keep tests fast; tests pass
# 16-wide tiles (`meta`) where they need several tiles per matrix (mirroring, edges).
INTERPRETER_META = {"gram": dict(BLOCK=32, BLOCK_K=32), "update": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)}
ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS = 2048, 8

_gram_even = triton.heuristics({"EVEN": lambda a: a["M"] % a["BLOCK"] == 0 and a["K"] % a["BLOCK_K"] == 0})(_gram_kernel)
_update_even = triton.heuristics({"EVEN": lambda a: a["M"] % a["BLOCK_M"] == 0 and a["N"] % a["BLOCK_N"] == 0
                                  and a["K"] % a["BLOCK_K"] == 0})(_update_kernel)
# Autotuned kernels write only their output (never an input), so trial launches are safe. The
# strides that may be 1 are in the keys: a transposed operand is a different compiled kernel.
_gram_tuned = triton.autotune(configs=_GRAM_CONFIGS, key=["M", "K", "s_pm", "s_pk", "s_om", "s_ok"])(_gram_even)
_update_tuned = triton.autotune(configs=_UPDATE_CONFIGS, key=["M", "N", "K", "s_lm", "s_lk", "s_rk", "s_rn"])(_update_even)


def _launch(tuned, raw, grid, args: dict, kind: str, meta: dict | None):
    """Autotuned on a GPU; under the interpreter (or with `meta`, a test's tile choice) one fixed config."""
    if meta is None and not _interpreting():
        tuned[grid](**args)
    else:
        raw[grid](**args, **(meta or INTERPRETER_META[kind]))


def _check_stack(name: str, t: torch.Tensor, ndim: int = 3) -> None:
    if t.ndim != ndim:
        raise ValueError(f"muon kernels: {name} must have {ndim} dims, got shape {tuple(t.shape)}")


def gram(P: torch.Tensor, alpha: float = 1.0, beta: float = 0.0, Y: torch.Tensor | None = None,
         scale: torch.Tensor | None = None, out: torch.Tensor | None = None, meta: dict | None = None,
         other: torch.Tensor | None = None) -> torch.Tensor:
    """alpha·scale_i·P_i P_iᵀ + beta·Y_i (reference.gram) for P [N, M, K] of any strides; Y [N, M, M]
    symmetric; scale [N] fp32. `out` [N, M, M] (P's dtype by default) must not alias P or Y.
    other [N, M, K]: P_i otherᵀ_i instead of P_i P_iᵀ, for products the caller knows are symmetric
    (e.g. of two commuting symmetric matrices: P other = P otherᵀ), still on the upper tiles only."""
    _check_stack("P", P)
    Nb, M, K = P.shape
    O = P if other is None else other
    if O.shape != P.shape or O.dtype != P.dtype:
        raise ValueError(f"gram: other of shape {tuple(O.shape)}, {O.dtype} for P of shape {tuple(P.shape)}, {P.dtype}")
    if out is None:
        out = torch.empty(Nb, M, M, device=P.device, dtype=P.dtype)
    if Y is not None and Y.shape != (Nb, M, M):
        raise ValueError(f"gram: Y of shape {tuple(Y.shape)} for P of shape {tuple(P.shape)}")
    y = Y if Y is not None else out
    sc = scale if scale is not None else _dummy(P.device, torch.float32)  # one dtype: one autotuning key
    args = dict(p_ptr=P, o_ptr=O, y_ptr=y, c_ptr=out, scale_ptr=sc, M=M, K=K,
                s_pb=P.stride(0), s_pm=P.stride(1), s_pk=P.stride(2),
                s_ob=O.stride(0), s_om=O.stride(1), s_ok=O.stride(2),
                s_yb=y.stride(0), s_ym=y.stride(1), s_yn=y.stride(2),
                s_cb=out.stride(0), s_cm=out.stride(1), s_cn=out.stride(2), alpha=float(alpha), beta=float(beta),
                HAS_Y=Y is not None, HAS_SCALE=scale is not None, IEEE=P.dtype == torch.float32,
                OTHER=other is not None)

    def grid(meta_):
        t = triton.cdiv(M, meta_["BLOCK"])
        return (t * (t + 1) // 2, Nb)
    _launch(_gram_tuned, _gram_even, grid, args, "gram", meta)
    return out


def _dummy(device, dtype) -> torch.Tensor:
    """A one-element tensor for a pointer argument the launch does not read."""
    key = (device, dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, device=device, dtype=dtype)
    return _DUMMIES[key]


_DUMMIES: dict = {}


def _config_kwargs(config) -> dict:
    """A triton.Config as launch keywords (meta-parameters, warps, stages)."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def ns_update(L: torch.Tensor, R: torch.Tensor, Y: torch.Tensor, a: float, scale: torch.Tensor | None = None,
              out: torch.Tensor | None = None, meta: dict | None = None, apply=None) -> torch.Tensor | None:
    """scale_i·(a·Y_i + L_i R_i) (reference.ns_update), any strides; `out` must not alias an input.
    apply: (params, decay, alpha, tables): same-shape contiguous tensors holding the N matrices
    (AddressTables order) of Y's matrix shape; instead of returning the result, p_i <- decay·p_i +
    alpha·result_i (reference.apply_update, the result unrounded). On a GPU that launch takes the
    config autotuned by the previous call (of the same shape: newton_schulz's previous iteration)
    instead of tuning: autotuning runs the kernel several times, which an in-place update must not be."""
    for name, t in (("L", L), ("R", R), ("Y", Y)):
        _check_stack(name, t)
    Nb, M, K = L.shape
    N = R.shape[2]
    if R.shape[:2] != (Nb, K) or Y.shape != (Nb, M, N):
        raise ValueError(f"ns_update: shapes L {tuple(L.shape)}, R {tuple(R.shape)}, Y {tuple(Y.shape)} do not chain")
    if out is None and apply is None:
        out = torch.empty_like(Y)
    c = out if out is not None else Y  # under apply only its dtype and strides reach the kernel
    # Argument dtypes are part of the autotuning key: every call passes an fp32 scale tensor, an
    # int64 table and an fp32 first-parameter tensor, used or not, so all iterations share one tuning.
    sc = scale if scale is not None else _dummy(Y.device, torch.float32)
    if apply is None:
        table, aligned, first, decay, alpha = _dummy(Y.device, torch.int64), False, _dummy(Y.device, torch.float32), 1.0, 0.0
    else:
        params, decay, alpha, tables = apply
        if params[0].shape[-2:] != (M, N):
            raise ValueError(f"ns_update: parameters of shape {tuple(params[0].shape)} for results [{M}, {N}]")
        _check_list("parameter", params, params[0].shape, Y.device)
        table, aligned = tables(params)
        first = params[0]
        if table.numel() != Nb:
            raise ValueError(f"ns_update: {table.numel()} parameter matrices for {Nb} results")
    args = dict(l_ptr=L, r_ptr=R, y_ptr=Y, c_ptr=c, scale_ptr=sc, p_table=table, p_first=first, M=M, N=N, K=K,
                s_lb=L.stride(0), s_lm=L.stride(1), s_lk=L.stride(2), s_rb=R.stride(0), s_rk=R.stride(1), s_rn=R.stride(2),
                s_yb=Y.stride(0), s_ym=Y.stride(1), s_yn=Y.stride(2),
                s_cb=c.stride(0), s_cm=c.stride(1), s_cn=c.stride(2), a=float(a), decay=float(decay), alpha=float(alpha),
                HAS_SCALE=scale is not None, APPLY=apply is not None, ALIGNED=bool(aligned), IEEE=L.dtype == torch.float32)

    def grid(meta_):
        return (triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(N, meta_["BLOCK_N"]), Nb)
    if apply is not None and meta is None and not _interpreting():
        # the config of the last tuned launch (any config is correct for any shape; this one was
        # measured for this shape by the previous iteration), else the first
        meta = _config_kwargs(getattr(_update_tuned, "best_config", None) or _UPDATE_CONFIGS[0])
    _launch(_update_tuned, _update_even, grid, args, "update", meta)
    return out


# Which of Newton–Schulz's matmuls run as the kernels above, the rest as cuBLAS (torch) calls:
#   "all"   gram for A and A², ns_update for a X + B X (the epilogue reads X once; the normalisation
#           and, in Muon's step, the parameter update folded in);
#   "gram"  gram kernels, torch.baddbmm for the update (it copies X into its result first; an
#           explicit normalisation pass and a separate parameter-update pass);
#   "none"  train/muon.py's torch iteration (cuBLAS for all three), between the fused momentum and
#           update passes;
#   "gram_ns" the iteration carried on the Gram matrix (`gram_newton_schulz`: fp16, one restart),
#           gram kernels for the symmetric products, cuBLAS for the rest: fewer FLOPs for wide stacks.
#   "auto"  the fastest of these for each stack shape, timed once on the first stack of that
#           shape (`pick_ns_kernels`, one line printed); under the interpreter "all", untimed.
# Every update matmul has K = min(m, n), short for a Triton pipeline, and no GPU timing informed
# the kernels' tiles, hence "auto". `bench muon` times each fixed choice (variants muon-triton-all,
# muon-triton-gram, muon-fused-cublas, muon-gram-ns). The choice depends on timing, as autotuned tiles
# do: two runs may round differently (half-precision noise), never compute a different iteration.
NS_KERNEL_CHOICES = ("all", "gram", "none", "gram_ns")
NS_KERNELS = "auto"
_PICKED: dict[tuple, str] = {}


def pick_ns_kernels(G: torch.Tensor, coeffs, f: float, eps: float, dtype: torch.dtype, sumsq=None,
                    timer=None, repeats: int = 2) -> str:
    """The fastest NS_KERNEL_CHOICES entry for stacks of G's shape (cached per shape, dtype, device
    and coefficient count): each choice runs once untimed (compiles, autotunes), then `repeats`
    times timed; G is only read. timer: callable(fn) -> seconds (default: CUDA events)."""
    key = (tuple(G.shape), G.dtype, G.device, len(coeffs))
    if key in _PICKED:
        return _PICKED[key]
    if timer is None:
        def timer(fn):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
    times = {}
    for choice in NS_KERNEL_CHOICES:
        def run(choice=choice):
            newton_schulz(G, coeffs, f, eps, dtype, sumsq=sumsq, kernels=choice)
        run()
        times[choice] = min(timer(run) for _ in range(repeats))
    best = min(times, key=times.get)
    _PICKED[key] = best
    print(f"[deepwish] muon: Newton–Schulz on {list(G.shape)} {str(G.dtype).replace('torch.', '')}: "
          + ", ".join(f"{c} kernels {1e3 * t:.2f} ms" for c, t in times.items()) + f" -> {best}", file=sys.stderr)
    return best


def newton_schulz(G: torch.Tensor, coeffs, f: float, eps: float, dtype: torch.dtype,
                  sumsq: torch.Tensor | None = None, meta: dict | None = None, apply=None,
                  kernels: str | None = None) -> torch.Tensor | None:
    """train/muon.py's batched Newton–Schulz (same iteration, orientation and normalisation) with
    the kernels above. G [..., m, n]; matmul operands in `dtype`; sumsq: each matrix's sum of
    squares [N] fp32 when already known (momentum_stack), else computed from G.
    apply: (params, decay, alpha, tables) with two or more iterations: the parameters are updated
    in place (with kernels="all" by the last iteration's epilogue) and None is returned.
    kernels: which matmuls are kernels (NS_KERNEL_CHOICES or "auto"; None: NS_KERNELS).
    meta: {'gram': ..., 'update': ...} fixed tiles (tests)."""
    kernels = kernels or NS_KERNELS
    if kernels == "auto":
        kernels = "all" if _interpreting() or not G.is_cuda else pick_ns_kernels(G, coeffs, f, eps, dtype, sumsq)
    if kernels not in NS_KERNEL_CHOICES:
        raise ValueError(f"newton_schulz: unknown kernels {kernels!r}; choose from auto, {', '.join(NS_KERNEL_CHOICES)}")
    if apply is not None and len(coeffs) < 2:
        raise ValueError("newton_schulz: apply needs two or more iterations (the last one reuses the previous one's tiles)")
    if kernels == "none":
        from deepwish.kernels.muon.reference import newton_schulz as torch_newton_schulz
        return _apply_or_return(torch_newton_schulz(G, coeffs, f, eps, dtype), apply)
    if kernels == "gram_ns":
        # the update reads O in any dtype: it gets the iteration's fp16, not a bf16 copy of it
        from deepwish.kernels.muon.reference import gram_dtype
        out_dtype = None if apply is None else gram_dtype(dtype)
        return _apply_or_return(gram_newton_schulz(G, coeffs, f, eps, dtype, sumsq, meta, out_dtype), apply)
    m, n = G.shape[-2:]
    G3 = G.reshape(-1, m, n)
    if sumsq is None:
        norm = torch.linalg.vector_norm(G3, dim=(-2, -1), dtype=torch.promote_types(G.dtype, torch.float32))
    else:
        norm = sumsq.float().sqrt()
    inv = 1.0 / (norm.float() * f + eps)
    inv2 = inv * inv
    tall = m > n  # as train/muon.py: the Gram matrix is the smaller one; X keeps its layout
    d = min(m, n)
    gm, um = (meta or {}).get("gram"), (meta or {}).get("update")
    if kernels == "gram":
        X = torch.empty(G3.shape, device=G.device, dtype=dtype)
        torch.mul(G3, inv.view(-1, 1, 1), out=X)
        A = torch.empty(X.shape[0], d, d, device=X.device, dtype=dtype)
        B = torch.empty_like(A)
        for a, b, c in coeffs:
            gram(X.mT if tall else X, out=A, meta=gm)
            gram(A, alpha=c, beta=b, Y=A, out=B, meta=gm)
            X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)
        return _apply_or_return(X.reshape(G.shape).to(G.dtype), apply)
    X = G3.to(dtype)
    A = torch.empty(X.shape[0], d, d, device=X.device, dtype=dtype)
    B = torch.empty_like(A)
    writes = len(coeffs) - (apply is not None)  # iterations that store X (ping-pong buffers)
    spare = [torch.empty_like(X) if writes > i else None for i in range(2)]
    for k, (a, b, c) in enumerate(coeffs):
        first, last = k == 0, k == len(coeffs) - 1
        gram(X.mT if tall else X, scale=inv2 if first else None, out=A, meta=gm)
        gram(A, alpha=c, beta=b, Y=A, out=B, meta=gm)  # b A + c A² (A Aᵀ = A²: A is symmetric)
        fused = apply if last else None
        Xn = None if fused is not None else spare[k % 2]
        if tall:
            ns_update(X, B, X, a, scale=inv if first else None, out=Xn, meta=um, apply=fused)  # a X + X B
        else:
            ns_update(B, X, X, a, scale=inv if first else None, out=Xn, meta=um, apply=fused)  # a X + B X
        X = Xn
    return None if apply is not None else X.reshape(G.shape).to(G.dtype)


def gram_newton_schulz(G: torch.Tensor, coeffs, f: float, eps: float, dtype: torch.dtype,
                       sumsq: torch.Tensor | None = None, meta: dict | None = None,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """reference.gram_newton_schulz (read it: the iteration, its precision, its FLOPs) with every
    d x d product and X Xᵀ on the `gram` kernel's upper tiles; the d x D products Q X via cuBLAS."""
    from deepwish.kernels.muon import reference

    gm = (meta or {}).get("gram")

    def sym(P, alpha=1.0, beta=0.0, Y=None, other=None):
        return gram(P, alpha=alpha, beta=beta, Y=Y, other=other, meta=gm)
    return reference.gram_newton_schulz(G, coeffs, f, eps, dtype, sumsq, gram=sym, out_dtype=out_dtype)


def _apply_or_return(O: torch.Tensor, apply) -> torch.Tensor | None:
    """O, or (apply given) None after the parameter update p_i <- decay·p_i + alpha·O_i."""
    if apply is None:
        return O
    params, decay, alpha, tables = apply
    apply_update(params, O.reshape(len(params), *params[0].shape).contiguous(), decay, alpha, tables)
    return None


class AddressTables:
    """int64 device tensors of the addresses of every matrix of a list of same-shape contiguous
    tensors [..., m, n] (a stack of E experts contributes E addresses), kept per address tuple (the
    parameters' and buffers' addresses do not change between steps; gradients' usually do not either)."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self.tables: dict[tuple, torch.Tensor] = {}

    def __call__(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """(table, whether every address is a multiple of 16 bytes)."""
        per = tensors[0].shape[-2] * tensors[0].shape[-1] * tensors[0].element_size()
        count = tensors[0].numel() // max(1, tensors[0].shape[-2] * tensors[0].shape[-1])
        key = (tensors[0].device, per, count, *(t.data_ptr() for t in tensors))
        entry = self.tables.get(key)
        if entry is None:
            if len(self.tables) >= self.capacity:
                self.tables.clear()
            addresses = [t.data_ptr() + e * per for t in tensors for e in range(count)]
            host = torch.tensor(addresses, dtype=torch.int64)
            if tensors[0].is_cuda:  # pinned + non_blocking: the copy does not wait for the device
                host = host.pin_memory()
            entry = (host.to(tensors[0].device, non_blocking=True), all(a % 16 == 0 for a in addresses))
            self.tables[key] = entry
        return entry


def _check_list(name: str, ts: list[torch.Tensor], shape, device) -> None:
    for t in ts:
        if tuple(t.shape) != tuple(shape) or t.device != device or not t.is_contiguous() or t.dtype != ts[0].dtype:
            raise ValueError(f"muon kernels: every {name} must be contiguous, of shape {tuple(shape)}, dtype "
                             f"{ts[0].dtype} and on {device}; got shape {tuple(t.shape)}, dtype {t.dtype}, "
                             f"contiguous={t.is_contiguous()} on {t.device} (train.muon_backend=torch takes any layout)")


def momentum_stack(grads: list[torch.Tensor], bufs: list[torch.Tensor], mu: float, nesterov: bool,
                   dtype: torch.dtype, tables: AddressTables,
                   grad_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.momentum_stack in one pass over same-shape tensors [..., m, n]: returns (U [N, ...,
    m, n] in `dtype`, the sum of squares of each of its N·(...) matrices, flat, fp32). grad_scale: a
    0-d tensor on the gradients' device that each gradient is divided by as it is read."""
    shape, device = grads[0].shape, grads[0].device
    _check_list("gradient", grads, shape, device)
    _check_list("momentum buffer", bufs, shape, device)
    numel = shape[-2] * shape[-1]  # per matrix: the kernel's program 1 is one matrix (an expert of a stack)
    U = torch.empty((len(grads), *shape), device=device, dtype=dtype)
    matrices = U.numel() // max(1, numel)
    blocks = triton.cdiv(numel, ELEMENTWISE_BLOCK)
    part = torch.empty(matrices, blocks, device=device, dtype=torch.float32)
    (g_table, g_aligned), (m_table, m_aligned) = tables(grads), tables(bufs)
    if grad_scale is not None and (grad_scale.numel() != 1 or grad_scale.device != device):
        raise ValueError(f"momentum_stack: grad_scale must be one value on {device}, got shape "
                         f"{tuple(grad_scale.shape)} on {grad_scale.device}")
    scale = part if grad_scale is None else grad_scale.to(torch.float32)  # (unread when not SCALED)
    _momentum_stack_kernel[(blocks, matrices)](g_table, m_table, grads[0], bufs[0], U, part, scale, numel, float(mu),
                                               NESTEROV=bool(nesterov), SCALED=grad_scale is not None,
                                               ALIGNED=g_aligned and m_aligned,
                                               BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS)
    return U, part.sum(1)


def apply_update(params: list[torch.Tensor], O: torch.Tensor, decay: float, alpha: float, tables: AddressTables) -> None:
    """reference.apply_update in one pass (O contiguous [N, *shape])."""
    shape, device = params[0].shape, params[0].device
    _check_list("parameter", params, shape, device)
    if tuple(O.shape) != (len(params), *shape) or not O.is_contiguous() or O.device != device:
        raise ValueError(f"apply_update: updates of shape {tuple(O.shape)} (contiguous={O.is_contiguous()}) "
                         f"for {len(params)} parameters of shape {tuple(shape)}")
    numel = shape[-2] * shape[-1]
    blocks = triton.cdiv(numel, ELEMENTWISE_BLOCK)
    table, aligned = tables(params)
    _apply_kernel[(blocks, O.numel() // max(1, numel))](table, params[0], O, numel, float(decay), float(alpha),
                                                        ALIGNED=aligned, BLOCK=ELEMENTWISE_BLOCK,
                                                        num_warps=ELEMENTWISE_WARPS)
