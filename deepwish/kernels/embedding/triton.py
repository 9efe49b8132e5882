"""Weight gradients of token-table lookups from one sort of the ids (reference.py says what is
summed). Shape legend: N positions, V table rows, D a table's width.

torch's dense embedding backward sorts the ids again for every table and reduces in several
passes; measured at 0.54 ms per [32,768 x 768] table on an H200 (gpt_124m's micro-batch, four
tables: 2.1 ms of a ~80-ms step, reports/speedrun.md run 5). Here the sort is done once for all
tables sharing the ids (`reference.segments`), and one kernel per table walks it: program (c, j)
owns the CHUNK sorted slots c·CHUNK.. and column block j, and sums, for each slot there that
starts its token's run, the run's gradient rows in blocks of BLOCK_N rows in a fixed order (a run
may reach past the chunk: the program that holds its start sums all of it), so the result does not
depend on scheduling (no atomics), and writes the token's row. Rows of tokens the batch does not
hold are the zeros the output starts from.

The first form, one program per sorted slot (most exiting at once, being inside a run), measured
2.64 ms for gpt_124m's four tables against torch's 2.20 (H200, 2026-12-04, `python -m
deepwish.bench.embedding`); not profiled, but ~200k programs a table for ~10k runs suggests the
programs' own cost. Chunks of 16 slots cut the programs 16-fold and keep enough of them resident
to hide the gathers' latency (4 warps, 128 columns); a frequent token's long run (~9% of the
positions for the bench's Zipf law) is one program's serial loop, in blocks of 64 rows. The
chunk and block sizes are reasoned, not yet timed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepwish.kernels.embedding.reference import segments

CHUNK = 16  # sorted slots a program owns
BLOCK_N = 64  # gradient rows summed per iteration (a frequent token's run takes many)


@triton.jit
def _run_sum_kernel(grad_ptr, order_ptr, tokens_ptr, ends_ptr, out_ptr, N, D, stride_g, stride_o,
                    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    c = tl.program_id(0)
    j = tl.program_id(1)
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    first = tl.cast(c, tl.int64) * CHUNK
    for k in range(0, CHUNK):
        i = first + k
        if i < N:
            token = tl.load(tokens_ptr + i)
            prev = tl.load(tokens_ptr + tl.maximum(i - 1, 0))
            if (i == 0) | (prev != token):  # slot i starts its token's run
                end = tl.load(ends_ptr + i)
                acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
                for k0 in range(i, end, BLOCK_N):
                    slots = k0 + tl.arange(0, BLOCK_N)
                    ok = slots < end
                    rows = tl.load(order_ptr + slots, mask=ok, other=0).to(tl.int64)
                    g = tl.load(grad_ptr + rows[:, None] * stride_g + cols[None, :],
                                mask=ok[:, None] & col_ok[None, :], other=0.0)
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
            _run_sum_kernel[(triton.cdiv(ids.numel(), CHUNK), triton.cdiv(D, block_d))](
                g, order, tokens, ends, dw, ids.numel(), D, g.stride(0), dw.stride(0), CHUNK=CHUNK, BLOCK_N=BLOCK_N,
                BLOCK_D=block_d, num_warps=4)
        out.append(dw)
    return out
