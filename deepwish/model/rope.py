"""Rotary position embedding: default and YaRN frequencies, half-split or interleaved pairs,
partial rotation.

Frequencies follow HF transformers' `rope_parameters` semantics exactly (YaRN: NTK-by-parts
ramp between interpolated and extrapolated frequencies, `attention_factor` multiplying cos and
sin). DeepSeek's extra YaRN softmax factor mscale(factor, mscale_all_dim)² is not a rotary
matter and is applied by MLA to its softmax scale.

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


def rope_frequencies(cfg: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    """inv_freq [dim/2] (fp32) and the attention factor that scales cos/sin."""
    base = cfg.rope_theta
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if cfg.rope_type == "default":
        return 1.0 / pos, 1.0
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


class Rotary(nn.Module):
    """Produces (cos, sin) [B, T, dim/2] for integer positions [B, T]."""

    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()
        self.cfg, self.dim = cfg, dim
        inv_freq, self.attention_factor = rope_frequencies(cfg, dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building on the meta device."""
        inv_freq, _ = rope_frequencies(self.cfg, self.dim)
        self.inv_freq = inv_freq.to(self.inv_freq.device if not self.inv_freq.is_meta else "cpu")

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq.float()
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
