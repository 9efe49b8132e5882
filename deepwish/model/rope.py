"""Rotary position embedding: default, YaRN, linear, dynamic-NTK, Llama-3 and LongRoPE
frequencies, half-split or interleaved pairs, partial rotation.

Frequencies follow HF transformers' `rope_parameters` semantics exactly, operation for
operation (fp32):
- yarn: NTK-by-parts ramp between interpolated and extrapolated frequencies, `attention_factor`
  multiplying cos and sin. DeepSeek's extra YaRN softmax factor mscale(factor, mscale_all_dim)²
  is not a rotary matter and is applied by MLA to its softmax scale.
- linear: every frequency divided by `factor`.
- llama3: wavelengths longer than original/low_freq_factor divided by `factor`, shorter than
  original/high_freq_factor kept, a linear blend between.
- dynamic (NTK): while the largest position of a forward is below max_position_embeddings the
  default frequencies; beyond, the base grows to θ·(factor·n/L − (factor − 1))^(d/(d−2)) with
  n = largest position + 1 and L = max_position_embeddings.
- longrope: frequencies divided per channel pair by `short_factor`, or by `long_factor` once
  the largest position of a forward reaches original_max_position_embeddings; cos and sin
  scaled by `attention_factor` (default √(1 + ln(factor)/ln(original))).
The last two depend on the positions of each forward, so `Rotary.forward` picks them per
call, on the device (no host sync: decode stays graph-capturable). HF keeps the frequencies of
the longest forward a module has seen until a forward falls back below the original length;
deepwish takes them from each call's own positions. Both agree for a fresh model, for every
uncached forward and for prefill + decode (positions only grow); cached keys keep the rotation
of the forward that wrote them, in both.

Layouts: `interleave=False` rotates halves (x[:d/2], x[d/2:]); `interleave=True` rotates
adjacent pairs (x[2i], x[2i+1]) as in DeepSeek's released MLA weights. HF handles the latter
by de-interleaving q and k before a half-split rotation; since q·k is invariant to a common
channel permutation, both give the same attention scores.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from deepwish.config import ModelConfig


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _exponents(dim: int, device=None) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


def rope_frequencies(cfg: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    """inv_freq [dim/2] (fp32) and the attention factor that scales cos/sin. For dynamic and
    longrope: the frequencies of a forward whose positions stay below the original length."""
    base = cfg.rope_theta
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if cfg.rope_type in ("default", "dynamic"):
        return 1.0 / pos, 1.0
    if cfg.rope_type == "linear":
        return 1.0 / pos / cfg.rope_factor, 1.0
    if cfg.rope_type == "llama3":
        return llama3_frequencies(cfg, 1.0 / pos), 1.0
    if cfg.rope_type == "longrope":
        return longrope_frequencies(cfg, dim, cfg.rope_short_factor), longrope_attention_factor(cfg)
    factor = cfg.rope_factor
    orig = cfg.rope_original_max_len or cfg.max_seq_len
    if cfg.yarn_attention_factor > 0:
        attn_factor = cfg.yarn_attention_factor
    elif cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
        attn_factor = yarn_get_mscale(factor, cfg.yarn_mscale) / yarn_get_mscale(factor, cfg.yarn_mscale_all_dim)
    else:
        attn_factor = yarn_get_mscale(factor)

    def correction_dim(n_rot: float) -> float:
        return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrap = 1.0 - ramp  # 1: keep the original frequency (high-frequency dims)
    inv_freq = (1.0 / (factor * pos)) * (1 - extrap) + (1.0 / pos) * extrap
    return inv_freq, attn_factor


def llama3_frequencies(cfg: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    f, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    orig = cfg.rope_original_max_len or cfg.max_seq_len
    wavelen = 2 * math.pi / inv_freq
    is_long = wavelen > orig / lo  # low frequencies: fully interpolated
    is_short = wavelen < orig / hi  # high frequencies: kept
    scaled = torch.where(is_long, inv_freq / f, inv_freq)
    smooth = (orig / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / f + smooth * scaled
    return torch.where(~is_short & ~is_long, blended, scaled)


def longrope_frequencies(cfg: ModelConfig, dim: int, factors: tuple[float, ...]) -> torch.Tensor:
    if len(factors) != dim // 2:
        raise ValueError(f"longrope: short_factor/long_factor must have {dim // 2} entries (rotary dim {dim} / 2), "
                         f"got {len(factors)}")
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * cfg.rope_theta ** _exponents(dim))


def longrope_attention_factor(cfg: ModelConfig) -> float:
    if cfg.rope_attention_factor > 0:
        return cfg.rope_attention_factor
    f = cfg.rope_factor
    return 1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(cfg.rope_original_max_len))


def dynamic_ntk_frequencies(cfg: ModelConfig, dim: int, seq_len: torch.Tensor) -> torch.Tensor:
    """Dynamic-NTK frequencies for a forward whose largest position is seq_len - 1 (a 0-d
    int64 tensor), in HF's fp32 tensor arithmetic."""
    L = cfg.max_seq_len
    n = torch.maximum(seq_len, torch.tensor(L, dtype=seq_len.dtype, device=seq_len.device))
    base = cfg.rope_theta * ((cfg.rope_factor * n / L) - (cfg.rope_factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** _exponents(dim, seq_len.device))


class Rotary(nn.Module):
    """Produces (cos, sin) [B, T, dim/2] for integer positions [B, T]."""

    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()
        self.cfg, self.dim = cfg, dim
        # Computed on the CPU whatever device the model is built on (a `torch.device` context), then
        # moved: CUDA's pow may differ from the CPU's in the last bit, and a model built on the GPU
        # would then rotate differently from the same weights loaded (load_hf computes on the CPU).
        device = torch.empty(0).device
        with torch.device("cpu"):
            inv_freq, self.attention_factor = rope_frequencies(cfg, dim)
            long = longrope_frequencies(cfg, dim, cfg.rope_long_factor) if cfg.rope_type == "longrope" else None
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        if long is not None:
            self.register_buffer("inv_freq_long", long.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        """Moves follow the model; dtype casts do not: `model.to(torch.bfloat16)` would otherwise
        round the frequencies to bf16 (every rotation angle then off by up to 2^-9 of itself), and
        a bf16 model would rotate differently from the same weights loaded by `load_hf`, which
        recomputes them in fp32 (as HF keeps them)."""
        kept = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for n, old in kept.items():
            new = self._buffers[n]
            if new.dtype != old.dtype and not old.is_meta and not new.is_meta:
                self._buffers[n] = old.to(new.device)
        return self

    def reset_buffers(self) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building on the meta device."""
        device = self.inv_freq.device if not self.inv_freq.is_meta else "cpu"
        with torch.device("cpu"):
            self.inv_freq = rope_frequencies(self.cfg, self.dim)[0].to(device)
            if self.cfg.rope_type == "longrope":
                self.inv_freq_long = longrope_frequencies(self.cfg, self.dim, self.cfg.rope_long_factor).to(device)

    def frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        """inv_freq for a forward at `positions` (per call for dynamic and longrope)."""
        c = self.cfg
        if c.rope_type == "dynamic":
            seq_len = positions.max() + 1
            return torch.where(seq_len > c.max_seq_len, dynamic_ntk_frequencies(c, self.dim, seq_len), self.inv_freq)
        if c.rope_type == "longrope":
            return torch.where(positions.max() + 1 > c.rope_original_max_len, self.inv_freq_long, self.inv_freq)
        return self.inv_freq

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.frequencies(positions).float()
        if self.attention_factor == 1.0:  # x·1 is x: two launches fewer per step
            return freqs.cos(), freqs.sin()
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """Rotate the first 2·cos.shape[-1] channels of x [B, T, H, D]; the rest pass through.

    cos, sin: [B, T, R/2] in fp32. Computed in fp32, returned in x's dtype.
    """
    rot = 2 * cos.shape[-1]
    xr, xp = x[..., :rot].float(), x[..., rot:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    if interleave:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    out = out.type_as(x)
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out
