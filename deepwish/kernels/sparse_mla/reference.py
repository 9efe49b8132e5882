"""Sparse MLA attention, pure torch in fp32: the CPU path and the test oracle of `triton.py`.

DeepSeek-V3.2's sparse attention in the weight-absorbed (MQA) form: every query head attends to
the same latent rows of the cache, only at the K slots the indexer selected for that token.

Shapes:
    q        [B, T, H, Dqk]  queries (q_nope absorbed through W_UK, then q_pe; Dqk = 576 at V3 sizes)
    kv       [B, S, Dqk]     latent cache rows (c_kv, then k_pe); values are kv[..., :dv]
    indices  [B, T, K]       int key slots in [0, S), -1 = unused
    o        [B, T, H, dv]   o = softmax(scale · q·kᵀ over the selected slots) · v
    lse      [B, T, H]       fp32 natural-log sum of exp of the scaled scores; -inf (and o = 0)
                             for a row that selects nothing

The arithmetic is fp32 (float64 for float64 inputs, and then lse is float64 too, so the oracle
itself can be checked to float64 precision).

A slot listed twice counts twice (a gather, as the Triton kernel does); the indexer's top-k never
lists one twice. The kernel knows no mask beyond -1: causality and document bounds are the
indexer's business.
"""
from __future__ import annotations

import torch


def check_inputs(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, dv: int) -> None:
    """Shape and dtype checks shared by every backend (no look at values: no host sync)."""
    if q.dim() != 4:
        raise ValueError(f"sparse_mla: q must be [B, T, H, Dqk], got shape {tuple(q.shape)}")
    B, T, H, D = q.shape
    if kv.dim() != 3 or kv.shape[0] != B or kv.shape[2] != D:
        raise ValueError(f"sparse_mla: kv must be [B, S, Dqk] = [{B}, S, {D}] to match q, got {tuple(kv.shape)}")
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (B, T):
        raise ValueError(f"sparse_mla: indices must be [B, T, K] = [{B}, {T}, K], got {tuple(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sparse_mla: indices must be int32 or int64, got {indices.dtype}")
    if not 0 < dv <= D:
        raise ValueError(f"sparse_mla: dv must be in (0, Dqk={D}], got {dv}")
    if q.dtype != kv.dtype:
        raise ValueError(f"sparse_mla: q and kv must share a dtype, got {q.dtype} and {kv.dtype}")
    if q.device != kv.device or q.device != indices.device:
        raise ValueError(f"sparse_mla: q, kv, indices on different devices ({q.device}, {kv.device}, {indices.device})")


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def sparse_mla(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, *, dv: int,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) by gathering the selected rows: memory B·T·K·Dqk, so small shapes only.

    Differentiable in q and kv (autograd through the gather scatters dkv over every query that
    selected a slot) and through lse."""
    check_inputs(q, kv, indices, dv)
    S = kv.shape[1]
    # values are checked on the CPU only: on CUDA it would be a host sync per call
    if not indices.is_cuda and indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= S):
        raise ValueError(f"sparse_mla: indices must lie in [-1, {S}), got [{int(indices.min())}, {int(indices.max())}]")
    B, T, K = indices.shape
    ct = _compute_dtype(q)
    valid = indices >= 0                                                     # [B, T, K]
    slot = indices.long().clamp_min(0)
    rows = torch.gather(kv.to(ct), 1, slot.reshape(B, T * K, 1).expand(-1, -1, kv.shape[2]))
    rows = rows.reshape(B, T, K, -1)                                         # [B, T, K, Dqk]
    s = torch.einsum("bthd,btkd->bthk", q.to(ct), rows) * scale
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                         # [B, T, H]
    # exp(-inf - -inf) is nan for an empty row: its probabilities are 0 and so is its output
    p = torch.exp(s - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    o = torch.einsum("bthk,btkd->bthd", p, rows[..., :dv])
    return o.to(q.dtype), lse


def sparse_mla_dense(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, *, dv: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (o, lse) through a dense [B, T, S] -inf mask built with scatter_ (as DeepSeek-V3.2's
    reference code does): memory B·T·H·S, the second oracle. Here a slot listed twice counts once."""
    check_inputs(q, kv, indices, dv)
    B, T, K = indices.shape
    S = kv.shape[1]
    keep = torch.zeros(B, T, S + 1, dtype=torch.bool, device=q.device)
    # -1 goes to the spare column S, dropped below
    keep.scatter_(2, torch.where(indices >= 0, indices.long(), S), True)
    keep = keep[..., :S]
    ct = _compute_dtype(q)
    s = torch.einsum("bthd,bsd->bths", q.to(ct), kv.to(ct)) * scale
    s = s.masked_fill(~keep[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    o = torch.einsum("bths,bsd->bthd", p, kv.to(ct)[..., :dv])
    return o.to(q.dtype), lse
