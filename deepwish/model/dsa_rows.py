"""DSA's lightning indexer, top-k selection and indexer loss in row blocks: the fast path of
model/dsa.py, with no [B, T, S] score matrix and no [B, H, T, S] attention target in memory.

Shape legend: B batch, C query rows of one block, T query tokens, S key slots, Hi index heads,
Di index_head_dim, H attention heads, D = kv_lora_rank + qk_rope_head_dim (the latent row),
K index_topk.

The dense reference (model/dsa.py) scores every pair, picks the top-k as a boolean mask and
builds the KL target from a dense [B, H, T, S] pass. Here every step runs over a block of C
query rows against the keys that block can see, so the widest intermediate is one block
(`rows_per_block` sizes it from a budget of elements) and what persists is the selection,
indices [B, T, K] int32 (-1 = unused): B·T·K·4 bytes.

- `index_scores` (kernels/index_scores/reference.py) is the reference's arithmetic (same
  operations in the same order), so a row's scores are those of the dense pass and
  `topk_latest_indices` selects exactly the set of `select_topk_latest` (ties at the k-th score
  to the latest keys), as slot indices. On the triton backend one fused kernel
  (kernels/index_scores/triton.py `index_keys`) writes the selection keys themselves: no
  [C, Hi, S] buffer, no scores or mask in torch, rounding of the scores apart.
- `topk_indices` walks the row blocks. Without a cache the keys of block [t0, t1) are the
  slots [0, t1): a key after its query's slot is never visible (slots are positions within a
  document, documents are contiguous), so the causal square is skipped, not just masked.
- `dense_kl` / `sparse_kl` are `indexer_kl` over all visible keys (the dense warm-up) or over
  the selected ones (the sparse stage), the loss and its gradients in one pass over large
  blocks with no autograd graph (`_DenseKL`, `_SparseKL`; the loss is a scalar, so its backward
  only scales the gradients computed in the forward pass). This replaced per-block autograd
  graphs under activation checkpointing, which cost ~110 small launches per block of ~50 rows
  (forward, recompute, backward: CPU-bound), and whose slices of q each sent a full-size
  [B, T, Hi, Di] zero-filled gradient back (O(T²/C) bytes). sparse_kl gathers the selected rows
  (index keys and latent rows), O(C·K) per block, never O(C·S); on the triton backend it runs on
  kernels/indexer_kl instead (`_SparseKLKernels`), its target from the attention's own lse.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deepwish.kernels.index_scores.reference import index_scores
from deepwish.model.attention import attention_mask

NEG_INF_KEY = -0x7F800001  # fp32 -inf (bits 0xFF800000) in the order-preserving int32 map of topk_latest_indices
ROW_BUDGET = 1 << 25  # elements of a block's widest fp32 intermediate (128 MiB)
# the KL losses' blocks: several intermediates that wide live at once, but with no autograd graph
# and no recompute, fewer and larger blocks pay (the launches per block are fixed)
KL_ROW_BUDGET = 1 << 27


def rows_per_block(batch: int, width: int, budget: int = ROW_BUDGET) -> int:
    """Query rows per block so that batch · rows · width elements stay within the budget."""
    return max(1, budget // max(1, batch * width))


def topk_latest_indices(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """The set of `select_topk_latest(scores, visible, k)` as slots: scores [..., S] fp32,
    visible [..., S] bool -> [..., k] int32, -1 padded (rows with fewer than k visible keys).

    The rule "every key above the k-th score, then the latest of the keys equal to it" is the
    top-k of the pairs (score, slot) in lexicographic order, so one topk over an int64 key does
    it: the score's fp32 bits mapped to an int32 of the same order (negative floats have their
    magnitude bits flipped; -0.0 is made +0.0 first, as the two compare equal), times 2^32,
    plus the slot. Invisible keys score -inf and come back as -1."""
    S = scores.shape[-1]
    s = scores.masked_fill(~visible, float("-inf")) + 0.0  # + 0.0: -0.0 -> +0.0
    bits = s.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 order == float order
    slots = torch.arange(S, device=s.device, dtype=torch.int64)
    return top_of_keys(ordered.to(torch.int64).mul_(1 << 32).add_(slots), k)


def top_of_keys(key: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest selection keys (`topk_latest_indices`: ordered score · 2^32 + slot) [..., S]
    int64 as slots [..., k] int32, -1 for the -inf (invisible) ones and the padding past S."""
    kk = min(k, key.shape[-1])
    top, idx = key.topk(kk, dim=-1, sorted=False)
    unseen = top < ((NEG_INF_KEY + 1) << 32)  # the -inf entries: fewer than k visible
    out = torch.where(unseen, -1, idx.to(torch.int32))
    if kk < k:
        out = F.pad(out, (0, k - kk), value=-1)
    return out


