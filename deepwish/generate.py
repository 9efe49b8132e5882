"""Generation as free functions over a preallocated, static cache.

    prefill(model, tokens, cache)            -> logits of the last position   [B, V]
    decode_one_token(model, tok, pos, cache) -> logits for the next token     [B, V]
    sample(logits, temperature, top_k, top_p)
    generate(model, prompts, max_new_tokens, ...)

Every request starts from a clean cache: `generate` and `prefill` (from position 0) reset the
cache they are given, so a recurrent state (Gated DeltaNet) never carries one request into the
next; a positional cache would be overwritten anyway.

Prompts of different lengths share one batch without padding: the common prefix is prefilled
together, then each row keeps feeding its own prompt tokens (forced) through the one-token
decode step until it reaches its own end, after which it feeds what it samples. Every row
carries its own position, so this is exact for every cache kind (KV, latent, recurrent), where
padding would leak pad tokens into a recurrent state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from deepwish.model.cache import CacheFullError, ModelCache


@torch.no_grad()
def prefill(model, tokens: torch.Tensor, cache: ModelCache, start: int = 0) -> torch.Tensor:
    """Run tokens [B, T] at positions start..start+T-1 into `cache`; return last logits [B, V].
    start=0 begins a new request: the cache is reset first (start > 0 continues a chunked prefill)."""
    B, T = tokens.shape
    if start + T > cache.max_len:
        raise CacheFullError(f"prefill of {T} tokens from position {start} exceeds the cache length {cache.max_len}")
    if start == 0:
        cache.reset()
    pos = torch.arange(start, start + T, device=tokens.device).expand(B, T)
    return model(tokens, positions=pos, cache=cache, logits_to_keep=1).logits[:, -1].float()


@torch.no_grad()
def decode_one_token(model, token: torch.Tensor, position: torch.Tensor, cache: ModelCache) -> torch.Tensor:
    """token [B], position [B] -> logits [B, V] (fp32). Fixed shapes: graph-capturable.

    A position past the cache is an error, never a wrap: on CPU a CacheFullError here; on CUDA
    the check would cost a host sync per step, so there the cache's scatter raises a device-side
    index assertion instead."""
    if not position.is_cuda and int(position.max()) >= cache.max_len:
        raise CacheFullError(f"decode at position {int(position.max())} but the cache holds {cache.max_len} positions")
    return model(token[:, None], positions=position[:, None], cache=cache).logits[:, 0].float()


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> the distribution `sample` draws from [..., V] (fp32), temperature > 0.
    Speculative decoding needs it explicitly to accept/resample against the same distribution."""
    if temperature <= 0:
        raise ValueError("sampling_probs needs temperature > 0 (temperature 0 is argmax, not a distribution)")
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> tokens [B]. temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def _check_lengths(lens: list[int], max_new_tokens: int, cache_len: int, max_seq_len: int) -> None:
    if not lens or min(lens) < 1:
        raise ValueError("every prompt needs at least one token")
    need = max(lens) + max_new_tokens - 1
    if need > cache_len:
        raise CacheFullError(
            f"prompt of {max(lens)} tokens + {max_new_tokens} new tokens needs a cache of {need} positions, "
            f"but the cache holds {cache_len} (model max_seq_len {max_seq_len}); "
            f"shorten the prompt, ask for fewer tokens, or pass a larger cache_len")


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), cache_len: int | None = None, seed: int | None = None,
             on_token: Callable[[int, int], None] | None = None, cache: ModelCache | None = None,
             decode_fn: Callable | None = None) -> list[list[int]]:
    """Generate up to `max_new_tokens` per prompt; returns the new tokens of each row (a stop
    token, when hit, is included and ends that row). `on_token(row, token)` streams them.
    `decode_fn` replaces `decode_one_token` (e.g. a CUDA-graph-captured step). A given `cache`
    is reset before the request (by prefill), so consecutive requests on one cache are independent."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    prompts = [list(p) for p in prompts]
    lens = [len(p) for p in prompts]
    B = len(prompts)
    device = model.embed.weight.device
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    if cache is None:
        cache_len = cache_len or min(model.cfg.max_seq_len, max(lens) + max_new_tokens)
        _check_lengths(lens, max_new_tokens, cache_len, model.cfg.max_seq_len)
        cache = model.make_cache(B, cache_len)
    else:
        _check_lengths(lens, max_new_tokens, cache.max_len, model.cfg.max_seq_len)
    decode_fn = decode_fn or decode_one_token
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    stops = set(int(s) for s in stop_tokens)
    L0 = min(lens)
    prompt_t = torch.zeros(B, max(lens), dtype=torch.long)
    for b, p in enumerate(prompts):
        prompt_t[b, :len(p)] = torch.tensor(p)
    prompt_t = prompt_t.to(device)
    lens_t = torch.tensor(lens, device=device)
    logits = prefill(model, prompt_t[:, :L0], cache)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    pos = L0
    while True:
        nxt = sample(logits, temperature, top_k, top_p, gen)
        # rows still inside their prompt are forced to their next prompt token
        in_prompt = pos < lens_t
        forced = prompt_t[:, min(pos, prompt_t.shape[1] - 1)]
        feed = torch.where(in_prompt, forced, nxt)
        new = nxt.tolist()
        for b in range(B):
            if done[b] or pos < lens[b]:
                continue
            out[b].append(new[b])
            if on_token is not None:
                on_token(b, new[b])
            if new[b] in stops or len(out[b]) >= max_new_tokens:
                done[b] = True
        if all(done):
            break
        if pos >= cache.max_len:  # unreachable after _check_lengths; never clamp (that would overwrite a slot)
            raise CacheFullError(f"decode at position {pos} but the cache holds {cache.max_len} positions")
        position = torch.full((B,), pos, device=device)
        logits = decode_fn(model, feed, position, cache)
        pos += 1
    return out
