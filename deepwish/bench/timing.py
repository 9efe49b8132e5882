"""How the benchmarks time a GPU call and compare two results: one definition of each, so every
report's figures mean the same thing.

- `median_ms`: median milliseconds of `triton.testing.do_bench` after one untimed call (compilation
  and autotuning stay out of the timing).
- `graph_ms`: the same for one call replayed from a CUDA graph of `calls` calls: launch and host
  costs out, as a captured decode step or a compiled training block sees the kernels.
- `rel_rms`: ||out - ref|| / ||ref|| in float64, the error measure of every correctness check.
"""
from __future__ import annotations

from typing import Callable

import torch


def median_ms(fn: Callable, grad_to_none=None, warmup: int = 25, rep: int = 100) -> float:
    import triton.testing
    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                         return_mode="median"))


def capture(fn: Callable, calls: int = 1):
    """(graph, what the last captured call returned): `fn` run once on a side stream (the warm-up
    torch.cuda.graphs asks for), then `calls` times into one CUDA graph. Replaying the graph
    rewrites the returned tensors in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            out = fn()
    return g, out


def graph_ms(fn: Callable, calls: int = 10, warmup: int = 10, rep: int = 50) -> float:
    import triton.testing
    g, _ = capture(fn, calls)
    return float(triton.testing.do_bench(g.replay, warmup=warmup, rep=rep, return_mode="median")) / calls


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return float((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30))
