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

The cache (`DSACache`) adds one indexer key [Di] per token to MLA's latent cache. Deviations:
no fp8, no Hadamard transform, the KL target is computed by a dense [B,H,T,S] pass (a kernel
would fuse it); with a cache the selection runs over the static cache's slots with unwritten
slots masked, which selects the same set as HF's growing cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepwish.config import ModelConfig
from deepwish.model.attention import attention_mask
from deepwish.model.cache import MLACache, take_rows_
from deepwish.model.dsa_rows import index_scores
from deepwish.model.mla import MLA
from deepwish.model.rope import apply_rotary

INDEXER_MODES = ("off", "dense_warmup", "sparse")


@dataclass
class DSACache(MLACache):
    index_k: torch.Tensor | None = None  # [B, L, Di]

    @classmethod
    def empty_dsa(cls, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, index_dim: int,
                  dtype=torch.float32, device=None) -> "DSACache":
        z = lambda n: torch.zeros(batch, max_len, n, dtype=dtype, device=device)  # noqa: E731
        return cls(z(kv_lora_rank), z(rope_dim), z(index_dim))

    def update_index(self, positions: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Write indexer keys k [B,T,Di] at `positions` [B,T]; return all [B,L,Di]."""
        self.index_k.scatter_(1, positions[..., None].expand(-1, -1, k.shape[-1]), k.to(self.index_k.dtype))
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

    def make_cache(self, batch: int, max_len: int, dtype, device) -> DSACache:
        return DSACache.empty_dsa(batch, max_len, self.kv_lora_rank, self.rope, self.indexer.head_dim,
                                  dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, ctx, cache: DSACache | None = None) -> tuple[torch.Tensor, dict]:
        """ctx.dense_indexer_attention / ctx.indexer_loss: the indexer mode of this forward
        (resolved from `Objective.indexer_mode` by the model, module docstring)."""
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
