"""Block-sparse causal attention masks (GPT family, `B` layers of model.window_pattern).

Tokens are grouped in blocks of WINDOW_BLOCK by their position (positions restart in each packed
document, so a document's blocks are its own). A query in block i sees a key in block j <= i when

    i - j < local                      (local dense blocks, the diagonal one causal token by token)
    or stride > 0 and (i - j) % stride == 0   (periodic long-distance links)

and the key is causal (k_pos <= q_pos) and in the query's document. stride = 1 links every
earlier block: full causal attention, the neutral value. The window schedule's cap applies to
`local` (model/attention.py).

The same rule serves three consumers: the dense boolean mask of the SDPA/torch paths and of
cached decoding (from positions: a decode step's keys are cache slots = positions), and the
FlexAttention BlockMask (block-sparse work on CUDA). `visible_reference` is the loop it is tested
against.
"""
from __future__ import annotations

import torch

from deepwish.config import WINDOW_BLOCK


def block_links(q_pos: torch.Tensor, k_pos: torch.Tensor, local: int, stride: int) -> torch.Tensor:
    """Broadcasting q_pos [..., Tq, 1] against k_pos [..., 1, Tk] -> bool: causal and within the
    local blocks or on a long link (no document test)."""
    d = torch.div(q_pos, WINDOW_BLOCK, rounding_mode="floor") - torch.div(k_pos, WINDOW_BLOCK, rounding_mode="floor")
    linked = d < local
    if stride > 0:
        linked = linked | (d % stride == 0)
    return (k_pos <= q_pos) & linked


def block_sparse_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, local: int, stride: int,
                      q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, Tq, Tk] of the block rule (module docstring) from positions [B, Tq] / [B, Tk]
    (and document ids, for packed training input)."""
    m = block_links(q_pos[:, :, None], k_pos[:, None, :], local, stride)
    if q_doc is not None:
        m = m & (k_doc[:, None, :] == q_doc[:, :, None])
    return m[:, None]


def flex_block_sparse_mask(positions: torch.Tensor, doc_ids: torch.Tensor | None, local: int, stride: int):
    """The same rule as a FlexAttention BlockMask over one forward's [B, T] positions/documents."""
    from torch.nn.attention.flex_attention import create_block_mask

    from deepwish.kernels.documents import document_starts

    B, T = positions.shape
    device = positions.device
    starts = document_starts(doc_ids) if doc_ids is not None else torch.zeros(B, T, dtype=torch.long, device=device)
    pos = positions.to(torch.int32)

    def visible(b, h, qi, ki):
        return block_links(pos[b, qi], pos[b, ki], local, stride) & (starts[b, ki] == starts[b, qi])

    return create_block_mask(visible, B, None, T, T, device=device, _compile=device.type == "cuda")


def visible_reference(q_pos: list[int], k_pos: list[int], local: int, stride: int) -> list[list[bool]]:
    """The rule written out, one pair at a time (tests)."""
    out = []
    for qp in q_pos:
        row = []
        for kp in k_pos:
            d = qp // WINDOW_BLOCK - kp // WINDOW_BLOCK
            row.append(kp <= qp and (d < local or (stride > 0 and d % stride == 0)))
        out.append(row)
    return out


def mean_visible_keys(seq_len: int, local: int, stride: int) -> float:
    """Keys a query sees on average over a row of seq_len tokens (FLOP counts)."""
    total = 0
    for qb in range(-(-seq_len // WINDOW_BLOCK)):
        rows = min(WINDOW_BLOCK, seq_len - qb * WINDOW_BLOCK)  # queries in this block
        earlier = sum(1 for d in range(1, qb + 1) if d < local or (stride > 0 and d % stride == 0))
        total += rows * earlier * WINDOW_BLOCK + rows * (rows + 1) // 2  # linked blocks + the causal diagonal
    return total / seq_len
