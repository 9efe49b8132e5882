"""Rollouts: G sampled completions per prompt through the model's own cache and decode step,
with the per-token log-probabilities of the distribution each token was drawn from.

    sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0)
    roll = rollout(model, prompts, group_size=G, max_new_tokens=256, sampling=sampling,
                   stop_tokens=[eos], cache=cache, decode_fn=CapturedDecoder(model, cache))
    logp = completion_logprobs(model, roll, sampling)      # the same quantity from a full forward

Prefill once per prompt, copy to the group: prompts are prefilled (batched by length, each
row at its own positions) into a cache of P rows, whose every tensor is then copied along the
batch dimension into the group cache of P·G rows (row p·G + g is sample g of prompt p). Rows
keep their own positions during decoding (decode_one_token takes a position per row), so
prompts of different lengths need no padding in any cache kind (KV, latent, recurrent).

Sampler and trainer agree on the distribution: `sampling_log_probs` (temperature, then top-k,
then top-p, exactly generate.sampling_probs) is what the sampler draws from and records, and
what `completion_logprobs` evaluates on a full forward. The draw itself is the exponential
race (argmax p / E, E ~ Exp(1)), which samples from p without a host synchronisation.

The decode loop checks for "every row stopped" every `sync_every` steps only; rows that have
stopped keep decoding (their tokens are masked), so the step stays a fixed-shape graph replay.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from deepwish.generate import SamplingConfig, decode_one_token, prefill, truncated_logits
from deepwish.model.cache import CacheFullError, ModelCache


def sampling_log_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> log of the sampling distribution [..., V] (fp32; -inf outside the
    top-k / top-p set): generate.truncated_logits, the same rule `sample` draws with."""
    return truncated_logits(logits, temperature, top_k, top_p).log_softmax(-1)


