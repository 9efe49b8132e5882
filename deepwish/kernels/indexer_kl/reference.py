"""The sparse-stage indexer loss's scores and target at the selected slots, pure torch (the oracle
of triton.py); see the package doc. Gathers [B, T, K, D]: small shapes only."""
from __future__ import annotations

import torch


def _rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x [B,S,D] at indices [B,T,K] (-1 reads slot 0) -> [B,T,K,D]."""
    B, T, K = indices.shape
    slot = indices.long().clamp_min(0).reshape(B, T * K, 1).expand(-1, -1, x.shape[-1])
    return torch.gather(x, 1, slot).reshape(B, T, K, -1)


def scores_and_target(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_abs: torch.Tensor, kv: torch.Tensor,
                      lse: torch.Tensor, indices: torch.Tensor, *, index_scale: float,
                      attn_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B,T,Hi,Di], w [B,T,Hi], k [B,S,Di], q_abs [B,T,H,D], kv [B,S,D], lse [B,T,H] (natural
    log of the attention over the same slots), indices [B,T,K] -> I, P [B,T,K] fp32."""
    keep = indices >= 0
    z = torch.einsum("bthd,btkd->bthk", q.float(), _rows(k, indices).float()) * index_scale
    i = torch.einsum("bth,bthk->btk", w.float(), torch.relu(z)).masked_fill(~keep, float("-inf"))
    s = torch.einsum("bthd,btkd->bthk", q_abs.float(), _rows(kv, indices).float()) * attn_scale
    # a row that selects nothing (lse = -inf) has every slot unused: masked to 0 like the rest
    p = torch.exp(s - lse.float()[:, :, :, None]).sum(2).masked_fill(~keep, 0.0)
    return i, p


def scores_backward(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, indices: torch.Tensor, g: torch.Tensor, *,
                    index_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of Σ g·I in q, w, k (fp32), g [B,T,K] fp32 (0 at unused slots)."""
    q, w, k = (t.detach().float().requires_grad_() for t in (q, w, k))
    with torch.enable_grad():
        z = torch.einsum("bthd,btkd->bthk", q, _rows(k, indices)) * index_scale
        i = torch.einsum("bth,bthk->btk", w, torch.relu(z))
        dq, dw, dk = torch.autograd.grad((i * g.masked_fill(indices < 0, 0.0)).sum(), (q, w, k))
    return dq, dw, dk
