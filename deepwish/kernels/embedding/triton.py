"""Weight gradients of token-table lookups from one sort of the ids (reference.py says what is
summed). Shape legend: N positions, V table rows, D a table's width.

torch's dense embedding backward sorts the ids again for every table and reduces in several
passes; measured at 0.54 ms per [32,768 x 768] table on an H200 (gpt_124m's micro-batch, four
tables: 2.1 ms of a ~80-ms step, reports/speedrun.md run 5). Here the sort is done once for all
tables sharing the ids (`reference.segments`), and one kernel per table walks it: program (i, j)
owns the run of equal tokens that starts at sorted slot i (slots inside a run exit at once) and
column block j; it sums the run's gradient rows in blocks of BLOCK_N rows in a fixed order, so the
result does not depend on scheduling (no atomics), and writes the token's row. Rows of tokens the
batch does not hold are the zeros the output starts from.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepwish.kernels.embedding.reference import segments

BLOCK_N = 32  # gradient rows summed per iteration (a run of one token is usually short: one block)


@triton.jit
def _run_sum_kernel(grad_ptr, order_ptr, tokens_ptr, ends_ptr, out_ptr, D, stride_g, stride_o,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    j = tl.program_id(1)
    token = tl.load(tokens_ptr + i)
    prev = tl.load(tokens_ptr + tl.maximum(i - 1, 0))
    if (i == 0) | (prev != token):  # slot i starts its token's run
        end = tl.load(ends_ptr + i)
        cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k0 in range(i, end, BLOCK_N):
            slots = k0 + tl.arange(0, BLOCK_N)
            ok = slots < end
            rows = tl.load(order_ptr + slots, mask=ok, other=0).to(tl.int64)
            g = tl.load(grad_ptr + rows[:, None] * stride_g + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                        other=0.0)
            acc += tl.sum(g.to(tl.float32), axis=0)
        tl.store(out_ptr + tl.cast(token, tl.int64) * stride_o + cols, acc, mask=col_ok)


def table_grads(ids: torch.Tensor, grads: list[torch.Tensor], num_embeddings: int) -> list[torch.Tensor]:
    """fp32 dW [V, D_k] for each output gradient grads[k] [N, D_k] of lookups at ids [N]."""
    ids = ids.reshape(-1)
    order, tokens, ends = segments(ids)
    out = []
    for g in grads:
        g = g.reshape(ids.numel(), -1)
        if g.stride(-1) != 1:
            g = g.contiguous()
        D = g.shape[1]
        dw = torch.zeros(num_embeddings, D, dtype=torch.float32, device=g.device)
        if ids.numel():
            block_d = min(128, triton.next_power_of_2(D))
            _run_sum_kernel[(ids.numel(), triton.cdiv(D, block_d))](
                g, order, tokens, ends, dw, D, g.stride(0), dw.stride(0), BLOCK_N=BLOCK_N, BLOCK_D=block_d,
                num_warps=4)
        out.append(dw)
    return out