def _keys_for(t1: int, causal_prefix: bool, S: int) -> int:
    return t1 if causal_prefix else S


@torch.compiler.disable  # a loop of row blocks: run eagerly inside a compiled block, not unrolled
def topk_indices(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, scale: float, topk: int,
                 q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: torch.Tensor | None = None,
                 k_doc: torch.Tensor | None = None, causal_prefix: bool = False,
                 budget: int = ROW_BUDGET, scorer: str = "torch") -> torch.Tensor:
    """The indexer's top-k visible keys of every query, in row blocks.
    q [B,T,Hi,Di], w [B,T,Hi] fp32, k [B,S,Di]; visibility: k_pos <= q_pos (and same document)
    with q_pos [B,T], k_pos [B,S], docs [B,T]/[B,S] or None. causal_prefix: the keys are the
    queries' own tokens (no cache), so block [t0, t1) scores only slots [0, t1). scorer: 'torch'
    (the reference's arithmetic: exactly its set) or 'triton' (kernels/index_scores: fused, no
    [C, Hi, S] buffer, so blocks of Hi times more rows; equal up to rounding at near-ties).
    -> indices [B,T,topk] int32 (-1 = unused). Not differentiable (a selection)."""
    B, T, Hi, _ = q.shape
    S = k.shape[1]
    if scorer == "triton":
        from deepwish.kernels.index_scores.triton import index_keys
        k = k.to(q.dtype)  # once, not per block
        width = 4 * S  # the [C, S] int64 keys, written once by the kernel, and what topk holds beside them
    elif scorer == "torch":
        width = Hi * S
    else:
        raise ValueError(f"topk_indices: scorer must be 'torch' or 'triton', got {scorer!r}")
    C = rows_per_block(B, width, budget)
    out = torch.empty(B, T, topk, dtype=torch.int32, device=q.device)
    with torch.no_grad():
        for t0 in range(0, T, C):
            t1 = min(T, t0 + C)
            n = _keys_for(t1, causal_prefix, S)
            qd, kd = (None, None) if q_doc is None else (q_doc[:, t0:t1], k_doc[:, :n])
            if scorer == "triton":  # the keys straight from the kernel: scores, mask and key in one pass
                keys = index_keys(q[:, t0:t1], w[:, t0:t1], k[:, :n], scale, q_pos[:, t0:t1], k_pos[:, :n], qd, kd)
                out[:, t0:t1] = top_of_keys(keys, topk)
            else:
                scores = index_scores(q[:, t0:t1], w[:, t0:t1], k[:, :n], scale)
                vis = attention_mask(q_pos[:, t0:t1], k_pos[:, :n], 0, qd, kd)
                out[:, t0:t1] = topk_latest_indices(scores, vis[:, 0], topk)
    return out


