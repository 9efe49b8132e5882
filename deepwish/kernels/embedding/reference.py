"""Token-table lookups and their weight gradients, the readable reference.

Several tables [V, D_k] are read at the same token ids (the GPT family's token embedding and its
value-embedding tables): out_k = W_k[ids]. The gradient of table k sums, for every token v, the
output gradients of the positions holding v:

    dW_k[v] = sum over {i : ids[i] = v} of g_k[i]        (0 for tokens the batch does not hold)

`segments` orders the positions by token (a stable sort: positions of one token keep their order),
which is what makes the sums deterministic; the Triton kernel sums each token's run of positions
from it."""
from __future__ import annotations

import torch


def segments(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [N] -> (order [N]: positions sorted by token, stably; tokens [N] = ids[order];
    ends [N]: for each sorted slot, one past the last slot of its token's run)."""
    tokens, order = torch.sort(ids, stable=True)
    ends = torch.searchsorted(tokens, tokens, right=True)
    return order, tokens, ends


def table_grad(ids: torch.Tensor, grad: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """dW [V, D] in fp32 from ids [N] and the lookup's output gradient grad [N, D]: each token's
    positions summed in position order."""
    dw = torch.zeros(num_embeddings, grad.shape[-1], dtype=torch.float32, device=grad.device)
    return dw.index_put_((ids,), grad.float(), accumulate=True)
