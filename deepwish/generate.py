"""Generation as free functions over a preallocated, static cache.

    prefill(model, tokens, cache)            -> logits of the last position   [B, V]
    decode_one_token(model, tok, pos, cache) -> logits for the next token     [B, V]
    sample(logits, temperature, top_k, top_p)
    generate(model, prompts, max_new_tokens, ...)            num_beams > 1: beam search per prompt
    beam_search(model, prompt, max_new_tokens, num_beams, ...) -> the best finished beams, scored
    generate_text(model, tokenizer, prompt, ...) -> the continuation as text (deepwish or HF tokenizer)

Every request starts from a clean cache: `generate` and `prefill` (from position 0) reset the
cache they are given, so a recurrent state (Gated DeltaNet) never carries one request into the
next; a positional cache would be overwritten anyway.

Prompts of different lengths share one batch without padding: the common prefix is prefilled
together, then each row keeps feeding its own prompt tokens (forced) through the one-token
decode step until it reaches its own end, after which it feeds what it samples. Every row
carries its own position, so this is exact for every cache kind (KV, latent, recurrent), where
padding would leak pad tokens into a recurrent state.

Beam search keeps `num_beams` rows of one static cache per prompt; after each step the cache is
reordered in place (`ModelCache.reorder`: index_select along the batch of every cache kind), so
the decode step, captured or not, keeps its shapes. Its selection follows HF transformers'
beam search exactly (greedy, not sampled): 2·num_beams candidates per step (more with several
stop tokens), a candidate ending in a stop token or at max_new_tokens becomes a finished
hypothesis only when it ranks among the first num_beams, scored sum(log p) / new_len^length_penalty;
`early_stopping` True / False / "never" as HF defines them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

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


def truncated_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> logits / temperature (fp32) with -inf outside the top-k / top-p set, the
    one truncation rule behind sampling (`sampling_probs`) and RL's log-probabilities
    (rl/rollout.sampling_log_probs). temperature > 0."""
    if temperature <= 0:
        raise ValueError("sampling needs temperature > 0 (temperature 0 is argmax, not a distribution)")
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
    return logits


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> the distribution `sample` draws from [..., V] (fp32), temperature > 0.
    Speculative decoding needs it explicitly to accept/resample against the same distribution."""
    return truncated_logits(logits, temperature, top_k, top_p).softmax(-1)


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
             decode_fn: Callable | None = None, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | Literal["never"] = False) -> list[list[int]]:
    """Generate up to `max_new_tokens` per prompt; returns the new tokens of each row (a stop
    token, when hit, is included and ends that row). `on_token(row, token)` streams them.
    `decode_fn` replaces `decode_one_token` (e.g. a CUDA-graph-captured step). A given `cache`
    is reset before the request (by prefill), so consecutive requests on one cache are independent.
    num_beams > 1: beam search (`beam_search`, temperature 0 only), the best beam of each prompt;
    a given `cache` then holds num_beams rows and serves the prompts one after another; on_token
    gets the chosen beam's tokens once it is final."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    prompts = [list(p) for p in prompts]
    if num_beams > 1:
        if temperature > 0 or top_k or top_p < 1.0:
            raise ValueError("beam search here is deterministic: num_beams > 1 needs temperature 0 and no top_k/top_p")
        out = []
        for row, p in enumerate(prompts):
            best = beam_search(model, p, max_new_tokens, num_beams, length_penalty=length_penalty,
                               early_stopping=early_stopping, stop_tokens=stop_tokens, cache_len=cache_len,
                               cache=cache, decode_fn=decode_fn)[0][0]
            for t in best:
                if on_token is not None:
                    on_token(row, t)
            out.append(best)
        return out
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams} must be >= 1")
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
    # a decode_fn that samples itself (decode_graph.CapturedSampler) returns tokens, not logits
    returns_tokens = getattr(decode_fn, "returns_tokens", False)
    gen = None
    if returns_tokens:
        want = SamplingConfig(temperature, top_k, top_p) if temperature > 0 else SamplingConfig()
        if decode_fn.sampling != want:
            raise ValueError(f"decode_fn samples with {decode_fn.sampling}, generate was asked for {want}")
        gen = decode_fn.generator  # the first token is drawn from it too, so the stream is the eager one
        if seed is not None and gen is not None:
            gen.manual_seed(seed)
    elif seed is not None:
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
    nxt = sample(logits, temperature, top_k, top_p, gen)
    # The next step is launched before the host reads this step's tokens: its input `feed` is already
    # on the device, so on a GPU the host's bookkeeping (stop tokens, streaming) overlaps the step
    # instead of leaving the GPU idle once per token. The tokens reach the host through a pinned
    # buffer and an event, which wait for the copy only, not for the step behind it. The cost: one
    # step computed past the last token (its cache slot is never read: the next request resets).
    host = torch.empty(B, dtype=torch.long, pin_memory=True) if device.type == "cuda" else None
    while True:
        # rows still inside their prompt are forced to their next prompt token
        in_prompt = pos < lens_t
        forced = prompt_t[:, min(pos, prompt_t.shape[1] - 1)]
        feed = torch.where(in_prompt, forced, nxt)
        if host is not None:
            host.copy_(nxt, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(device))
        ahead = None
        if pos < cache.max_len:  # else only reached when every row is done (after _check_lengths)
            ahead = decode_fn(model, feed, torch.full((B,), pos, device=device), cache)
            if returns_tokens:
                ahead = ahead.clone()  # the graph's buffer: the next call overwrites it
        if host is not None:
            copied.synchronize()
            new = host.tolist()
        else:
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
        if ahead is None:  # unreachable after _check_lengths; never clamp (that would overwrite a slot)
            raise CacheFullError(f"decode at position {pos} but the cache holds {cache.max_len} positions")
        nxt = ahead if returns_tokens else sample(ahead, temperature, top_k, top_p, gen)
        pos += 1
    return out