def draw(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B], their log-probabilities [B]; zeros when greedy)."""
    if sampling.temperature <= 0:
        return logits.argmax(-1), torch.zeros(logits.shape[0], device=logits.device)
    logp = sampling_log_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    race = torch.empty_like(logp).exponential_(1.0, generator=generator)
    tok = (logp.exp() / race).argmax(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def head_logits(model, h: torch.Tensor, fp32: bool) -> torch.Tensor:
    """Final hidden states [..., d] -> logits [..., V] (fp32). fp32=True: the head's matmul in fp32
    even under autocast. bf16 logits are rounded to steps of 1/16 at |logit| >= 8 and 1/8 at
    >= 16, so a sampler and a trainer whose hidden states differ by kernel order alone can
    round a logit differently by a whole step: a ratio off by e^(1/8) ~ 1.13 from rounding only."""
    if not fp32:
        return model.logits(h).float()
    with torch.autocast(h.device.type, enabled=False):
        return h.float() @ model.head_weight.float().t()


@torch.no_grad()
def decode_fp32_head(model, token: torch.Tensor, position: torch.Tensor, cache: ModelCache) -> torch.Tensor:
    """decode_one_token with the LM head in fp32 (the trunk as the caller's autocast has it)."""
    h = model(token[:, None], positions=position[:, None], cache=cache, logits_to_keep=1, return_hidden=True).hidden
    return head_logits(model, h[:, 0], True)


@torch.no_grad()
def prefill_fp32_head(model, tokens: torch.Tensor, cache: ModelCache) -> torch.Tensor:
    """generate.prefill (from position 0) with the LM head in fp32: last logits [B, V]."""
    cache.reset()
    B, T = tokens.shape
    pos = torch.arange(T, device=tokens.device).expand(B, T)
    h = model(tokens, positions=pos, cache=cache, logits_to_keep=1, return_hidden=True).hidden
    return head_logits(model, h[:, -1], True)


@dataclass
class Rollout:
    """One batch of sampled completions, row p·G + g = sample g of prompt p."""

    tokens: torch.Tensor  # [N, L] prompt then completion, right-padded with 0
    prompt_lens: torch.Tensor  # [N]
    completion_lens: torch.Tensor  # [N] (a stop token, when drawn, is included)
    logprobs: torch.Tensor  # [N, T] sampler's log-probabilities of the completion tokens (0 past the end)
    truncated: torch.Tensor  # [N] bool: no stop token within max_new_tokens
    group_size: int
    seconds: float = 0.0  # wall time of prefill + decode

    @property
    def completion_mask(self) -> torch.Tensor:
        T = self.logprobs.shape[1]
        return torch.arange(T, device=self.logprobs.device)[None] < self.completion_lens[:, None]

    def completions(self) -> list[list[int]]:
        toks, p, c = self.tokens.tolist(), self.prompt_lens.tolist(), self.completion_lens.tolist()
        return [row[a:a + n] for row, a, n in zip(toks, p, c)]

    @property
    def new_tokens(self) -> int:
        return int(self.completion_lens.sum())


def cache_tensors(cache: ModelCache) -> list[torch.Tensor]:
    """Every tensor of every layer cache, in a fixed order (all are batch-first)."""
    return [t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]


@torch.no_grad()
def copy_to_groups(src: ModelCache, dst: ModelCache, rows: torch.Tensor) -> None:
    """dst row i <- src row rows[i], for every cache tensor, in place (a captured graph keeps
    reading the same storage)."""
    s, d = cache_tensors(src), cache_tensors(dst)
    if len(s) != len(d) or any(a.shape[1:] != b.shape[1:] for a, b in zip(s, d)):
        raise ValueError("the prompt cache and the group cache differ in layout (build both with the same model "
                         "and max_len)")
    for a, b in zip(s, d):
        b.copy_(a.index_select(0, rows.to(a.device)))


@torch.no_grad()
def rollout(model, prompts: list[list[int]], group_size: int, max_new_tokens: int, sampling: SamplingConfig,
            stop_tokens=(), *, cache: ModelCache | None = None, decode_fn=None,
            generator: torch.Generator | None = None, sync_every: int = 16,
            cache_dtype: torch.dtype | None = None, head_fp32: bool = False) -> Rollout:
    """Sample `group_size` completions of up to `max_new_tokens` for each prompt (module
    docstring). cache: a group cache of len(prompts)·group_size rows (reused across calls; a
    CapturedDecoder bound to it is `decode_fn`); built here when None. head_fp32: the LM head in
    fp32 for prefill and (when no decode_fn is given) decoding; a given decode_fn must match."""
    P, G = len(prompts), group_size
    if P == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if G < 1 or max_new_tokens < 1:
        raise ValueError(f"group_size ({G}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    device = model.embed.weight.device
    lens = [len(p) for p in prompts]
    need = max(lens) + max_new_tokens - 1
    N = P * G
    if cache is None:
        cache = model.make_cache(N, min(model.cfg.max_seq_len, max(need, 1)), dtype=cache_dtype)
    if cache.batch != N:
        raise ValueError(f"the group cache holds {cache.batch} rows; {P} prompts x {G} samples need {N}")
    if need > cache.max_len:
        raise CacheFullError(f"prompts of up to {max(lens)} tokens + {max_new_tokens} new tokens need "
                             f"{need} positions; the cache holds {cache.max_len}")
    decode_fn = decode_fn or (decode_fp32_head if head_fp32 else decode_one_token)
    do_prefill = prefill_fp32_head if head_fp32 else prefill
    t0 = time.perf_counter()
    # prefill: prompts of one length together, into a P-row cache laid out like the group cache
    first = cache_tensors(cache)[0]
    pcache = model.make_cache(P, cache.max_len, dtype=first.dtype, device=device)
    last = torch.zeros(P, model.cfg.vocab_size, device=device)
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        by_len.setdefault(n, []).append(i)
    tmp = None
    for n, idx in sorted(by_len.items()):
        ids = torch.tensor([prompts[i] for i in idx], device=device)
        if len(by_len) == 1:
            last = do_prefill(model, ids, pcache)
            break
        tmp = model.make_cache(len(idx), cache.max_len, dtype=first.dtype, device=device)
        last[idx] = do_prefill(model, ids, tmp)
        for a, b in zip(cache_tensors(tmp), cache_tensors(pcache)):
            b.index_copy_(0, torch.tensor(idx, device=device), a)
    del tmp
    group_rows = torch.arange(P, device=device).repeat_interleave(G)
    copy_to_groups(pcache, cache, group_rows)
    del pcache
    logits = last.index_select(0, group_rows)
    prompt_lens = torch.tensor(lens, device=device).repeat_interleave(G)
    out_tok = torch.zeros(N, max_new_tokens, dtype=torch.long, device=device)
    out_logp = torch.zeros(N, max_new_tokens, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    length = torch.full((N,), max_new_tokens, dtype=torch.long, device=device)
    stops = torch.tensor(sorted(set(int(s) for s in stop_tokens)), dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        tok, logp = draw(logits, sampling, generator)
        out_tok[:, t] = tok
        out_logp[:, t] = logp
        if stops.numel():
            hit = torch.isin(tok, stops) & ~done
            length = torch.where(hit, t + 1, length)
            done |= hit
        if t + 1 == max_new_tokens or ((t + 1) % sync_every == 0 and bool(done.all())):
            break
        logits = decode_fn(model, tok, prompt_lens + t, cache)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    T = int(length.max())
    out_logp = out_logp[:, :T] * (torch.arange(T, device=device)[None] < length[:, None])
    L = max(lens) + T
    tokens = torch.zeros(N, L, dtype=torch.long, device=device)
    col = torch.arange(L, device=device)[None]
    prompt_t = torch.zeros(P, max(lens), dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_t[i, :len(p)] = torch.tensor(p)
    tokens[:, :max(lens)] = prompt_t.to(device).index_select(0, group_rows)
    tokens.masked_fill_(col >= prompt_lens[:, None], 0)
    src = (col - prompt_lens[:, None]).clamp(0, T - 1)
    comp = out_tok[:, :T].gather(1, src)
    in_comp = (col >= prompt_lens[:, None]) & (col < (prompt_lens + length)[:, None])
    tokens = torch.where(in_comp, comp, tokens)
    return Rollout(tokens=tokens, prompt_lens=prompt_lens, completion_lens=length, logprobs=out_logp,
                   truncated=~done, group_size=G, seconds=seconds)


def completion_positions(roll_prompt_lens: torch.Tensor, T: int) -> torch.Tensor:
    """[N, T] index of the position whose logits predict completion token j: prompt_len + j - 1."""
    return roll_prompt_lens[:, None] - 1 + torch.arange(T, device=roll_prompt_lens.device)[None]


def completion_logprobs(model, tokens: torch.Tensor, prompt_lens: torch.Tensor, T: int, sampling: SamplingConfig,
                        *, with_entropy: bool = False, head_fp32: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities [n, T] of the completion tokens of `tokens` [n, L] (one full forward,
    with grad when enabled) under the sampling distribution, and its entropy [n, T] (detached)
    when asked. Only the completion positions go through the head."""
    n, L = tokens.shape
    pos = completion_positions(prompt_lens, T).clamp(max=L - 1)
    h = model(tokens, logits_to_keep=1, return_hidden=True).hidden  # [n, L, d]
    h = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))
    logp_all = sampling_log_probs(head_logits(model, h, head_fp32), sampling.temperature, sampling.top_k,
                                  sampling.top_p)
    target = tokens.gather(1, (pos + 1).clamp(max=L - 1))
    logp = logp_all.gather(-1, target[..., None]).squeeze(-1)
    ent = None
    if with_entropy:
        with torch.no_grad():
            p = logp_all.exp()
            ent = -(p * logp_all.masked_fill(p == 0, 0)).sum(-1)
    return logp, ent
