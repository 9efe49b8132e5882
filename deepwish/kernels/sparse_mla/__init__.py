"""Sparse MLA attention (DeepSeek-V3.2 DSA) over indexer-selected slots, weight-absorbed form:

    o, lse = sparse_mla(q, kv, indices, dv=512, scale=..., backend="auto")

q [B, T, H, Dqk], kv [B, S, Dqk] (values = kv[..., :dv]), indices [B, T, K] int (-1 = unused)
-> o [B, T, H, dv] in q's dtype, lse [B, T, H] fp32 (natural log; -inf and o = 0 for a row that
selects nothing). Differentiable in q and kv (and through lse). Training/prefill and decoding
(T = 1 or k + 1 over a static cache) take the same entry point.

Backends: `torch` (reference.py: fp32 gather, the CPU path and oracle) and `triton` (triton.py,
imported on first use). `auto` is triton on CUDA, torch elsewhere. Resolve once with
`resolve_sparse_mla_backend` and pass the resolved name on every call."""
from __future__ import annotations


import torch

from deepwish.kernels.backend import BackendError, resolve_triton_or_torch
from deepwish.kernels.sparse_mla import reference
from deepwish.kernels.sparse_mla.reference import check_inputs

__all__ = ["reference", "resolve_sparse_mla_backend", "sparse_mla"]


def resolve_sparse_mla_backend(requested: str, device: torch.device | str, announce: bool = True) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere (printed when announce); a named backend
    that cannot run here raises BackendError."""
    return resolve_triton_or_torch("sparse_mla", "deepwish.kernels.sparse_mla.triton", requested,
                                   torch.device(device), announce)


def sparse_mla(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, *, dv: int = 512,
               scale: float, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of sparse attention of q over the kv rows listed in indices; see the module doc.
    `backend` 'auto' is resolved here silently on every call: prefer resolving once (a resolved
    name goes straight to its path: nothing here for torch.compile or a CUDA graph to trip on)."""
    check_inputs(q, kv, indices, dv)
    if backend not in ("torch", "triton"):
        backend = resolve_sparse_mla_backend(backend, q.device, announce=False)
    if backend == "torch":
        return reference.sparse_mla(q, kv, indices, dv=dv, scale=scale)
    try:
        from deepwish.kernels.sparse_mla.triton import sparse_mla as _triton_sparse_mla
    except ImportError as e:
        raise BackendError(f"sparse_mla: backend 'triton' was requested but cannot be imported ({e})") from e
    return _triton_sparse_mla(q, kv, indices, dv=dv, scale=scale)
