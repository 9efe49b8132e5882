"""Packed documents as the kernels see them: a document is a maximal run of equal ids in a row of
doc_ids [B, T], and a token's document is described by where its run starts and ends. One
definition for every attention mechanism (flash attention, FlexAttention masks, NSA, block-sparse),
so they cannot disagree on what a document boundary is."""
from __future__ import annotations

import torch


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] int64: position of the first token of each token's document."""
    B, T = doc_ids.shape
    pos = torch.arange(T, device=doc_ids.device).expand(B, T)
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), dim=1).values


def document_ends(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] int64: one past the last token of each token's document."""
    T = doc_ids.shape[1]
    return T - document_starts(doc_ids.flip(1)).flip(1)  # T - (T-1 - last) = last + 1
