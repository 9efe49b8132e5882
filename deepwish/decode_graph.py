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
    sampler = CapturedSampler(model, cache, SamplingConfig(0.7, top_p=0.9))   # sampling in the graph too
    out = generate(model, prompts, n, temperature=0.7, top_p=0.9, seed=0, cache=cache, decode_fn=sampler)

Prefill stays outside the graph (its shapes change with the prompt) and writes into the very
tensors the graph reads. The captured step is `generate.decode_one_token` itself, so eager and
graph paths run the same kernels; on CPU there is nothing to capture and the eager step is the
path.

Rules the step must keep (checked by tests/test_decode_graph_gpu.py): no host synchronisation
inside it (`.item()`, `.tolist()`, `nonzero`, `bincount`, data-dependent shapes), and no
reallocation of cache tensors after capture.

`CapturedSteps` does the same for fixed chunk lengths T (e.g. 1 and k+1 for speculative
decoding, whose verification forward is otherwise launch-bound); lengths not captured run
eagerly through the same function.

Simplifications: one graph per (model, cache, T), i.e. per batch size, cache length and chunk
length; the logits buffer is the graph's own and is overwritten by the next call (copy it to
keep it). torch.compile recompiles per shape: past dynamo's recompile limit it would run
eagerly, so a long-lived process capturing many shapes should reset dynamo between them.
"""
from __future__ import annotations

import torch

from deepwish.generate import decode_one_token
from deepwish.model.cache import CacheFullError, ModelCache


@torch.no_grad()
def chunk_logits(model, tokens: torch.Tensor, positions: torch.Tensor, cache: ModelCache) -> torch.Tensor:
    """tokens, positions [B, T] -> logits [B, T, V] (fp32): a prefill or verification chunk."""
    if not positions.is_cuda and int(positions.max()) >= cache.max_len:
        raise CacheFullError(f"chunk reaches position {int(positions.max())} but the cache holds {cache.max_len}")
    return model(tokens, positions=positions, cache=cache).logits.float()


class _Graph:
    """fn(model, *inputs, cache) captured once over static input buffers shaped like `shapes`."""

    def __init__(self, fn, model, cache: ModelCache, shapes: list[tuple[int, ...]], compile: bool, warmup: int,
                 generators: tuple[torch.Generator, ...] = ()):
        device = model.embed.weight.device
        if device.type != "cuda":
            raise ValueError(f"CUDA-graph capture needs a CUDA model (got {device}); on CPU run the step eagerly")
        tensors = [t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
        off = sorted({str(t.device) for t in tensors if t.device != device})
        if off:
            raise ValueError(f"cache tensors on {off}, model on {device}: build the cache with model.make_cache")
        if warmup < 1:
            raise ValueError("warmup must be >= 1 (kernels must be loaded and autotuned before capture)")
        self.inputs = [torch.zeros(s, dtype=torch.long, device=device) for s in shapes]
        step = torch.compile(fn, dynamic=False) if compile else fn
        # Warm up on a side stream (cuBLAS workspaces, Triton autotuning and compilation happen
        # here, outside the graph), as torch.cuda.graphs documents.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(model, *self.inputs, cache)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        for g in generators:  # each replay then draws from the generator's current state, as eager would
            self.graph.register_generator_state(g)
        with torch.cuda.graph(self.graph):
            self.output = step(model, *self.inputs, cache)
        # Warm-up wrote token 0 at position 0 of every layer and advanced recurrent states.
        cache.reset()

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        for buf, a in zip(self.inputs, args):
            if a.shape != buf.shape:
                raise ValueError(f"captured for inputs of shape {tuple(buf.shape)}, got {tuple(a.shape)}")
            buf.copy_(a)
        self.graph.replay()
        return self.output


class CapturedDecoder:
    """decode_fn(model, token [B], position [B], cache) -> logits [B, V] (fp32), replayed from a
    CUDA graph bound to `model` and `cache` (generate's `decode_fn`).

    compile: run the step through `torch.compile` (inductor fuses the elementwise work: norms,
    rotary, masks, SwiGLU) before capturing it. Compilation happens during warm-up.
    Capture leaves the cache zeroed: build the decoder before prefilling.
    """

    def __init__(self, model, cache: ModelCache, compile: bool = False, warmup: int = 2, step=decode_one_token):
        # step: a function with decode_one_token's signature (e.g. rl/rollout.py's fp32-head step)
        self.model, self.cache, self.compiled = model, cache, compile
        self.batch = cache.batch
        self._graph = _Graph(step, model, cache, [(cache.batch,), (cache.batch,)], compile, warmup)

    def __call__(self, model, token: torch.Tensor, position: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        if model is not self.model or cache is not self.cache:
            raise ValueError("this captured step is bound to the model and cache it was captured with")
        if token.shape != (self.batch,) or position.shape != (self.batch,):
            raise ValueError(f"captured for batch {self.batch}: token {tuple(token.shape)} / position "
                             f"{tuple(position.shape)} must both be [{self.batch}]")
        return self._graph(token, position)


class CapturedSampler:
    """decode_fn(model, token [B], position [B], cache) -> the next tokens [B] (int64): the one-token
    step and `generate.sample` captured together in one CUDA graph, so picking a token costs no
    launch of its own and no copy of the logits ([B, V] fp32) leaves the graph. `generate` takes it
    as its `decode_fn` (it reads `returns_tokens`) and samples only the first token, from the
    prefill logits, itself, with `generator`.

    sampling: greedy at temperature 0, else temperature / top_k / top_p as `generate.sample`.
    Sampled tokens equal the eager path's for the same generator state: the graph replays the
    same kernels, and `generator` (this sampler's own, registered with the graph; `generate`
    seeds it from its `seed`) advances at each replay exactly as an eager call advances it. With
    compile=True, inductor draws its random numbers its own way: greedy tokens are still the eager
    ones, sampled tokens are a different (equally distributed) stream.
    The returned tensor is the graph's own and is overwritten by the next call: copy it to keep it.
    """

    returns_tokens = True

    def __init__(self, model, cache: ModelCache, sampling=None, compile: bool = False, warmup: int = 2,
                 step=decode_one_token):
        from deepwish.generate import SamplingConfig, sample
        self.model, self.cache, self.compiled = model, cache, compile
        self.batch = cache.batch
        sampling = sampling or SamplingConfig()
        if sampling.temperature <= 0:  # greedy: top_k / top_p play no part
            sampling = SamplingConfig()
        self.sampling = sampling
        device = model.embed.weight.device
        self.generator = torch.Generator(device=device) if sampling.temperature > 0 else None

        def step_and_sample(model, token, position, cache):
            logits = step(model, token, position, cache)
            return sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, self.generator)

        self._graph = _Graph(step_and_sample, model, cache, [(cache.batch,), (cache.batch,)], compile, warmup,
                             generators=() if self.generator is None else (self.generator,))

    def __call__(self, model, token: torch.Tensor, position: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        if model is not self.model or cache is not self.cache:
            raise ValueError("this captured sampler is bound to the model and cache it was captured with")
        if token.shape != (self.batch,) or position.shape != (self.batch,):
            raise ValueError(f"captured for batch {self.batch}: token {tuple(token.shape)} / position "
                             f"{tuple(position.shape)} must both be [{self.batch}]")
        return self._graph(token, position)


class CapturedSteps:
    """step(model, tokens [B, T], positions [B, T], cache) -> logits [B, T, V] (fp32): replayed from
    a CUDA graph when T is one of `lengths`, else `chunk_logits` run eagerly (prefill, odd chunks).
    Speculative decoding takes one for the target (lengths (1, k+1)) and one for the draft.
    Capture leaves the cache zeroed: build it before prefilling."""

    def __init__(self, model, cache: ModelCache, lengths: tuple[int, ...] = (1,), compile: bool = False,
                 warmup: int = 2):
        if not lengths or min(lengths) < 1:
            raise ValueError(f"lengths {lengths}: chunk lengths must be >= 1")
        self.model, self.cache = model, cache
        B = cache.batch
        self.graphs = {T: _Graph(chunk_logits, model, cache, [(B, T), (B, T)], compile, warmup) for T in lengths}

    def __call__(self, model, tokens: torch.Tensor, positions: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        if model is not self.model or cache is not self.cache:
            raise ValueError("these captured steps are bound to the model and cache they were captured with")
        g = self.graphs.get(tokens.shape[1])
        return chunk_logits(model, tokens, positions, cache) if g is None else g(tokens, positions)
