"""Grouped-query attention (Qwen3), with the options later families need:

- per-head QK RMSNorm (Qwen3, Qwen3-Next), applied before rotary;
- an output gate (Qwen3-Next "gated attention"): q_proj emits [query | gate] per head, and
  sigmoid(gate) scales the attention output before o_proj;
- partial rotary (Qwen3-Next rotates the first quarter of each head);
- a sliding window (for `swa` layers).

Shapes: x [B, T, d]; q [B, T, H, D]; k, v [B, T, Hkv, D]. Heads are grouped: query head h uses
key/value head h // (H / Hkv).

Training and prefill without a cache use torch SDPA (flash kernel on GPU when the mask is
plain causal); with packed documents a block-diagonal causal mask is passed. With a cache,
keys and values are written at their positions and attention runs over the whole static cache
under a `slot <= position` mask, so shapes never change between decode steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepwish.config import ModelConfig
from deepwish.model.cache import KVCache
from deepwish.model.norm import RMSNorm
from deepwish.model.rope import apply_rotary


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int = 0,
                   q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, Tq, Tk]: key visible iff k_pos <= q_pos (within the window, same doc)."""
    m = k_pos[:, None, :] <= q_pos[:, :, None]
    if window > 0:
        m = m & (k_pos[:, None, :] > q_pos[:, :, None] - window)
    if q_doc is not None:
        m = m & (k_doc[:, None, :] == q_doc[:, :, None])
    return m[:, None]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
         causal: bool, backend: str) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) v with grouped heads. q [B,H,Tq,D], k,v [B,Hkv,Tk,D]."""
    rep = q.shape[1] // k.shape[1]
    if backend == "torch":  # explicit fp32 softmax: the readable reference
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
        if causal:
            tq, tk = q.shape[2], k.shape[2]
            mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v.float()).type_as(q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          scale=scale, enable_gqa=rep > 1)


def sdpa_folded_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                       backend: str) -> torch.Tensor:
    """`sdpa` with a mask, grouped heads folded into query rows: the rep query heads that share a
    key/value head become rep·Tq rows of that head (same scores, each row keeping its mask row),
    so keys are never repeated. With a mask, flash attention is out and an SDPA backend without
    grouped-head support would otherwise fall back to the math kernel, which repeats K/V and
    upcasts them: decode over a long cache then moves several times the cache's bytes.
    q [B,H,Tq,D], k,v [B,Hkv,Tk,D], mask [B,1,Tq,Tk] -> [B,H,Tq,Dv]."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    if rep == 1:
        return sdpa(q, k, v, mask, scale, False, backend)
    qf = q.reshape(B, Hkv, rep * T, D)  # head g·rep + r, query t -> row r·T + t of head g
    o = sdpa(qf, k, v, mask.repeat(1, 1, rep, 1), scale, False, backend)
    return o.reshape(B, H, T, o.shape[-1])


class Attention(nn.Module):
    PARAM_ROLES = {"o_proj.weight": "matrix_out"}  # writes into the residual stream (model/roles.py)

    def __init__(self, cfg: ModelConfig, layer_idx: int, gated: bool = False, window: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.gated = gated
        self.window = window
        self.backend = "sdpa" if cfg.attn_backend == "auto" else cfg.attn_backend
        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim * (2 if gated else 1), bias=cfg.attn_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=cfg.attn_bias)  # HF: o_proj too
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.norm_zero_centered) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.norm_zero_centered) if cfg.qk_norm else None
        self.scale = self.head_dim ** -0.5

    def make_cache(self, batch: int, max_len: int, dtype, device) -> KVCache:
        return KVCache.empty(batch, max_len, self.n_kv_heads, self.head_dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, ctx, cache: KVCache | None = None) -> tuple[torch.Tensor, dict]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, -1)
        if self.gated:  # per head: [query | gate], as in Qwen3-Next's released weights
            q, gate = q.split(self.head_dim, dim=-1)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v, k_pos = cache.keys_for(ctx.positions, k, v)
            mask = attention_mask(ctx.positions, k_pos, self.window)
            o = sdpa_folded_groups(q, k, v, mask, self.scale, self.backend)
        elif ctx.doc_ids is not None or self.window > 0:
            mask = ctx.mask(self.window)
            o = sdpa(q, k, v, mask, self.scale, False, self.backend)
        else:
            o = sdpa(q, k, v, None, self.scale, True, self.backend)
        o = o.transpose(1, 2)  # [B, T, H, D]
        if self.gated:
            o = o * torch.sigmoid(gate)
        return self.o_proj(o.reshape(B, T, -1)), {}
