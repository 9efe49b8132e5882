"""Token-table lookups W_k[ids] for several tables read at the same ids, with the weight gradients
of all of them from one sort of the ids: `reference` (pure torch, the oracle) and `triton` (the
run-sum kernel). `lookups` dispatches by the model's `embed_backend` setting (config.py)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from deepwish.kernels.embedding import reference

__all__ = ["reference", "lookups"]


class _Lookups(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, *weights):
        ctx.save_for_backward(ids)
        ctx.set_materialize_grads(False)  # an unused table's output gradient stays None: no work for it
        ctx.tables = [(w.shape[0], w.dtype) for w in weights]
        return tuple(F.embedding(ids, w) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        from deepwish.kernels.embedding import triton as kernel
        (ids,) = ctx.saved_tensors
        wanted = [k for k, g in enumerate(grads) if g is not None and ctx.needs_input_grad[1 + k]]
        dws = kernel.table_grads(ids, [grads[k] for k in wanted], ctx.tables[0][0])
        out = [None] * len(grads)
        for k, dw in zip(wanted, dws):
            out[k] = dw.to(ctx.tables[k][1])
        return (None, *out)


def lookups(ids: torch.Tensor, weights: list[torch.Tensor], backend: str) -> list[torch.Tensor]:
    """[W_k[ids] for W_k in weights] (tables of one vocabulary). backend 'torch': F.embedding each
    (torch's backward, a sort per table); 'triton': the same lookups, whose backward sorts the ids
    once and sums each token's gradient rows with kernels/embedding/triton.py."""
    if backend == "torch" or not torch.is_grad_enabled() or not any(w.requires_grad for w in weights):
        return [F.embedding(ids, w) for w in weights]
    if backend != "triton":
        raise ValueError(f"embedding lookups: unknown backend {backend!r}; choose torch or triton")
    if not ids.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("embedding lookups: backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 "
                         "on the CPU); model.embed_backend=torch runs anywhere")
    if len({w.shape[0] for w in weights}) != 1:
        raise ValueError(f"embedding lookups: the tables' vocabularies differ ({[w.shape[0] for w in weights]})")
    return list(_Lookups.apply(ids, *weights))
