"""The one-token decode step captured as a CUDA graph over a preallocated cache.

A decode step of a small model is hundreds of tiny kernels; launched one by one from Python
the GPU mostly waits for the CPU. Every cache here has fixed shapes and every input of the
step is a [B] tensor, so the whole step (optionally fused by torch.compile first) is recorded
once and replayed with a single launch per token, as gpt-fast does (there through
`torch.compile(mode="reduce-overhead")`; here with an explicit `torch.cuda.CUDAGraph`, whose
buffers and warm-up we control).

    cache = model.make_cache(B, L)
    step = CapturedDecoder(model, cache)           # capture once; the cache is left zeroed
    out = generate(model, prompts, n, cache=cache, decode_fn=step)

Prefill stays outside the graph (its shapes change with the prompt) and writes into the very
tensors the graph reads. The captured step is `generate.decode_one_token` itself, so eager and
graph paths run the same kernels; on CPU there is nothing to capture and the eager step is the
path.

Rules the step must keep (checked by tests/test_decode_graph_gpu.py): no host synchronisation
inside it (`.item()`, `.tolist()`, `nonzero`, `bincount`, data-dependent shapes), and no
reallocation of cache tensors after capture.

Simplifications: one graph per (model, cache) pair, i.e. per batch size and cache length;
the logits buffer is the graph's own and is overwritten by the next call (copy it to keep it).
"""
from __future__ import annotations

import torch

from deepwish.generate import decode_one_token
from deepwish.model.cache import ModelCache


class CapturedDecoder:
    """decode_fn(model, token [B], position [B], cache) -> logits [B, V] (fp32), replayed from a
    CUDA graph bound to `model` and `cache`.

    compile: run the step through `torch.compile` (inductor fuses the elementwise work: norms,
    rotary, masks, SwiGLU) before capturing it. Compilation happens during warm-up.
    """

    def __init__(self, model, cache: ModelCache, compile: bool = False, warmup: int = 2):
        device = model.embed.weight.device
        if device.type != "cuda":
            raise ValueError(f"CapturedDecoder needs a CUDA model (got {device}); on CPU use decode_one_token")
        tensors = [t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
        off = sorted({str(t.device) for t in tensors if t.device != device})
        if off:
            raise ValueError(f"cache tensors on {off}, model on {device}: build the cache with model.make_cache")
        if warmup < 1:
            raise ValueError("warmup must be >= 1 (kernels must be loaded and autotuned before capture)")
        self.model, self.cache, self.compiled = model, cache, compile
        B = cache.batch
        self.token = torch.zeros(B, dtype=torch.long, device=device)
        self.position = torch.zeros(B, dtype=torch.long, device=device)
        step = torch.compile(decode_one_token, dynamic=False) if compile else decode_one_token
        # Warm up on a side stream (cuBLAS workspaces, Triton autotuning and compilation happen
        # here, outside the graph), as torch.cuda.graphs documents.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(model, self.token, self.position, cache)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(model, self.token, self.position, cache)
        # Warm-up wrote token 0 at position 0 of every layer and advanced recurrent states.
        cache.reset()

    @property
    def batch(self) -> int:
        return self.token.shape[0]

    def __call__(self, model, token: torch.Tensor, position: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        if model is not self.model or cache is not self.cache:
            raise ValueError("this captured step is bound to the model and cache it was captured with")
        if token.shape != self.token.shape or position.shape != self.position.shape:
            raise ValueError(f"captured for batch {self.batch}: token {tuple(token.shape)} / position "
                             f"{tuple(position.shape)} must both be [{self.batch}]")
        self.token.copy_(token)
        self.position.copy_(position)
        self.graph.replay()
        return self.logits
