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


def kernel_times(step: Callable, iters: int = 10, warmup: int = 3, rows: int = 12) -> dict:
    """GPU time per call of `step` by kernel (torch.profiler): {'kernels': [{name, us_per_step,
    calls_per_step}] longest first (the first `rows`), 'sum_ms': all kernels' time a step}. Beside
    a timed span it tells kernel time from the gaps between kernels."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        us = getattr(e, "cuda_time_total", 0.0) if us is None else us
        if us > 0:
            out.append({"name": e.key[:90], "us_per_step": us / iters, "calls_per_step": e.count / iters})
    out.sort(key=lambda r: -r["us_per_step"])
    return {"kernels": out[:rows], "sum_ms": sum(r["us_per_step"] for r in out) / 1e3}