# ---- indexer loss ----------------------------------------------------------------------------
def _kl_rows(p: torch.Tensor, log_q: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Σ over rows of KL(p ‖ q) on the kept entries: p target, log_q log-probabilities, keep bool."""
    log_p = p.clamp_min(1e-30).log()
    return (p * (log_p - log_q.masked_fill(~keep, 0.0))).sum()


def _head_summed_target(s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """s [B,H,C,N] scaled scores, keep [B,C,N] -> head-summed attention, L1-normalised [B,C,N]."""
    p = s.masked_fill(~keep[:, None], float("-inf")).softmax(-1).sum(1)
    return p / p.sum(-1, keepdim=True)


def _dense_kl_block(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_abs: torch.Tensor, kv: torch.Tensor,
                    keep: torch.Tensor, index_scale: float, attn_scale: float, norm: float, want_grads: bool):
    """One block of C query rows against the n keys they can see, no autograd graph: q [B,C,Hi,Di]
    and k [B,n,Di] in the index dots' dtype, w [B,C,Hi] fp32, q_abs [B,C,H,D] and kv [B,n,D] in the
    target's dtype, keep [B,C,n]. -> (kl summed over the rows, and when want_grads the gradients
    of kl / norm: dq [B,C,Hi,Di], dw [B,C,Hi], dk [B,n,Di], fp32). The reference's operations in
    its order (the target's and index dots in the given dtypes, the rest fp32); the gradients are
    log_softmax's, relu's and the dots' own backward formulas."""
    # in the inputs' dtype, as the reference's attention_scores_absorbed: no fp32 copy of the rows
    s = torch.einsum("bchd,bsd->bhcs", q_abs, kv).float().mul_(attn_scale)
    p = _head_summed_target(s, keep)
    del s
    a = F.relu_(torch.matmul(q, k.transpose(-1, -2).unsqueeze(1)).float().mul_(index_scale))  # [B,C,Hi,n]
    i = torch.matmul(w.float().unsqueeze(-2), a).squeeze(-2)
    log_q = i.masked_fill_(~keep, float("-inf")).log_softmax(-1)
    kl = _kl_rows(p, log_q, keep)
    if not want_grads:
        return kl, None, None, None
    g_i = log_q.exp_().mul_(p.sum(-1, keepdim=True)).sub_(p).masked_fill_(~keep, 0.0).div_(norm)  # d kl / d I
    dw = torch.matmul(a, g_i.unsqueeze(-1)).squeeze(-1)
    g_z = (w.float()[..., None] * index_scale * g_i[:, :, None, :]).masked_fill_(a <= 0, 0.0).to(q.dtype)
    del a
    dq = torch.matmul(g_z, k.unsqueeze(1)).float()
    dk = torch.einsum("bchs,bchd->bsd", g_z, q).float()
    return kl, dq, dw, dk


class _DenseKL(torch.autograd.Function):
    """The dense warm-up's KL with its gradients computed in the same pass over the row blocks, as
    `_SparseKL`: no per-block autograd graph, nothing recomputed. Held between forward and
    backward: dq, dw, dk, the size of the indexer's q, w, k."""

    @staticmethod
    def forward(ctx, q, w, k, q_abs, kv, q_pos, k_pos, q_doc, k_doc, causal_prefix, index_scale, attn_scale, budget,
                dot_dtype, target_dtype):
        B, T, Hi, Di = q.shape
        H = q_abs.shape[2]
        S = k.shape[1]
        want = any(ctx.needs_input_grad[:3])
        C = rows_per_block(B, max(H, Hi) * S, budget)
        norm = float(B * T)
        dev = q.device
        kd = k.detach().to(dot_dtype)  # cast once, not per block
        kvd = kv.detach().to(target_dtype)
        total = torch.zeros((), dtype=torch.float32, device=dev)
        if want:
            dq = torch.empty(B, T, Hi, Di, dtype=q.dtype, device=dev)
            dw = torch.empty(B, T, Hi, dtype=w.dtype, device=dev)
            dk = torch.zeros(B, S, Di, dtype=torch.float32, device=dev)
        with torch.autocast(dev.type, enabled=False):
            for t0 in range(0, T, C):
                t1 = min(T, t0 + C)
                n = _keys_for(t1, causal_prefix, S)
                keep = attention_mask(q_pos[:, t0:t1], k_pos[:, :n], 0, None if q_doc is None else q_doc[:, t0:t1],
                                      None if k_doc is None else k_doc[:, :n])[:, 0]
                kl, dq_b, dw_b, dk_b = _dense_kl_block(q[:, t0:t1].to(dot_dtype), w[:, t0:t1], kd[:, :n],
                                                       q_abs[:, t0:t1].to(target_dtype), kvd[:, :n], keep,
                                                       index_scale, attn_scale, norm, want)
                total += kl
                if want:
                    dq[:, t0:t1] = dq_b
                    dw[:, t0:t1] = dw_b
                    dk[:, :n] += dk_b
        if want:
            ctx.save_for_backward(dq, dw, dk.to(k.dtype))
        return total / norm

    @staticmethod
    def backward(ctx, g):
        dq, dw, dk = ctx.saved_tensors
        return (dq * g, dw * g, dk * g) + (None,) * 12


@torch.compiler.disable
def dense_kl(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_abs: torch.Tensor, kv: torch.Tensor,
             index_scale: float, attn_scale: float, q_pos: torch.Tensor, k_pos: torch.Tensor,
             q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None,
             causal_prefix: bool = False, budget: int = KL_ROW_BUDGET) -> torch.Tensor:
    """The dense warm-up's indexer loss, `indexer_kl` over every visible key, in row blocks.
    q, w, k: the indexer's queries [B,T,Hi,Di], weights [B,T,Hi] and keys [B,S,Di] (gradient
    flows to them; computed in the same pass, `_DenseKL`); q_abs [B,T,H,D] the absorbed
    main-attention queries and kv [B,S,D] the latent rows, whose scores · attn_scale are the
    target's logits (no gradient). The dots take autocast's dtype when it is on (else the
    inputs' promoted dtype). -> mean over queries."""
    q_abs, kv = q_abs.detach(), kv.detach()
    return _DenseKL.apply(q, w, k, q_abs, kv, q_pos, k_pos, q_doc, k_doc, causal_prefix, index_scale, attn_scale,
                          budget, _dot_dtype(q, k), _dot_dtype(q_abs, kv))


def _sparse_kl_block(q: torch.Tensor, w: torch.Tensor, k_rows: torch.Tensor, q_abs: torch.Tensor,
                     kv_rows: torch.Tensor, indices: torch.Tensor, base: torch.Tensor, index_scale: float,
                     attn_scale: float, norm: float, want_grads: bool):
    """One block of C query rows, no autograd graph: the KL summed over the block's rows and,
    when want_grads, its gradients written out by hand.

    q [B,C,Hi,Di] and q_abs [B,C,H,D] already in their dots' dtypes, w [B,C,Hi] fp32,
    k_rows [B·S, Di] / kv_rows [B·S, D] the flattened keys and latent rows (dots' dtypes),
    indices [B,C,K] (-1 = unused), base [B] = b·S. Returns (kl fp32 scalar, dq [B,C,Hi,Di] fp32,
    dw [B,C,Hi] fp32, dk_sel [B·C·K, Di] fp32 (0 at unused slots), slots [B·C·K]) with the
    gradients of kl / norm; None for the gradients when not want_grads.

    The arithmetic is `indexer_kl`'s on the selected slots, in the reference's operation order:
    the target's scores and the index dots in the given dtypes (bf16 under autocast, as autograd
    would run them there), everything after in fp32; the gradients are log_softmax's, relu's and
    the dots' own backward formulas."""
    B, C, K = indices.shape
    H, D = q_abs.shape[2:]
    Hi, Di = q.shape[2:]
    BC = B * C
    keep = (indices >= 0).reshape(BC, K)
    slots = (indices.long().clamp_min(0) + base[:, None, None]).reshape(-1)  # -1 reads slot 0, masked
    # target: head-summed attention over the selected slots, L1-normalised (no gradient)
    rows = kv_rows.index_select(0, slots).view(BC, K, D)
    s = torch.bmm(q_abs.reshape(BC, H, D), rows.transpose(1, 2)).float().mul_(attn_scale)  # [BC,H,K]
    del rows
    p = s.masked_fill_(~keep[:, None], float("-inf")).softmax(-1).sum(1)
    del s
    p = p / p.sum(-1, keepdim=True)  # [BC,K]
    # index scores at the selected slots: I = Σ_h w_h · relu(scale · q_h·k)
    k_sel = k_rows.index_select(0, slots).view(BC, K, Di)
    qb = q.reshape(BC, Hi, Di)
    a = F.relu_(torch.bmm(qb, k_sel.transpose(1, 2)).float().mul_(index_scale))  # [BC,Hi,K]
    wb = w.reshape(BC, 1, Hi).float()
    i = torch.bmm(wb, a).squeeze(1)  # [BC,K]
    log_q = i.masked_fill_(~keep, float("-inf")).log_softmax(-1)
    kl = (p * (p.clamp_min(1e-30).log() - log_q.masked_fill(~keep, 0.0))).sum()
    if not want_grads:
        return kl, None, None, None, slots
    # d kl / d I = softmax(I)·Σp - p on the kept slots (log_softmax's backward of -p), / norm
    g_i = (log_q.exp_().mul_(p.sum(-1, keepdim=True)).sub_(p)).masked_fill_(~keep, 0.0).div_(norm)
    dw = torch.bmm(a, g_i[:, :, None]).view(B, C, Hi)  # d I / d w_h = relu(·)
    # d I / d (q_h·k) = w_h · scale where the relu passes; the dots' dtype, as autograd's would be
    g_z = (wb.transpose(1, 2) * index_scale * g_i[:, None, :]).masked_fill_(a <= 0, 0.0).to(qb.dtype)  # [BC,Hi,K]
    del a
    dq = torch.bmm(g_z, k_sel).float().view(B, C, Hi, Di)
    dk_sel = torch.bmm(g_z.transpose(1, 2), qb).float().view(BC * K, Di)
    return kl, dq, dw, dk_sel, slots


class _SparseKL(torch.autograd.Function):
    """The sparse stage's KL with its gradients computed in the same pass over the row blocks
    (the loss is a scalar: its backward only scales them), so nothing is recomputed and no
    per-block autograd graph exists. Held between forward and backward: dq, dw, dk, the size of
    the indexer's q, w, k (in their dtypes; dk accumulated in fp32)."""

    @staticmethod
    def forward(ctx, q, w, k, q_abs, kv, indices, index_scale, attn_scale, budget, dot_dtype, target_dtype):
        B, T, Hi, Di = q.shape
        H, D = q_abs.shape[2:]
        S, K = k.shape[1], indices.shape[-1]
        want = any(ctx.needs_input_grad[:3])
        C = rows_per_block(B, K * max(H, Hi, D, Di), budget)
        norm = float(B * T)
        dev = q.device
        k_rows = k.detach().to(dot_dtype).reshape(B * S, Di)  # cast once, not per block
        kv_rows = kv.detach().to(target_dtype).reshape(B * S, D)
        base = torch.arange(B, device=dev) * S
        total = torch.zeros((), dtype=torch.float32, device=dev)
        if want:
            dq = torch.empty(B, T, Hi, Di, dtype=q.dtype, device=dev)
            dw = torch.empty(B, T, Hi, dtype=w.dtype, device=dev)
            # unused slots add their zeros to K spare rows after the S real ones, one per column:
            # none piles onto slot 0 (fp32 atomics onto one row serialise)
            dk = torch.zeros(B * S + K, Di, dtype=torch.float32, device=dev)
            spare = B * S + torch.arange(K, device=dev)
        with torch.autocast(dev.type, enabled=False):  # the dtypes are chosen here, explicitly
            for t0 in range(0, T, C):
                t1 = min(T, t0 + C)
                idx = indices[:, t0:t1]
                kl, dq_b, dw_b, dk_sel, slots = _sparse_kl_block(
                    q[:, t0:t1].to(dot_dtype), w[:, t0:t1], k_rows, q_abs[:, t0:t1].to(target_dtype), kv_rows,
                    idx, base, index_scale, attn_scale, norm, want)
                total += kl
                if want:
                    dq[:, t0:t1] = dq_b
                    dw[:, t0:t1] = dw_b
                    unused = (idx < 0).reshape(-1)
                    slots = torch.where(unused, spare.repeat(B * (t1 - t0)), slots)
                    dk.index_add_(0, slots, dk_sel)
        if want:
            ctx.save_for_backward(dq, dw, dk[:B * S].view(B, S, Di).to(k.dtype))
        return total / norm

    @staticmethod
    def backward(ctx, g):
        dq, dw, dk = ctx.saved_tensors
        return dq * g, dw * g, dk * g, None, None, None, None, None, None, None, None


class _SparseKLKernels(torch.autograd.Function):
    """The sparse stage's KL from kernels/indexer_kl: one pass writes the index scores I and the
    head-summed target P at the selected slots ([B,T,K] fp32, P from the sparse attention's own
    lse, so the latent rows are read once, in the kernel, and never gathered into memory), the
    KL and d KL / d I are a few [B,T,K] operations here, and the backward kernel recomputes the
    index dots to turn d KL / d I into dq, dw, dk. Held between forward and backward: q and k
    in the dots' dtype and d KL / d I, [B,T,K] fp32."""

    @staticmethod
    def forward(ctx, q, w, k, q_abs, kv, lse, indices, index_scale, attn_scale, dot_dtype, target_dtype, backend):
        kern = _indexer_kl_module(backend)
        B, T = indices.shape[:2]
        norm = float(B * T)
        qd, kd = q.detach().to(dot_dtype), k.detach().to(dot_dtype)
        with torch.autocast(q.device.type, enabled=False):
            i, p = kern.scores_and_target(qd, w.detach(), kd, q_abs.to(target_dtype), kv.to(target_dtype), lse,
                                          indices, index_scale=index_scale, attn_scale=attn_scale)
            keep = indices >= 0
            p = p / p.sum(-1, keepdim=True)
            log_q = i.log_softmax(-1)  # i = -inf at unused slots
            kl = (p * (p.clamp_min(1e-30).log() - log_q.masked_fill(~keep, 0.0))).sum() / norm
            if any(ctx.needs_input_grad[:3]):
                # d kl / d I = softmax(I)·Σp - p on the kept slots (log_softmax's backward of -p)
                g_i = log_q.exp_().mul_(p.sum(-1, keepdim=True)).sub_(p).masked_fill_(~keep, 0.0).div_(norm)
                ctx.save_for_backward(qd, w.detach(), kd, indices, g_i)
        ctx.opts = (index_scale, backend, q.dtype, w.dtype, k.dtype)
        return kl

    @staticmethod
    def backward(ctx, g):
        qd, w, kd, indices, g_i = ctx.saved_tensors
        index_scale, backend, q_dtype, w_dtype, k_dtype = ctx.opts
        with torch.autocast(qd.device.type, enabled=False):
            dq, dw, dk = _indexer_kl_module(backend).scores_backward(qd, w, kd, indices, g_i * g.float(),
                                                                     index_scale=index_scale)
        return (dq.to(q_dtype), dw.to(w_dtype), dk.to(k_dtype), None, None, None, None, None, None, None, None,
                None)


def _indexer_kl_module(backend: str):
    """kernels/indexer_kl's 'triton' kernels or its 'reference' (the same Function over torch)."""
    from deepwish.kernels.indexer_kl import reference
    if backend == "reference":
        return reference
    from deepwish.kernels.indexer_kl import triton as kern
    return kern


@torch.compiler.disable
def sparse_kl(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_abs: torch.Tensor, kv: torch.Tensor,
              indices: torch.Tensor, index_scale: float, attn_scale: float,
              budget: int = KL_ROW_BUDGET, lse: torch.Tensor | None = None, backend: str = "torch") -> torch.Tensor:
    """The sparse stage's indexer loss, `indexer_kl` over the selected keys only: arguments as
    `dense_kl`, plus indices [B,T,K] (-1 = unused) from `topk_indices`. The index scores and the
    target are computed at the selected slots only, never O(T·S). Differentiable in q, w, k.
    The dots take autocast's dtype when it is on (else the inputs' promoted dtype), as the
    attention kernels' inputs do. -> mean over queries.

    backend 'torch': row blocks of `budget` elements in torch, the loss and its gradients in one
    pass (`_SparseKL`), the target from its own softmax. 'triton': kernels/indexer_kl
    (`_SparseKLKernels`), the target from lse [B,T,H], the natural-log normaliser of the main
    attention over the same slots (sparse_mla's second output, required here). 'reference': the
    same as 'triton' over kernels/indexer_kl's torch reference (tests; it gathers [B,T,K,D])."""
    q_abs, kv = q_abs.detach(), kv.detach()
    if backend in ("triton", "reference"):
        if lse is None:
            raise ValueError(f"sparse_kl: backend {backend!r} takes the target from the sparse attention's lse; pass lse")
        return _SparseKLKernels.apply(q, w, k, q_abs, kv, lse.detach(), indices, index_scale, attn_scale,
                                      _dot_dtype(q, k), _dot_dtype(q_abs, kv), backend)
    if backend != "torch":
        raise ValueError(f"sparse_kl: backend must be 'torch', 'triton' or 'reference', got {backend!r}")
    return _SparseKL.apply(q, w, k, q_abs, kv, indices, index_scale, attn_scale, budget, _dot_dtype(q, k),
                           _dot_dtype(q_abs, kv))


def _dot_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The dtype `kernel_inputs` would cast a and b to: autocast's when it is on, else promoted."""
    dev = a.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(a.dtype, b.dtype)
