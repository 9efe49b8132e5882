"""Causal attention for training and decoding: `reference` (pure torch fp32, explicit mask: the
CPU path and the test oracle), `triton` (flash attention forward/backward), `flex` (torch
FlexAttention with block masks) and `decode` (split-KV decoding over a static cache). The caller
picks one explicitly (model.attn_backend); nothing falls back silently."""
from deepwish.kernels.attention import reference

__all__ = ["reference", "flash_attention"]


def flash_attention(q, k, v, *, doc_ids=None, window=0, softcap=0.0, scale=None, bounds=None):
    """Flash attention (Triton); see `triton.flash_attention`."""
    from deepwish.kernels.attention.triton import flash_attention as _fa
    return _fa(q, k, v, doc_ids=doc_ids, window=window, softcap=softcap, scale=scale, bounds=bounds)
