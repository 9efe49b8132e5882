"""DeepSeek Sparse Attention (DeepSeek-V3.2): MLA whose queries attend only to the top-k keys
chosen by a lightning indexer. This is the readable reference (the oracle for a fast kernel):
the sparse pattern is a dense boolean mask built with `scatter_`.

Shape legend: B batch, T query tokens, S key slots, Hi index_n_heads, Di index_head_dim,
P qk_rope_head_dim (the indexer's rotated channels), Rq q_lora_rank.

Indexer (HF `DeepseekV32Indexer`, V3.2 paper §2.1):
    q_h = wq_b(q_resid)            [B,T,Hi,Di]   q_resid = the MLA's normed low-rank query
    k   = LayerNorm(wk(x))         [B,S,Di]      one key per token, shared by the index heads
    rope on the first P channels of q and k, NON-interleaved (half split), unlike MLA's own rope
    w_h = weights_proj(x) in fp32 · Hi^-0.5
    I[t,s] = Σ_h w_h · relu(q_h·k_s · Di^-0.5);  keep the top index_topk causal keys per query.
    Exact ties at the k-th score go to the most recent keys (`select_topk_latest`).
The released code adds a Hadamard rotation and fp8 scoring; the rotation is orthogonal (it
preserves q·k) and fp8 is a precision choice, so neither is reproduced (HF does the same).

Training signal (paper §2.1.1): KL(p_t ‖ softmax(I_t)) where p_t is the main attention
distribution summed over heads and L1-normalised. Modes — an argument of the model's forward
(`Objective.indexer_mode`), never state left on the model, so a checkpoint decodes the same
however it was trained:
- 'off': inference behaviour (sparse attention over the indexer's top-k), no indexer loss;
- 'dense_warmup': main attention dense over all causal keys; KL over all causal keys;
- 'sparse': main attention over the top-k; KL restricted to the selected keys.
In every mode the indexer's inputs (x, q_resid) and the target are detached, so the indexer
loss trains only the indexer and the language-model loss never reaches it (the top-k is not
differentiable anyway). Freezing the rest of the model during the warm-up, as the paper does,
is the trainer's choice: `freeze_all_but_indexers(model)` does it. The loss (mean over query
tokens) is returned beside the output as aux["indexer"] (model/block.py).

The cache (`DSACache`) adds one indexer key [Di] per token to MLA's latent cache, whose c_kv
and k_pe are views of one [B, L, R+P] buffer (the latent rows the sparse kernel reads).
Deviations: no fp8, no Hadamard transform; with a cache the selection runs over the static
cache's slots with unwritten slots masked, which selects the same set as HF's growing cache.

Two paths over the same weights, by `model.dsa_backend` (resolved once, printed):
- torch: this file's reference — [B,T,S] index scores, the top-k as a boolean mask, naive MLA
  under it, the KL target from a dense [B,H,T,S] pass. The oracle.
- auto | triton: the fast path — index scores and the top-k in row blocks as indices [B,T,K]
  (model/dsa_rows.py, the same tie rule; the scores from the fused kernels/index_scores kernel
  where sparse_mla is Triton, else the reference's arithmetic), sparse_mla (kernels/sparse_mla) over
  the latent rows in the weight-absorbed form for training, prefill and decoding alike, the
  dense warm-up's KL in row blocks, and the sparse stage's KL at the selected slots (on triton
  from kernels/indexer_kl, its target from sparse_mla's own lse; else torch row blocks). The
  dense warm-up attends through MLA's causal kernel.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepwish.config import ModelConfig
from deepwish.model.attention import attention_mask
from deepwish.model.cache import MLACache, take_rows_, write_rows_
from deepwish.kernels.sparse_mla import resolve_sparse_mla_backend, sparse_mla
from deepwish.model.attention import kernel_inputs
from deepwish.kernels.index_scores.reference import index_scores
from deepwish.model.dsa_rows import dense_kl, sparse_kl, topk_indices
from deepwish.model.mla import MLA
from deepwish.model.rope import apply_rotary

INDEXER_MODES = ("off", "dense_warmup", "sparse")


@dataclass
class DSACache(MLACache):
    index_k: torch.Tensor | None = None  # [B, L, Di]

    @classmethod
    def empty_dsa(cls, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, index_dim: int,
                  dtype=torch.float32, device=None) -> "DSACache":
        # c_kv and k_pe are two views of one [B, L, R+P] buffer: the sparse kernel reads whole
        # latent rows from it (latent_rows) with no per-step concatenation of the cache
        rows = torch.zeros(batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        c_kv, k_pe = rows.split([kv_lora_rank, rope_dim], dim=-1)
        return cls(c_kv, k_pe, torch.zeros(batch, max_len, index_dim, dtype=dtype, device=device))

    def latent_rows(self) -> torch.Tensor:
        """[B, L, R+P]: c_kv and k_pe side by side, the buffer both are views of (empty_dsa)."""
        B, L, R = self.c_kv.shape
        base = self.c_kv._base
        if base is None or self.k_pe._base is not base or base.shape != (B, L, R + self.k_pe.shape[-1]):
            raise ValueError("DSACache.latent_rows: c_kv and k_pe are not views of one [B, L, R+P] buffer "
                             "(build the cache with DSACache.empty_dsa)")
        return base

    def update_index(self, positions: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Write indexer keys k [B,T,Di] at `positions` [B,T]; return all [B,L,Di]."""
        write_rows_(self.index_k, 1, positions, k)
        return self.index_k

    def reset(self) -> None:
        super().reset()
        self.index_k.zero_()

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        take_rows_(self.index_k, index)