@torch.no_grad()
def beam_search(model, prompt: Sequence[int], max_new_tokens: int, num_beams: int, *, length_penalty: float = 1.0,
                early_stopping: bool | Literal["never"] = False, stop_tokens: Sequence[int] = (),
                num_return_sequences: int = 1, cache_len: int | None = None, cache: ModelCache | None = None,
                decode_fn: Callable | None = None) -> list[tuple[list[int], float]]:
    """The `num_return_sequences` best finished hypotheses of one prompt, best first, as (new
    tokens, score = sum of log-probabilities / len(new tokens) ** length_penalty). The search is
    HF transformers' (module docstring); `cache` must hold num_beams rows."""
    if num_beams < 1 or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"need num_beams >= 1 and 1 <= num_return_sequences <= num_beams, got {num_beams}, "
                         f"{num_return_sequences}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping={early_stopping!r} is not True, False or 'never'")
    prompt = list(prompt)
    L0, N = len(prompt), num_beams
    device = model.embed.weight.device
    if cache is None:
        cache_len = cache_len or min(model.cfg.max_seq_len, L0 + max_new_tokens)
        _check_lengths([L0], max_new_tokens, cache_len, model.cfg.max_seq_len)
        cache = model.make_cache(N, cache_len)
    else:
        if cache.batch != N:
            raise ValueError(f"beam search with num_beams={N} needs a cache of batch {N}, got {cache.batch}")
        _check_lengths([L0], max_new_tokens, cache.max_len, model.cfg.max_seq_len)
    decode_fn = decode_fn or decode_one_token
    stops = torch.tensor(sorted(set(int(s) for s in stop_tokens)), dtype=torch.long, device=device)
    K = max(2, 1 + len(stops)) * N  # candidates kept per step: enough to continue N beams past stops
    NEG = -1.0e9  # HF's "impossible" score; kept, not -inf, so that the arithmetic below matches it
    first_n = torch.arange(K, device=device) < N
    running = torch.zeros(N, max_new_tokens, dtype=torch.long, device=device)  # new tokens of each live beam
    running_score = torch.full((N,), NEG, device=device)
    running_score[0] = 0.0  # the N rows start identical: only the first one's continuations count
    done_seq = torch.zeros(N, max_new_tokens, dtype=torch.long, device=device)
    done_len = torch.zeros(N, dtype=torch.long, device=device)
    done_score = torch.full((N,), NEG, device=device)
    done_flag = torch.zeros(N, dtype=torch.bool, device=device)
    improvable = True
    if K > N * model.cfg.vocab_size:
        raise ValueError(f"beam search keeps {K} candidates per step but {N} beams x vocabulary "
                         f"{model.cfg.vocab_size} offer only {N * model.cfg.vocab_size}")
    logits = prefill(model, torch.tensor(prompt, device=device).expand(N, L0), cache)
    for t in range(max_new_tokens):  # t: new tokens before this step
        logp = (logits.float().log_softmax(-1) + running_score[:, None]).reshape(-1)
        V = logits.shape[-1]
        top_score, top_idx = logp.topk(K)
        beam, token = top_idx // V, top_idx % V
        cand = running[beam]
        cand[:, t] = token
        hits = torch.isin(token, stops) | (t + 1 >= max_new_tokens)  # [K]: stop token or length limit
        # the live beams: the best N candidates that did not finish
        live_score = top_score + hits.float() * NEG
        keep = live_score.topk(N).indices
        running, running_score, parent = cand[keep], live_score[keep], beam[keep]
        # finished hypotheses: candidates that finished among the first N, length-penalised
        fin = top_score / float(t + 1) ** length_penalty
        if bool(done_flag.all()) and early_stopping is True:
            fin = fin + NEG
        if not improvable:
            fin = fin + NEG
        fin = fin + (~(hits & first_n)).float() * NEG
        merged = torch.cat([done_score, fin]).topk(N).indices
        done_seq = torch.cat([done_seq, cand])[merged]
        done_len = torch.cat([done_len, torch.full((K,), t + 1, device=device)])[merged]
        done_flag = torch.cat([done_flag, hits & first_n])[merged]
        done_score = torch.cat([done_score, fin])[merged]
        # can a live beam still beat the worst finished one? (HF's heuristic, per early_stopping)
        best_len = max_new_tokens if early_stopping == "never" and length_penalty > 0 else t + 1
        best_live = float(running_score[0]) / float(best_len) ** length_penalty
        worst = torch.where(done_flag, done_score.min(), torch.full_like(done_score, NEG))
        improvable = improvable and bool((best_live > worst).any())
        if not improvable or (bool(done_flag.all()) and early_stopping is True) or bool(hits.all()):
            break
        cache.reorder(parent)
        position = torch.full((N,), L0 + t, device=device)
        logits = decode_fn(model, running[:, t], position, cache)
    return [(done_seq[i, :int(done_len[i])].tolist(), float(done_score[i])) for i in range(num_return_sequences)]


