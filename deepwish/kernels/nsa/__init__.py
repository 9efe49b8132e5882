"""Native Sparse Attention kernels (arXiv 2502.11089): the compressed branch with the block scoring
and top-n selection, and the selected-block branch. The window branch is plain causal attention
(kernels/attention); the compression MLP, gates and cache belong to model/nsa.py, whose cached
decoding step takes two more kernels from here: `compress.py` (the blocks a chunk ends, compressed
into the cache in one launch) and `gates.py` (the gated sum of the three branches).

    o_cmp, sel_idx = nsa_compressed(q, k_cmp, v_cmp, cmp_end, q_pos=..., doc_ids=..., cmp_len=l,
                                    select_len=64, n_select=16, n_init=1, n_local=2, scale=..., backend=...)
    o_slc = nsa_selected(q, k, v, sel_idx, q_pos=..., doc_ids=..., select_len=64, scale=..., backend=...)

Shapes, visibility and the exact selection rule: reference.py's docstring. Backends: `torch`
(reference.py, fp32 dense masks: the CPU path and oracle) and `triton` (triton.py, imported on
first use). `auto` is triton on CUDA, torch elsewhere; resolve once with `resolve_nsa_backend`
and pass the resolved name on every call."""
from __future__ import annotations


import torch

from deepwish.kernels.backend import resolve_triton_or_torch
from deepwish.kernels.nsa import reference
from deepwish.kernels.nsa.reference import check_compressed, check_selected
from deepwish.kernels.pdl import setting

__all__ = ["reference", "resolve_nsa_backend", "nsa_compressed", "nsa_selected"]


def resolve_nsa_backend(requested: str, device: torch.device | str, announce: bool = True) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere (printed when announce); a named backend
    that cannot run here raises BackendError."""
    return resolve_triton_or_torch("nsa", "deepwish.kernels.nsa.triton", requested, torch.device(device), announce)


def nsa_compressed(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, cmp_end: torch.Tensor, *,
                   q_pos: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None, cmp_len: int,
                   select_len: int = 64, n_select: int = 16, n_init: int = 1, n_local: int = 2,
                   scale: float | None = None, S: int | None = None, backend: str = "auto",
                   pdl: bool | str = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_cmp [B, T, H, Dv], sel_idx [B, T, Hkv, n_select] int32): attention over the visible
    compressed tokens, and each KV group's top-n selection blocks (reference.py's rule).
    Differentiable in q, k_cmp, v_cmp. q_pos or doc_ids must be given (the row length). S: the
    raw row length (the raw keys' count, or a cache's length: any S past the last query selects
    the same blocks); without it and without doc_ids the torch backend reads max(q_pos) from the
    device (a host synchronisation, which a captured graph cannot hold). pdl: the Triton backend's
    decoding launches with programmatic dependent launch (kernels/pdl.py; the torch backend has none)."""
    setting(pdl, "nsa_compressed")
    check_compressed(q, k_cmp, v_cmp, cmp_end, q_pos, doc_ids, cmp_len, select_len, n_select, n_init, n_local)
    backend = resolve_nsa_backend(backend, q.device, announce=False)
    kw = dict(q_pos=q_pos, doc_ids=doc_ids, cmp_len=cmp_len, select_len=select_len, n_select=n_select,
              n_init=n_init, n_local=n_local, scale=scale)
    if backend == "torch":
        return reference.nsa_compressed(q, k_cmp, v_cmp, cmp_end, S=S, **kw)
    from deepwish.kernels.nsa.triton import nsa_compressed as _triton_compressed
    return _triton_compressed(q, k_cmp, v_cmp, cmp_end, pdl=pdl, **kw)


def nsa_selected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel_idx: torch.Tensor, *,
                 q_pos: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None, select_len: int = 64,
                 scale: float | None = None, backend: str = "auto", pdl: bool | str = False) -> torch.Tensor:
    """o_slc [B, T, H, Dv]: each query head over the visible raw keys of its group's selected blocks.
    Differentiable in q, k, v. pdl: as nsa_compressed's."""
    setting(pdl, "nsa_selected")
    check_selected(q, k, v, sel_idx, q_pos, doc_ids, select_len)
    backend = resolve_nsa_backend(backend, q.device, announce=False)
    kw = dict(q_pos=q_pos, doc_ids=doc_ids, select_len=select_len, scale=scale)
    if backend == "torch":
        return reference.nsa_selected(q, k, v, sel_idx, **kw)
    from deepwish.kernels.nsa.triton import nsa_selected as _triton_selected
    return _triton_selected(q, k, v, sel_idx, pdl=pdl, **kw)
