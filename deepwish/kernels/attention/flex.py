"""Causal attention through torch's FlexAttention: the second fast path and a measured anchor.

Same semantics and shapes as `reference.attention`. The document/window structure is a
`BlockMask` built once per batch (`block_mask`) and shared by every layer of a forward; the
softcap is a score_mod. On CUDA the kernel is compiled once per shape (torch.compile); on the
CPU it runs eagerly (tests only: slow)."""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as _flex

from deepwish.kernels.attention.reference import check_inputs
from deepwish.kernels.documents import document_starts


@functools.cache
def _compiled():
    return torch.compile(_flex, dynamic=False)


def block_mask(B: int, T: int, doc_ids: torch.Tensor | None, window: int, device):
    """BlockMask of causal ∧ same document (runs of equal ids) ∧ within the window. One mask
    function for every case (document starts are zeros without documents, the window is a
    tensor), so the compiled kernel is specialised by shape only, never by option values."""
    if doc_ids is not None:
        starts = document_starts(doc_ids)
    else:
        starts = torch.zeros(B, T, dtype=torch.long, device=device)
    span = torch.tensor(window if window > 0 else 1 << 30, dtype=torch.int32, device=device)

    def visible(b, h, qi, ki):
        return (ki <= qi) & (ki > qi - span) & (starts[b, ki] == starts[b, qi])

    cuda = torch.device(device).type == "cuda"
    return create_block_mask(visible, B, None, T, T, device=device, _compile=cuda)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, doc_ids: torch.Tensor | None = None,
                   window: int = 0, softcap: float = 0.0, scale: float | None = None, mask=None) -> torch.Tensor:
    """q [B, T, H, Dqk], k [B, T, Hkv, Dqk], v [B, T, Hkv, Dv] -> [B, T, H, Dv]. `mask`: a BlockMask
    from `block_mask` for the same doc_ids/window (built here when None)."""
    check_inputs(q, k, v, doc_ids, window, softcap)
    B, T, H, D = q.shape
    if mask is None:
        mask = block_mask(B, T, doc_ids, window, q.device)
    score_mod = None
    if softcap > 0:
        def score_mod(s, b, h, qi, ki):
            return softcap * torch.tanh(s / softcap)
    fn = _compiled() if q.is_cuda else _flex
    o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod, block_mask=mask,
           scale=D ** -0.5 if scale is None else scale, enable_gqa=H != k.shape[2])
    return o.transpose(1, 2)