def _text_codec(tokenizer) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str], int | None]:
    """(encode, decode, eos id) of a deepwish `Tokenizer` or a transformers tokenizer (which
    encodes with its own special-token convention, e.g. a BOS, as HF's pipelines do)."""
    from deepwish.data.tokenizer import Tokenizer
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode, tokenizer.decode, tokenizer.eos_id
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:
        PreTrainedTokenizerBase = ()
    if PreTrainedTokenizerBase and isinstance(tokenizer, PreTrainedTokenizerBase):
        return (lambda s: tokenizer.encode(s)), (lambda ids: tokenizer.decode(ids, skip_special_tokens=False)), \
            tokenizer.eos_token_id
    raise TypeError(f"generate_text needs a deepwish Tokenizer (deepwish.data.tokenizer) or a transformers "
                    f"tokenizer, got {type(tokenizer).__name__}")


def generate_text(model, tokenizer, prompt: str | Sequence[str], max_new_tokens: int = 64, *,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 1,
                  length_penalty: float = 1.0, early_stopping: bool | Literal["never"] = False,
                  stop_at_eos: bool = True, seed: int | None = None) -> str | list[str]:
    """The continuation of `prompt` (a string, or a list of strings -> a list) as text, the
    prompt not repeated. Greedy by default; `temperature`/`top_k`/`top_p` sample, `num_beams`
    beam-searches. Generation stops at the tokenizer's eos (left out of the text) unless
    `stop_at_eos=False`. `tokenizer`: a deepwish `Tokenizer` or a transformers tokenizer."""
    encode, decode, eos = _text_codec(tokenizer)
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    ids = [encode(t) for t in texts]
    empty = [t for t, i in zip(texts, ids) if not i]
    if empty:
        raise ValueError(f"prompt {empty[0]!r} encodes to no tokens")
    stops = [eos] if stop_at_eos and eos is not None else []
    new = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stops,
                   seed=seed, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
    out = [decode(t[:-1] if stops and t and t[-1] == eos else t) for t in new]
    return out[0] if isinstance(prompt, str) else out
