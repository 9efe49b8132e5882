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
  to the latest keys), as slot indices. On the triton backend the scores come from one fused
  kernel (kernels/index_scores/triton.py) instead: no [C, Hi, S] buffer, rounding apart.
- `topk_indices` walks the row blocks. Without a cache the keys of block [t0, t1) are the
  slots [0, t1): a key after its query's slot is never visible (slots are positions within a
  document, documents are contiguous), so the causal square is skipped, not just masked.
- `dense_kl` / `sparse_kl` are `indexer_kl` over all visible keys (the dense warm-up) or over
  the selected ones (the sparse stage). Each block runs under activation checkpointing: its
  target and graph are rebuilt in the backward pass, one block at a time, so training memory
  stays one block, not T/C of them. The sparse stage gathers the selected rows (index keys and
  latent rows), O(C·K) per block, never O(C·S).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from deepwish.kernels.index_scores.reference import index_scores
from deepwish.model.attention import attention_mask

NEG_INF_KEY = -0x7F800001  # fp32 -inf (bits 0xFF800000) in the order-preserving int32 map of topk_latest_indices
ROW_BUDGET = 1 << 25  # elements of a block's widest fp32 intermediate (128 MiB)


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
    kk = min(k, S)
    s = scores.masked_fill(~visible, float("-inf")) + 0.0  # + 0.0: -0.0 -> +0.0
    bits = s.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 order == float order
    slots = torch.arange(S, device=s.device, dtype=torch.int64)
    key = ordered.to(torch.int64).mul_(1 << 32).add_(slots)
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
        from deepwish.kernels.index_scores.triton import index_scores as score
        k = k.to(q.dtype)  # once, not per block
        width = 6 * S  # the [C, S] scores and the int32/int64 keys of the selection
    elif scorer == "torch":
        score, width = index_scores, Hi * S
    else:
        raise ValueError(f"topk_indices: scorer must be 'torch' or 'triton', got {scorer!r}")
    C = rows_per_block(B, width, budget)
    out = torch.empty(B, T, topk, dtype=torch.int32, device=q.device)
    with torch.no_grad():
        for t0 in range(0, T, C):
            t1 = min(T, t0 + C)
            n = _keys_for(t1, causal_prefix, S)
            scores = score(q[:, t0:t1], w[:, t0:t1], k[:, :n], scale)
            vis = attention_mask(q_pos[:, t0:t1], k_pos[:, :n], 0,
                                 None if q_doc is None else q_doc[:, t0:t1], None if k_doc is None else k_doc[:, :n])
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
                    keep: torch.Tensor, index_scale: float, attn_scale: float) -> torch.Tensor:
    with torch.no_grad():
        # in the inputs' dtype, as the reference's attention_scores_absorbed: no fp32 copy of the rows
        s = torch.einsum("bchd,bsd->bhcs", q_abs, kv).float() * attn_scale
        p = _head_summed_target(s, keep)
    i = index_scores(q, w, k, index_scale)
    log_q = i.masked_fill(~keep, float("-inf")).log_softmax(-1)
    return _kl_rows(p, log_q, keep)


@torch.compiler.disable
def dense_kl(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_abs: torch.Tensor, kv: torch.Tensor,
             index_scale: float, attn_scale: float, q_pos: torch.Tensor, k_pos: torch.Tensor,
             q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None,
             causal_prefix: bool = False, budget: int = ROW_BUDGET) -> torch.Tensor:
    """The dense warm-up's indexer loss, `indexer_kl` over every visible key, in row blocks.
    q, w, k: the indexer's queries [B,T,Hi,Di], weights [B,T,Hi] and keys [B,S,Di] (gradient
    flows to them); q_abs [B,T,H,D] the absorbed main-attention queries and kv [B,S,D] the latent
    rows, whose scores · attn_scale are the target's logits (no gradient). -> mean over queries."""
    B, T, H, _ = q_abs.shape
    S = k.shape[1]
    C = rows_per_block(B, max(H, q.shape[2]) * S, budget)
    q_abs, kv = q_abs.detach(), kv.detach().to(q_abs.dtype)  # cast once, not per block
    total = q.new_zeros((), dtype=torch.float32)
    for t0 in range(0, T, C):
        t1 = min(T, t0 + C)
        n = _keys_for(t1, causal_prefix, S)
        keep = attention_mask(q_pos[:, t0:t1], k_pos[:, :n], 0,
                              None if q_doc is None else q_doc[:, t0:t1], None if k_doc is None else k_doc[:, :n])[:, 0]
        total = total + checkpoint(_dense_kl_block, q[:, t0:t1], w[:, t0:t1], k[:, :n], q_abs[:, t0:t1], kv[:, :n],
                                   keep, index_scale, attn_scale, use_reentrant=False)
    return total / (B * T)


def _gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x [B,S,D], indices [B,C,K] (-1 allowed) -> x at the slots [B,C,K,D] (slot 0 for -1)."""
    B, C, K = indices.shape
    slot = indices.long().clamp_min(0).reshape(B, C * K, 1).expand(-1, -1, x.shape[-1])
    return torch.gather(x, 1, slot).reshape(B, C, K, -1)


def _sparse_kl_block(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_abs: torch.Tensor, kv: torch.Tensor,
                     indices: torch.Tensor, index_scale: float, attn_scale: float) -> torch.Tensor:
    keep = indices >= 0  # [B,C,K]
    with torch.no_grad():
        s = torch.einsum("bchd,bckd->bhck", q_abs, _gather_rows(kv, indices)).float() * attn_scale
        p = _head_summed_target(s, keep)
    k_sel = _gather_rows(k, indices).float()  # [B,C,K,Di]
    z = F.relu(torch.einsum("bchd,bckd->bchk", q.float(), k_sel) * index_scale)
    i = torch.einsum("bch,bchk->bck", w, z)
    log_q = i.masked_fill(~keep, float("-inf")).log_softmax(-1)
    return _kl_rows(p, log_q, keep)


@torch.compiler.disable
def sparse_kl(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_abs: torch.Tensor, kv: torch.Tensor,
              indices: torch.Tensor, index_scale: float, attn_scale: float,
              budget: int = ROW_BUDGET) -> torch.Tensor:
    """The sparse stage's indexer loss, `indexer_kl` over the selected keys only, in row blocks:
    arguments as `dense_kl`, plus indices [B,T,K] (-1 = unused) from `topk_indices`. The index
    scores and the target are computed at the selected slots only. -> mean over queries."""
    B, T, H, D = q_abs.shape
    K = indices.shape[-1]
    C = rows_per_block(B, K * max(H, q.shape[2], D), budget)
    q_abs, kv = q_abs.detach(), kv.detach().to(q_abs.dtype)  # cast once, not per block
    total = q.new_zeros((), dtype=torch.float32)
    for t0 in range(0, T, C):
        t1 = min(T, t0 + C)
        total = total + checkpoint(_sparse_kl_block, q[:, t0:t1], w[:, t0:t1], k, q_abs[:, t0:t1], kv,
                                   indices[:, t0:t1], index_scale, attn_scale, use_reentrant=False)
    return total / (B * T)