class Indexer(nn.Module):
    PARAM_ROLES = {"weights_proj.weight": "gate"}  # per-head weights of the index score (model/roles.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.d_model, self.n_heads, bias=False)  # applied in fp32
        self.softmax_scale = self.head_dim ** -0.5

    def keys(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """x [B,T,d] -> rotated indexer keys [B,T,Di]."""
        k = self.k_norm(self.wk(x))
        return apply_rotary(k[:, :, None], ctx.cos, ctx.sin, interleave=False)[:, :, 0]

    def queries(self, x: torch.Tensor, q_resid: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,d], q_resid [B,T,Rq] -> rotated index queries q [B,T,Hi,Di] and per-head weights
        w [B,T,Hi] fp32 (with the Hi^-0.5 folded in)."""
        B, T, _ = x.shape
        q = self.wq_b(q_resid).view(B, T, self.n_heads, self.head_dim)
        q = apply_rotary(q, ctx.cos, ctx.sin, interleave=False)
        w = F.linear(x.float(), self.weights_proj.weight.float()) * self.n_heads ** -0.5
        return q, w

    def scores(self, x: torch.Tensor, q_resid: torch.Tensor, k: torch.Tensor, ctx) -> torch.Tensor:
        """x [B,T,d], q_resid [B,T,Rq], k [B,S,Di] -> index scores I [B,T,S] fp32 (unmasked)."""
        q, w = self.queries(x, q_resid, ctx)
        return index_scores(q, w, k, self.softmax_scale)  # HF's operation order: ties resolve alike

    def select(self, index_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Top-k visible keys per query as a boolean mask. index_scores [B,T,S],
        mask [B,1,T,S] (True = visible) -> [B,1,T,S] (True = visible and selected)."""
        return select_topk_latest(index_scores, mask[:, 0], self.topk)[:, None]


def select_topk_latest(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """The k visible keys with the largest scores, ties at the k-th score going to the most
    recent keys. scores [..., S], visible [..., S] bool -> chosen [..., S] bool.

    Exact ties are common: a key whose indexer dot products are negative for every index head
    scores exactly 0. `torch.topk` breaks ties by an order that depends on the row length, so
    the same prompt would select different keys in a [T, T] forward, in caches of different
    lengths and in a packed row. Here the choice is a function of the visible scores and key
    order only: every key above the k-th largest score, then, among keys equal to it, the latest
    ones. The visible keys of one query are one document in slot order, and slot order is
    position order in every path (uncached, packed, cached, chunked prefill), so "latest slot"
    is "latest position". A fast kernel replacing this must keep the same rule."""
    s = scores.masked_fill(~visible, float("-inf"))
    kth = s.topk(min(k, s.shape[-1]), dim=-1).values[..., -1:]  # the k-th value is unambiguous
    above = (s > kth) & visible  # (fewer than k visible: kth = -inf and every visible key is above)
    tied = (s == kth) & visible
    need = min(k, s.shape[-1]) - above.sum(-1, keepdim=True)
    rank_from_latest = tied.flip(-1).cumsum(-1).flip(-1)  # 1 = the latest tied key
    return above | (tied & (rank_from_latest <= need))


def indexer_kl(attn_scores: torch.Tensor, index_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(p ‖ softmax(I)) on the visible keys.
    attn_scores [B,H,T,S] (scaled main-attention logits), index_scores [B,T,S], mask [B,1,T,S]."""
    with torch.no_grad():
        p = attn_scores.float().masked_fill(~mask, float("-inf")).softmax(-1).sum(1)  # [B,T,S]
        p = p / p.sum(-1, keepdim=True)
        log_p = p.clamp_min(1e-30).log()
    m = mask[:, 0]
    log_q = index_scores.masked_fill(~m, float("-inf")).log_softmax(-1).masked_fill(~m, 0.0)
    return (p * (log_p - log_q)).sum(-1).mean()


def resolve_dsa_backend(requested: str, announce: bool = True) -> str | None:
    """model.dsa_backend -> the sparse_mla backend of the row-block path, or None for the dense
    reference ('torch'). 'auto' takes the row-block path everywhere, with the Triton kernel on
    CUDA and sparse_mla's torch reference elsewhere; 'triton' insists on the kernel (an error
    where it cannot run; TRITON_INTERPRET=1 runs it on the CPU)."""
    if requested == "torch":
        chosen, line = None, "dense reference ([T, S] index scores, top-k as a -inf mask)"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        chosen = resolve_sparse_mla_backend(requested, device, announce=False)
        note = " (no CUDA device)" if requested == "auto" and chosen == "torch" else ""
        scores = "Triton" if chosen == "triton" else "torch"
        line = f"row-block indexer/top-k ({scores} scores), sparse_mla {chosen}{note}"
    if announce:
        print(f"[deepwish] dsa: backend {requested} -> {line}", file=sys.stderr)
    return chosen


class DSA(MLA):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        problems = []
        if cfg.q_lora_rank <= 0:
            problems.append("the indexer reads the low-rank query, so q_lora_rank must be > 0")
        if cfg.index_n_heads <= 0 or cfg.index_head_dim <= 0 or cfg.index_topk <= 0:
            problems.append(f"index_n_heads={cfg.index_n_heads}, index_head_dim={cfg.index_head_dim}, "
                            f"index_topk={cfg.index_topk} must all be > 0")
        elif cfg.index_head_dim < cfg.qk_rope_head_dim:
            problems.append(f"index_head_dim={cfg.index_head_dim} < qk_rope_head_dim={cfg.qk_rope_head_dim}")
        if problems:
            raise ValueError(f"layer {layer_idx} (dsa): " + "; ".join(problems))
        self.indexer = Indexer(cfg)
        first = next((i for i, (m, _) in enumerate(cfg.layer_types) if m == "dsa"), layer_idx)
        self.sparse_backend = resolve_dsa_backend(cfg.dsa_backend, announce=layer_idx == first)
        self.index_scorer = "triton" if self.sparse_backend == "triton" else "torch"  # kernels/index_scores

    def make_cache(self, batch: int, max_len: int, dtype, device) -> DSACache:
        return DSACache.empty_dsa(batch, max_len, self.kv_lora_rank, self.rope, self.indexer.head_dim,
                                  dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, ctx, cache: DSACache | None = None) -> tuple[torch.Tensor, dict]:
        """ctx.dense_indexer_attention / ctx.indexer_loss: the indexer mode of this forward
        (resolved from `Objective.indexer_mode` by the model, module docstring). The path is
        model.dsa_backend's, resolved once in __init__: row blocks + sparse_mla, or the reference."""
        if self.sparse_backend is None:
            return self.forward_reference(x, ctx, cache)
        return self.forward_rows(x, ctx, cache)

    def forward_reference(self, x: torch.Tensor, ctx, cache: DSACache | None = None) -> tuple[torch.Tensor, dict]:
        """The dense reference (dsa_backend=torch): [B,T,S] index scores, a boolean top-k mask and
        a dense [B,H,T,S] KL target. The oracle of forward_rows."""
        B, T, _ = x.shape
        q_nope, q_pe, c_kv, k_pe, q_resid = self.project(x, ctx)
        xi, qi = x.detach(), q_resid.detach()  # the indexer learns only from its own loss
        k_idx = self.indexer.keys(xi, ctx)
        if cache is not None:
            c_kv, k_pe = cache.update(ctx.positions, c_kv, k_pe)
            k_idx = cache.update_index(ctx.positions, k_idx)
            mask = attention_mask(ctx.positions, torch.arange(cache.max_len, device=x.device).expand(B, -1))
        else:
            mask = ctx.mask()
        index_scores = self.indexer.scores(xi, qi, k_idx, ctx)
        attend = mask if ctx.dense_indexer_attention else self.indexer.select(index_scores, mask)
        if cache is not None:
            o = self.attend_absorbed(q_nope, q_pe, c_kv, k_pe, attend)
        else:
            o = self.attend_naive(q_nope, q_pe, c_kv, k_pe, attend, causal=False)
        aux = {}
        if ctx.indexer_loss:
            with torch.no_grad():
                s = self.attention_scores_absorbed(q_nope, q_pe, c_kv, k_pe)
            aux["indexer"] = indexer_kl(s, index_scores, attend)
        return self.o_proj(o.reshape(B, T, -1)), aux

    def absorbed_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """[B,T,H,R+P]: q_nope folded through W_uk into the latent, then q_pe (the MQA form)."""
        w_uk, _ = self.absorbed_weights()
        q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_uk.to(q_nope.dtype))
        return torch.cat([q_lat, q_pe.to(q_lat.dtype)], dim=-1)

    def forward_rows(self, x: torch.Tensor, ctx, cache: DSACache | None = None) -> tuple[torch.Tensor, dict]:
        """The fast path (dsa_backend auto | triton): the indexer's top-k in row blocks as indices
        [B,T,K], sparse_mla over the latent rows in the absorbed form, the KL in row blocks
        (model/dsa_rows.py). Nothing is [T, S]; with a cache, shapes are static and nothing reads
        a value on the host, so a decode step can be captured as a graph."""
        B, T, _ = x.shape
        ix = self.indexer
        q_nope, q_pe, c_kv, k_pe, q_resid = self.project(x, ctx)
        xi, qi = x.detach(), q_resid.detach()  # the indexer learns only from its own loss
        k_idx = ix.keys(xi, ctx)
        q_idx, w_idx = ix.queries(xi, qi, ctx)
        if cache is not None:
            c_kv, k_pe = cache.update(ctx.positions, c_kv, k_pe)
            k_idx = cache.update_index(ctx.positions, k_idx)
            kv = cache.latent_rows()
            k_pos, q_doc, k_doc, prefix = torch.arange(cache.max_len, device=x.device).expand(B, -1), None, None, False
        else:
            kv = torch.cat([c_kv, k_pe.to(c_kv.dtype)], dim=-1)
            k_pos, q_doc, k_doc, prefix = ctx.positions, ctx.doc_ids, ctx.doc_ids, True
        q_abs = self.absorbed_query(q_nope, q_pe)
        where = dict(q_pos=ctx.positions, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc, causal_prefix=prefix)
        indices = None
        if ctx.dense_indexer_attention:  # the warm-up attends densely: MLA's own paths
            if cache is None:
                o = self.attend_training(q_nope, q_pe, c_kv, k_pe, ctx)
            else:
                o = self.attend_absorbed(q_nope, q_pe, c_kv, k_pe, attention_mask(ctx.positions, k_pos))
        else:
            q_s, k_s = q_idx.detach(), k_idx.detach()
            if self.index_scorer == "triton":  # the kernel's dot in autocast's dtype, as the attention kernels
                q_s, k_s = kernel_inputs(q_s, k_s)
            indices = topk_indices(q_s, w_idx.detach(), k_s, ix.softmax_scale, ix.topk, **where, scorer=self.index_scorer)
            q_k, kv_k = kernel_inputs(q_abs, kv)
            o_lat, lse = sparse_mla(q_k, kv_k, indices, dv=self.kv_lora_rank, scale=self.scale,
                                    backend=self.sparse_backend)
            _, w_uv = self.absorbed_weights()
            o = torch.einsum("bthr,hvr->bthv", o_lat, w_uv.to(o_lat.dtype)).to(q_nope.dtype)
        aux = {}
        if ctx.indexer_loss:
            if indices is None:
                aux["indexer"] = dense_kl(q_idx, w_idx, k_idx, q_abs, kv, ix.softmax_scale, self.scale, **where)
            else:
                # the target from the attention's own lse (triton: kernels/indexer_kl), or its own softmax
                aux["indexer"] = sparse_kl(q_idx, w_idx, k_idx, q_k, kv_k, indices, ix.softmax_scale, self.scale,
                                           lse=lse, backend=self.sparse_backend)
        return self.o_proj(o.reshape(B, T, -1)), aux


def freeze_all_but_indexers(model: nn.Module) -> list[str]:
    """Dense warm-up as the V3.2 paper runs it: every parameter except the lightning indexers'
    stops receiving gradient (requires_grad=False). Returns the names left trainable."""
    trainable = []
    for name, p in model.named_parameters():
        keep = ".indexer." in f".{name}"
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    if not trainable:
        raise ValueError("the model has no indexer parameters to train (no DSA layers)")
    return trainable
