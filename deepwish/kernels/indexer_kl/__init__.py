"""DSA's sparse-stage indexer loss at the selected slots (model/dsa_rows.py `sparse_kl`):

    I, P = scores_and_target(q, w, k, q_abs, kv, lse, indices, index_scale=..., attn_scale=...)
    dq, dw, dk = scores_backward(q, w, k, indices, g, index_scale=...)

I [B,T,K] fp32: the index scores Σ_h w_h·relu(index_scale·q_h·k_s) at each selected slot s
(-inf at unused slots, -1); P [B,T,K] fp32: the main attention's probabilities summed over its
heads, Σ_h exp(attn_scale·q_abs_h·kv_s − lse_h), from the sparse attention's own lse [B,T,H]
(0 at unused slots). The KL itself is then a few [B,T,K] operations. scores_backward: the
gradients of Σ g·I (g [B,T,K] fp32, 0 at unused slots) in q, w, k, fp32.

`reference` (pure torch, gathers [B,T,K,·]: small shapes, the oracle) and `triton` (kernels
that gather the rows tile by tile: nothing of size T·K·D is written)."""
from deepwish.kernels.indexer_kl import reference

__all__ = ["reference"]
