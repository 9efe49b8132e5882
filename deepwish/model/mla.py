"""Multi-head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1).

Shape legend: B batch, T query tokens, S key slots, H heads, d model width,
R kv_lora_rank (latent), Rq q_lora_rank, N qk_nope_head_dim, P qk_rope_head_dim, V v_head_dim.

    q      = q_b(RMSNorm(q_a(x)))  (or q_proj(x) when q_lora_rank == 0)   [B, T, H, N+P]
    [c_kv | k_pe] = kv_a_proj_with_mqa(x);  c_kv = RMSNorm(c_kv)           [B, T, R], [B, T, P]
    [k_nope | v]  = kv_b(c_kv) per head                                     [B, T, H, N], [B, T, H, V]
    k = [k_nope | rope(k_pe) shared by all heads],  q = [q_nope | rope(q_pe)]

Two paths over the same weights:
- naive (training, and any forward without a cache): expand kv_b per head, then SDPA;
- weight-absorbed (every forward with a cache, prefill and decode alike, as DeepSeek's own
  inference code does in its "absorb" mode): q_nope·W_uk is folded into a latent query, the
  scores are taken against the cached latent directly, and W_uv is applied after the weighted
  sum, so the cache holds only [c_kv | k_pe] (R + P numbers per token: 576 at V3 sizes).

Softmax scale: (N+P)^-0.5, times mscale(factor, mscale_all_dim)² under DeepSeek's YaRN (HF
`yarn_apply_mscale`). The rope channels are interleaved pairs in DeepSeek's released weights
(`rope_interleave`); HF de-interleaves q and k before a half-split rotation, which permutes
both alike and leaves every score unchanged.

Deviations: q_a_layernorm and kv_a_layernorm use eps 1e-6 whatever rms_norm_eps says, as HF
builds them; the absorbed path computes scores in the input dtype with a fp32 softmax (no
fp8); attention dropout is not implemented.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepwish.config import ModelConfig
from deepwish.model.attention import ATTENDING_MIXERS, attention_mask, causal_attention, resolve_attn_backend, sdpa
from deepwish.model.cache import MLACache
from deepwish.model.norm import RMSNorm
from deepwish.model.rope import apply_rotary, yarn_get_mscale

LATENT_NORM_EPS = 1e-6  # HF builds q_a_layernorm / kv_a_layernorm with the default eps
ABSORBED_Q_CHUNK = 512  # queries per step of a long cached prefill (bounds the [B,H,T,S] scores)


def mla_softmax_scale(cfg: ModelConfig) -> float:
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope_type == "yarn" and cfg.yarn_mscale_all_dim:
        m = yarn_get_mscale(cfg.rope_factor, cfg.yarn_mscale_all_dim)
        scale = scale * m * m
    return scale


def check_mla_config(cfg: ModelConfig, layer_idx: int) -> None:
    problems = []
    if cfg.kv_lora_rank <= 0:
        problems.append(f"kv_lora_rank={cfg.kv_lora_rank} must be > 0")
    if cfg.qk_rope_head_dim <= 0 or cfg.qk_rope_head_dim % 2:
        problems.append(f"qk_rope_head_dim={cfg.qk_rope_head_dim} must be a positive even number")
    if cfg.qk_nope_head_dim < 0 or cfg.v_head_dim <= 0:
        problems.append(f"qk_nope_head_dim={cfg.qk_nope_head_dim} must be >= 0 and v_head_dim={cfg.v_head_dim} > 0")
    if cfg.rope_partial != 1.0:
        problems.append(f"rope_partial={cfg.rope_partial}: MLA rotates exactly qk_rope_head_dim channels")
    if problems:
        raise ValueError(f"layer {layer_idx} (mla): " + "; ".join(problems))


class MLA(nn.Module):
    PARAM_ROLES = {"o_proj.weight": "matrix_out"}  # writes into the residual stream (model/roles.py)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        check_mla_config(cfg, layer_idx)
        self.layer_idx = layer_idx
        self.n_heads = H = cfg.n_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        self.interleave = cfg.rope_interleave
        first = next((i for i, (m, _) in enumerate(cfg.layer_types) if m in ATTENDING_MIXERS), layer_idx)
        self.backends = resolve_attn_backend(cfg.attn_backend, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
                                             announce=layer_idx == first, v_head_dim=cfg.v_head_dim)
        self.backend = "torch" if self.backends.decode == "torch" else "sdpa"  # explicit-mask paths (DSA, cache)
        d, qk = cfg.d_model, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.attn_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        else:
            self.q_proj = nn.Linear(d, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attn_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, d, bias=cfg.attn_bias)
        self.scale = mla_softmax_scale(cfg)

    def make_cache(self, batch: int, max_len: int, dtype, device) -> MLACache:
        return MLACache.empty(batch, max_len, self.kv_lora_rank, self.rope, dtype=dtype, device=device)

    # ---- projections -------------------------------------------------------------------
    def project(self, x: torch.Tensor, ctx) -> tuple[torch.Tensor, ...]:
        """x [B, T, d] -> q_nope [B,T,H,N], q_pe [B,T,H,P] (rotated), c_kv [B,T,R] (normed),
        k_pe [B,T,P] (rotated), q_resid [B,T,Rq] (the normed low-rank query, or None)."""
        B, T, _ = x.shape
        if self.q_lora_rank > 0:
            q_resid = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_resid)
        else:
            q_resid, q = None, self.q_proj(x)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope, self.rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = apply_rotary(q_pe, ctx.cos, ctx.sin, interleave=self.interleave)
        k_pe = apply_rotary(k_pe[:, :, None], ctx.cos, ctx.sin, interleave=self.interleave)[:, :, 0]
        return q_nope, q_pe, c_kv, k_pe, q_resid

    # ---- attention ---------------------------------------------------------------------
    def expand_heads(self, q_nope, q_pe, c_kv, k_pe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B,T,H,N+P], and per-head k [B,S,H,N+P], v [B,S,H,V] from the latent."""
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, self.n_heads, -1)], dim=-1)
        return torch.cat([q_nope, q_pe], dim=-1), k, v

    def attend_naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                     mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Per-head keys/values from the latent, then SDPA under an explicit mask (DSA's sparse
        pattern). c_kv [B,S,R], k_pe [B,S,P], mask [B,1,T,S] bool or None -> o [B, T, H, V]."""
        q, k, v = self.expand_heads(q_nope, q_pe, c_kv, k_pe)
        pad = q.shape[-1] - self.v_dim
        if self.backend == "sdpa" and pad > 0:
            # torch's flash kernel needs equal q/k/v head dims; zero value channels cost a little
            # bandwidth and keep SDPA off the slower kernels (bench: python -m deepwish.bench.mla)
            v = F.pad(v, (0, pad))
        o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale, causal, self.backend)
        return o.transpose(1, 2)[..., : self.v_dim]

    def attend_training(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                        ctx) -> torch.Tensor:
        """The naive path without a cache: causal attention by model.attn_backend, documents from
        ctx (no [T, T] mask on the triton/flex backends). -> o [B, T, H, V]."""
        q, k, v = self.expand_heads(q_nope, q_pe, c_kv, k_pe)
        pad = q.shape[-1] - self.v_dim
        backend = self.backends.packed if ctx.doc_ids is not None else self.backends.plain
        if backend in ("sdpa", "flex") and pad > 0:  # as in attend_naive; the own kernel takes Dqk != Dv
            v = F.pad(v, (0, pad))
        return causal_attention(q, k, v, ctx, 0, self.scale, self.backends)[..., : self.v_dim]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_uk [H, N, R] (keys) and W_uv [H, V, R] (values)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope], w[:, self.nope:]

    def attention_scores_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                                  k_pe: torch.Tensor) -> torch.Tensor:
        """Scaled scores [B, H, T, S] in fp32 against the latent: (q_nope W_uk)·c_kv + q_pe·k_pe."""
        w_uk, _ = self.absorbed_weights()
        q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_uk.to(q_nope.dtype))
        s = torch.einsum("bthr,bsr->bhts", q_lat, c_kv.to(q_lat.dtype)).float()
        s = s + torch.einsum("bthp,bsp->bhts", q_pe, k_pe.to(q_pe.dtype)).float()
        return s * self.scale

    def attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
        """Attention over the cached latent. mask [B,1,T,S] bool (True = visible) -> o [B,T,H,V].
        A long prefill runs in query chunks so the fp32 scores stay [B,H,chunk,S]."""
        T = q_nope.shape[1]
        if T > ABSORBED_Q_CHUNK:
            return torch.cat([self.attend_absorbed(q_nope[:, i:i + ABSORBED_Q_CHUNK], q_pe[:, i:i + ABSORBED_Q_CHUNK],
                                                   c_kv, k_pe, mask[:, :, i:i + ABSORBED_Q_CHUNK])
                              for i in range(0, T, ABSORBED_Q_CHUNK)], dim=1)
        s = self.attention_scores_absorbed(q_nope, q_pe, c_kv, k_pe).masked_fill(~mask, float("-inf"))
        p = s.softmax(-1).to(c_kv.dtype)
        o_lat = torch.einsum("bhts,bsr->bthr", p, c_kv)
        _, w_uv = self.absorbed_weights()
        return torch.einsum("bthr,hvr->bthv", o_lat, w_uv.to(o_lat.dtype)).to(q_nope.dtype)

    def forward(self, x: torch.Tensor, ctx, cache: MLACache | None = None) -> tuple[torch.Tensor, dict]:
        B, T, _ = x.shape
        q_nope, q_pe, c_kv, k_pe, _ = self.project(x, ctx)
        if cache is not None:
            c_all, pe_all = cache.update(ctx.positions, c_kv, k_pe)
            slots = torch.arange(cache.max_len, device=x.device).expand(B, -1)
            o = self.attend_absorbed(q_nope, q_pe, c_all, pe_all, attention_mask(ctx.positions, slots))
        else:
            o = self.attend_training(q_nope, q_pe, c_kv, k_pe, ctx)
        return self.o_proj(o.reshape(B, T, -1)), {}
