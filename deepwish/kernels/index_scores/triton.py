"""Lightning-indexer scores as one Triton kernel: I[t,s] = Σ_h w_h · relu(scale · q_h·k_s).

Shapes as reference.py: q [B, C, Hi, Di], w [B, C, Hi] fp32, k [B, S, Di] -> I [B, C, S] fp32.

One program computes a [BLOCK_T, BLOCK_S] tile of I: the BLOCK_T queries' Hi heads are the M
rows of one dot with the keys' tile (M = BLOCK_T · Hi, padded to a power of two), relu and the
head weights are applied in registers and the heads summed by a reshape, so nothing of size
Hi · S is ever written (the reference writes and rereads a [C, Hi, S] fp32 buffer). The dot takes
the inputs' dtype (bf16 on the GPU) with fp32 accumulation, fp32 inputs in IEEE precision: the
scores then differ from the reference's by rounding only (exact ties, the zeros, stay exact).
`index_keys` is the same kernel ending in the selection key of model/dsa_rows.py's top-k
(visibility from positions and documents, the order-preserving int64 key) instead of the score:
the row-block top-k then runs torch.topk on it directly, with no [C, S] scores, mask or key passes
in torch. Forward only: the selection is not differentiated, and the indexer loss (model/dsa_rows.py)
differentiates the reference on its blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _index_scores_kernel(q_ptr, w_ptr, k_ptr, o_ptr, T, S, scale,
                         sq_b, sq_t, sq_h, sw_b, sw_t, sk_b, sk_s, so_b, so_t,
                         qpos_ptr, kpos_ptr, qdoc_ptr, kdoc_ptr, sqp_b, skp_b, sqd_b, skd_b,
                         H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                         KEYS: tl.constexpr, HAS_DOC: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # B·C·Hi·Di passes 2^31 at long contexts
    r = tl.arange(0, BLOCK_T * BLOCK_H)  # row = (query, head), query-major
    t = pid_t * BLOCK_T + r // BLOCK_H
    h = r % BLOCK_H
    row_ok = (t < T) & (h < H)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < S
    acc = tl.zeros((BLOCK_T * BLOCK_H, BLOCK_S), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        qd = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + h[:, None] * sq_h + d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        kd = tl.load(k_ptr + b * sk_b + s[None, :] * sk_s + d[:, None],
                     mask=s_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_S]
        if IEEE:
            acc += tl.dot(qd, kd, input_precision="ieee")
        else:
            acc += tl.dot(qd, kd)
    wv = tl.load(w_ptr + b * sw_b + t * sw_t + h, mask=row_ok, other=0.0)
    acc = tl.maximum(acc * scale, 0.0) * wv[:, None]
    out = tl.sum(tl.reshape(acc, (BLOCK_T, BLOCK_H, BLOCK_S)), axis=1)
    to = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    st_ok = (to[:, None] < T) & s_ok[None, :]
    if KEYS:
        # the selection key of model/dsa_rows.topk_latest_indices: invisible keys score -inf, -0.0
        # becomes +0.0, the fp32 bits are mapped to an int32 of the same order, times 2^32, plus the slot
        qp = tl.load(qpos_ptr + b * sqp_b + to, mask=to < T, other=0)
        kp = tl.load(kpos_ptr + b * skp_b + s, mask=s_ok, other=0)
        vis = kp[None, :] <= qp[:, None]
        if HAS_DOC:
            qd = tl.load(qdoc_ptr + b * sqd_b + to, mask=to < T, other=0)
            kd = tl.load(kdoc_ptr + b * skd_b + s, mask=s_ok, other=0)
            vis = vis & (kd[None, :] == qd[:, None])
        out = tl.where(vis, out, float("-inf"))
        out = tl.where(out == 0.0, 0.0, out)
        bits = out.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = ordered.to(tl.int64) * 4294967296 + s.to(tl.int64)[None, :]
        tl.store(o_ptr + b * so_b + to[:, None] * so_t + s[None, :], key, mask=st_ok)
    else:
        tl.store(o_ptr + b * so_b + to[:, None] * so_t + s[None, :], out, mask=st_ok)


def _launch(q, w, k, scale, out, keys, q_pos=None, k_pos=None, q_doc=None, k_doc=None):
    B, C, H, D = q.shape
    S = k.shape[1]
    if w.shape != (B, C, H) or k.shape[0] != B or k.shape[2] != D:
        raise ValueError(f"index_scores: q {tuple(q.shape)}, w {tuple(w.shape)}, k {tuple(k.shape)} do not match "
                         "[B,C,Hi,Di], [B,C,Hi], [B,S,Di]")
    # row blocks are views (q[:, t0:t1], k[:, :n]): kept as they are when the channels are dense
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k.to(q.dtype)
    k = k if k.stride(-1) == 1 else k.contiguous()
    w = w.float()
    w = w if w.stride(-1) == 1 else w.contiguous()
    BLOCK_H = max(triton.next_power_of_2(H), 1)
    BLOCK_T = max(1, 128 // BLOCK_H) if C > 1 else 1  # 128 (query, head) rows per dot when there are queries to fill it
    BLOCK_T = max(1, min(BLOCK_T, triton.next_power_of_2(C)))
    while BLOCK_T * BLOCK_H < 16:  # tl.dot needs M >= 16
        BLOCK_T *= 2
    BLOCK_S = 64
    BLOCK_D = max(16, min(64, triton.next_power_of_2(D)))
    grid = (triton.cdiv(S, BLOCK_S), triton.cdiv(C, BLOCK_T), B)
    has_doc = q_doc is not None
    if keys:
        q_pos, k_pos = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_pos, k_pos))
        if has_doc:
            q_doc, k_doc = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_doc, k_doc))
    pos_args = (q_pos, k_pos, q_doc, k_doc) if has_doc else ((q_pos, k_pos, q_pos, k_pos) if keys else (out,) * 4)
    strides = tuple(x.stride(0) if x.dim() > 1 else 0 for x in pos_args) if keys else (0, 0, 0, 0)
    _index_scores_kernel[grid](q, w, k, out, C, S, float(scale),
                               q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1),
                               k.stride(0), k.stride(1), out.stride(0), out.stride(1), *pos_args, *strides,
                               H=H, D=D, BLOCK_H=BLOCK_H, BLOCK_T=BLOCK_T, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D,
                               IEEE=q.dtype == torch.float32, KEYS=keys, HAS_DOC=has_doc)
    return out


def index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """I [B, C, S] fp32 (module docstring). k is cast to q's dtype (cast once, outside a loop of
    row blocks, as topk_indices does)."""
    out = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float32, device=q.device)
    return _launch(q, w, k, scale, out, False)


def index_keys(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, scale: float, q_pos: torch.Tensor,
               k_pos: torch.Tensor, q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """The selection keys of model/dsa_rows.topk_latest_indices straight from the scores, [B, C, S]
    int64: (the score mapped to an int32 of the same order) · 2^32 + slot, the score -inf where the
    key is not visible (k_pos <= q_pos, and the same document when q_doc/k_doc are given:
    q_pos [B, C], k_pos [B, S], docs alike). One write of 8 bytes per pair instead of the scores,
    a mask and the torch passes that build the key from them."""
    if (q_doc is None) != (k_doc is None):
        raise ValueError("index_keys: give both q_doc and k_doc, or neither")
    out = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=torch.int64, device=q.device)
    return _launch(q, w, k, scale, out, True, q_pos, k_pos, q_doc, k_doc)
