"""Causal attention, pure torch in fp32 with an explicit mask: the CPU path and the test oracle
of `triton.py` (flash attention) and `decode.py` (split-KV decoding).

Shapes: q [B, T, H, Dqk], k [B, T, Hkv, Dqk], v [B, T, Hkv, Dv] -> o [B, T, H, Dv]. Query head h
reads key/value head h // (H / Hkv). Key j is visible to query i iff
    j <= i                       (causal; always on: this is a language model)
    j > i - window               (window > 0: the last `window` tokens, the query's own included)
    same document                (doc_ids [B, T]: a document is a maximal run of equal ids)
Scores are s = scale · q·k (scale defaults to Dqk^-0.5), then softcap·tanh(s / softcap) when
softcap > 0, then a softmax over the visible keys.
"""
from __future__ import annotations

import torch

from deepwish.kernels.documents import document_starts

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None,
                 window: int, softcap: float) -> None:
    """One-line errors for every shape, dtype or option the attention paths do not take."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be [B, T, heads, dim], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape[:2] != (B, T) or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
        raise ValueError(f"attention: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(want q [B,T,H,Dqk], k [B,T,Hkv,Dqk], v [B,T,Hkv,Dv])")
    if H % k.shape[2]:
        raise ValueError(f"attention: {H} query heads are not a multiple of {k.shape[2]} key/value heads")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention: q, k, v must share one dtype of float32/float16/bfloat16, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if doc_ids is not None and tuple(doc_ids.shape) != (B, T):
        raise ValueError(f"attention: doc_ids must be [B, T] = {(B, T)}, got {tuple(doc_ids.shape)}")
    if window < 0:
        raise ValueError(f"attention: window must be >= 0 (0 = no window), got {window}")
    if softcap < 0:
        raise ValueError(f"attention: softcap must be >= 0 (0 = off), got {softcap}")


def visible(T: int, doc_ids: torch.Tensor | None, window: int, device, B: int = 1) -> torch.Tensor:
    """Boolean mask [B, T, T] (query, key)."""
    i = torch.arange(T, device=device)
    m = (i[None, :] <= i[:, None])
    if window > 0:
        m = m & (i[None, :] > i[:, None] - window)
    m = m.expand(B, T, T)
    if doc_ids is not None:
        d = document_starts(doc_ids)
        m = m & (d[:, None, :] == d[:, :, None])
    return m


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, doc_ids: torch.Tensor | None = None,
              window: int = 0, softcap: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """softmax(mask(cap(scale · q kᵀ))) v in fp32; returns q's dtype. Differentiable (autograd)."""
    check_inputs(q, k, v, doc_ids, window, softcap)
    B, T, H, D = q.shape
    rep = H // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    kf = k.float().repeat_interleave(rep, 2)
    vf = v.float().repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible(T, doc_ids, window, q.device, B)[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vf).to(q.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_pos: torch.Tensor,
                     k_pos: torch.Tensor, *, window: int = 0, softcap: float = 0.0,
                     scale: float | None = None) -> torch.Tensor:
    """Attention of a few new queries over a static cache, the oracle of the split-KV kernel.

    q [B, Tq, H, Dqk]; k_cache [B, Hkv, L, Dqk], v_cache [B, Hkv, L, Dv] (the layout of
    model/cache.py); q_pos [B, Tq] query positions; k_pos [B, L] the position each slot holds
    (slot index for a KVCache, the stored positions of a ring cache). Slot j is visible to query
    i iff k_pos[j] <= q_pos[i] (and k_pos[j] > q_pos[i] - window). -> [B, Tq, H, Dv]."""
    B, Tq, H, D = q.shape
    rep = H // k_cache.shape[1]
    scale = D ** -0.5 if scale is None else scale
    kf = k_cache.float().repeat_interleave(rep, 1)
    vf = v_cache.float().repeat_interleave(rep, 1)
    s = torch.einsum("bqhd,bhkd->bhqk", q.float(), kf) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    m = k_pos[:, None, :] <= q_pos[:, :, None]
    if window > 0:
        m = m & (k_pos[:, None, :] > q_pos[:, :, None] - window)
    s = s.masked_fill(~m[:, None], float("-inf"))
    return torch.einsum("bhqk,bhkd->bqhd", s.softmax(-1), vf).to(q.dtype)


def decode_prologue(y: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                    cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, n_heads: int, zero_centered: bool = False,
                    k_raw_cache: torch.Tensor | None = None) -> torch.Tensor:
    """What an attention layer does between its fused q/k/v projection and decode attention, for a
    plain cache whose slot j holds position j: y [B, T, (H + 2·Hkv)·D] (q heads, then k, then v)
    -> q [B, T, H, D] QK-normed and rotated; k (QK-normed, rotated) and v written into
    k_cache / v_cache [B, Hkv, L, D] at slots `positions` [B, T]. The norm is RMSNorm with one
    weight row per head kind (zero_centered: x̂·(1 + w)), rotary the half-split rotation of the
    first 2·R/2 channels by cos, sin [B, T, R/2] (fp32); each step rounds to y's dtype where the
    model's rms_norm and apply_rotary do. k_raw_cache (NSA's): k normed, before rotary, written too."""
    B, T, _ = y.shape
    D = k_cache.shape[-1]
    Hkv = k_cache.shape[1]
    y = y.unflatten(-1, (n_heads + 2 * Hkv, D))
    qk, v = y[:, :, : n_heads + Hkv], y[:, :, n_heads + Hkv:]
    xf = qk.float()
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = torch.cat([q_weight.expand(n_heads, D), k_weight.expand(Hkv, D)])
    if zero_centered:
        qk = (xn * (1.0 + w.float())).to(y.dtype)
    else:
        qk = (w * xn.to(y.dtype)).to(y.dtype)
    rows = torch.arange(B, device=y.device)[:, None]
    if k_raw_cache is not None:
        k_raw_cache[rows, :, positions] = qk[:, :, n_heads:].to(k_raw_cache.dtype)
    r = cos.shape[-1]
    x1, x2 = qk[..., :r].float(), qk[..., r:2 * r].float()
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    qk = torch.cat([torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(y.dtype), qk[..., 2 * r:]], -1)
    q, k = qk[:, :, :n_heads], qk[:, :, n_heads:]
    k_cache[rows, :, positions] = k.to(k_cache.dtype)  # [B, T, Hkv, D] into [B, Hkv, L, D] at (b, :, pos)
    v_cache[rows, :, positions] = v.to(v_cache.dtype)
    return q.contiguous()
