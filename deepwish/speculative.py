"""Speculative decoding: a cheap proposer guesses k tokens, the target checks them in one forward.

    speculative_generate(target, draft, prompt, n, k=4, ...)   a separate draft model
    mtp_speculative_generate(model, prompt, n, ...)            the model's own MTP heads (DeepSeek-V3)

Each round (Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating LLM decoding with speculative sampling"):
  1. the draft proposes d_1..d_k autoregressively, with distributions q_1..q_k;
  2. the target runs [pending token, d_1..d_k] at positions n-1..n-1+k in one forward, giving
     p_1..p_{k+1};
  3. d_i is accepted with probability min(1, p_i(d_i)/q_i(d_i)); at the first rejection the
     token is drawn from norm(max(0, p_i - q_i)); if all k pass, a bonus token from p_{k+1}.
Every emitted token is then distributed exactly as the target's (after the same temperature /
top-k / top-p filter, `generate.sampling_probs`). Greedy (temperature 0) accepts d_i iff it is
the target's argmax, so the output equals plain greedy decoding token for token.

Caches. Tokens are "pending" until fed: before a round both caches hold positions 0..n-2 and
seq[n-1] is fed first. KV and latent caches are indexed by position, so rejected tokens' slots
are simply rewritten before any later query can see them: rolling back is forgetting how far
the cache is valid. A recurrent cache (Gated DeltaNet) has folded the rejected tokens into its
state, so its tensors are snapshotted before the round and restored after a rejection; the
accepted tokens are then re-fed at the head of the next round's chunk (no extra forward).

Fallback. A round costs one target forward plus k draft forwards, ~ (1 + k·c) target forwards
with c the draft/target cost ratio (default: ratio of active parameter counts, since decoding
is bandwidth-bound), and yields (accepted + 1) tokens. When the mean over the last `window`
rounds falls to the break-even 1 + k·c or below, the draft is dropped, a notice is printed,
and decoding continues with the target alone (`stats.fallback_at`).

Simplifications: one sequence at a time (speculation is a latency tool; batching rows that
accept different counts is not done here); k is fixed (shortened only near max_new_tokens); the
cost of verifying k+1 tokens is taken as one decode step; rejected slots of a ring
(sliding-window) cache need the ring's slack >= k + 1, checked up front.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from deepwish.generate import sampling_probs
from deepwish.model.cache import CacheFullError, KVCache, MLACache, ModelCache

POSITIONAL_CACHES = (KVCache, MLACache)  # entries indexed by position: rollback needs no copy


def _is_positional(layer) -> bool:
    """KV-like caches (a slot per position). Anything else is treated as a recurrent state and
    snapshotted: always correct, merely a copy when the layer was positional after all."""
    from deepwish.model.ring_cache import RingKVCache
    return isinstance(layer, POSITIONAL_CACHES + (RingKVCache,)) or getattr(layer, "POSITIONAL", False)


@dataclass
class SpeculativeStats:
    k: int
    cost_ratio: float  # draft step cost / target step cost used by the fallback rule
    rounds: int = 0  # speculation rounds (one target verification each)
    proposed: int = 0  # draft tokens offered
    accepted: int = 0  # draft tokens accepted
    target_forwards: int = 0  # verifications + target-only steps
    draft_forwards: int = 0
    new_tokens: int = 0
    fallback_at: int | None = None  # new-token count when the draft was dropped, or None
    seconds: float = 0.0
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def expected_speedup(self) -> float:
        """Over plain decoding, from the rounds played: tokens per round / round cost (in target
        steps). 1.0 when no round was played."""
        if not self.rounds:
            return 1.0
        per_round = (self.accepted + self.rounds) / self.rounds
        return per_round / (1 + self.k * self.cost_ratio)

    def summary(self) -> str:
        fb = "" if self.fallback_at is None else f", draft dropped after {self.fallback_at} tokens"
        return (f"{self.new_tokens} tokens in {self.target_forwards} target forwards "
                f"({self.tokens_per_target_forward:.2f}/forward), acceptance {self.acceptance_rate:.1%} "
                f"over {self.rounds} rounds of k={self.k}, expected speed-up {self.expected_speedup:.2f}x{fb}")


class _Stream:
    """One model and its cache over the shared token sequence; positions < `fed` are valid."""

    def __init__(self, model, cache: ModelCache, step: Callable | None, keep_hidden: bool = False):
        self.model, self.cache, self.step = model, cache, step
        self.fed = 0
        # final-normed hidden state of every fed position (MTP drafts start from them)
        self.hidden = (torch.zeros(cache.max_len, model.cfg.d_model, device=model.embed.weight.device,
                                   dtype=model.embed.weight.dtype) if keep_hidden else None)
        self.state = [t for layer in cache.layers if not _is_positional(layer)
                      for t in vars(layer).values() if isinstance(t, torch.Tensor)]
        self._snapshot: tuple[list[torch.Tensor], int] | None = None
        self.device = model.embed.weight.device

    def feed(self, tokens: list[int], n_logits: int) -> torch.Tensor:
        """Run `tokens` at positions fed..fed+T-1; logits [n_logits, V] (fp32) of the last positions."""
        T = len(tokens)
        if self.fed + T > self.cache.max_len:
            raise CacheFullError(f"speculative step needs position {self.fed + T - 1}, "
                                 f"the cache holds {self.cache.max_len}")
        tok = torch.tensor(tokens, device=self.device)
        pos = torch.arange(self.fed, self.fed + T, device=self.device)
        if self.step is not None and self.hidden is None:
            logits = self.step(self.model, tok[None], pos[None], self.cache)[0, -n_logits:]
        else:
            out = self.model(tok[None], positions=pos[None], cache=self.cache, logits_to_keep=n_logits,
                             return_hidden=self.hidden is not None)
            logits = out.logits[0].float()
            if self.hidden is not None:
                self.hidden[self.fed:self.fed + T] = out.hidden[0]
        self.fed += T
        return logits

    def snapshot(self) -> None:
        if self.state:
            self._snapshot = ([t.clone() for t in self.state], self.fed)

    def rollback(self, valid: int) -> None:
        """Keep exactly the first `valid` positions (valid <= fed)."""
        if valid >= self.fed:
            return
        if not self.state:
            self.fed = valid
            return
        saved, fed = self._snapshot
        if valid < fed:
            raise RuntimeError(f"cannot roll back to {valid}: the snapshot holds {fed} positions")
        for t, s in zip(self.state, saved):
            t.copy_(s)
        self.fed = fed  # the accepted tokens after the snapshot are re-fed next round


def accept_tokens(p: torch.Tensor, q: torch.Tensor | None, draft: list[int], temperature: float,
                  generator: torch.Generator | None) -> tuple[int, int]:
    """The verification rule. p [k+1, V]: target logits (greedy) or probabilities (sampling);
    q [k, V]: draft probabilities (sampling only). Returns (accepted count a, next token)."""
    k = len(draft)
    if temperature <= 0:
        target = p.argmax(-1).tolist()
        a = next((i for i in range(k) if draft[i] != target[i]), k)
        return a, target[a]
    d = torch.tensor(draft, device=p.device, dtype=torch.long)
    if k:
        idx = torch.arange(k, device=p.device)
        p_d, q_d = p[idx, d], q[idx, d]
        u = torch.rand(k, device=p.device, generator=generator)
        ok = (u * q_d < p_d).tolist()  # u < p/q without dividing; q_d > 0 since d_i ~ q_i
        a = next((i for i in range(k) if not ok[i]), k)
    else:
        a = 0
    if a < k:
        residual = (p[a] - q[a]).clamp_min(0)
        # residual mass is 0 only if p_a == q_a, where rejection has probability 0; guard rounding
        dist = residual if float(residual.sum()) > 0 else p[a]
    else:
        dist = p[k]
    return a, int(torch.multinomial(dist / dist.sum(), 1, generator=generator))


def _draw(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
          generator: torch.Generator | None) -> tuple[int, torch.Tensor | None]:
    """One token from logits [V]: the argmax at temperature 0, else a draw from the sampling
    distribution, returned with it (a draft's distribution is what the verification rule weighs)."""
    if temperature <= 0:
        return int(logits.argmax()), None
    q = sampling_probs(logits[None], temperature, top_k, top_p)[0]
    return int(torch.multinomial(q, 1, generator=generator)), q


def _check_ring_slack(cache: ModelCache, k: int, who: str) -> None:
    from deepwish.model.ring_cache import RingKVCache
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, RingKVCache) and layer.slack < k + 1:
            raise ValueError(f"{who} layer {i}: ring cache slack {layer.slack} < k+1 = {k + 1}; rejected draft "
                             f"tokens would evict keys still in the window (make the ring cache with slack >= k+1)")


def _target_stream(target, prompt: Sequence[int], max_new_tokens: int, k: int, cache: ModelCache | None,
                   step: Callable | None, keep_hidden: bool = False) -> _Stream:
    if not prompt:
        raise ValueError("the prompt needs at least one token")
    if k < 1:
        raise ValueError(f"k={k}: speculation needs k >= 1 draft tokens")
    need = len(prompt) + max_new_tokens - 1
    cache = cache if cache is not None else target.make_cache(1, min(target.cfg.max_seq_len, need))
    if cache.batch != 1:
        raise ValueError(f"speculative decoding runs one sequence; the target cache has batch {cache.batch}")
    if need > cache.max_len:
        raise CacheFullError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens needs {need} positions, "
                             f"the target cache holds {cache.max_len}")
    _check_ring_slack(cache, k, "target")
    if step is not None and getattr(step, "cache", cache) is not cache:
        raise ValueError("the target step was captured on another cache: pass that cache as target_cache")
    cache.reset()  # a recurrent state is not overwritten by position: start every request from zero
    return _Stream(target, cache, step, keep_hidden)


def _speculate(tgt: _Stream, propose: Callable, prompt: Sequence[int], max_new_tokens: int, k: int,
               temperature: float, top_k: int, top_p: float, stop_tokens: Sequence[int], seed: int | None,
               stats: SpeculativeStats, window: int, fallback: bool,
               after_round: Callable[[int, int], None]) -> list[int]:
    """The loop shared by draft-model and MTP speculation. `propose(seq, n, k_eff, generator)`
    returns (draft tokens, draft probabilities [k_eff, V] or None), or None when it cannot
    propose yet (a target-only step is taken); `after_round(n, a)` rolls the proposer's state
    back to the accepted prefix."""
    prompt = [int(t) for t in prompt]
    gen = None
    device = tgt.device
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    stops = {int(s) for s in stop_tokens}
    seq = list(prompt)
    out: list[int] = []
    recent: deque[int] = deque(maxlen=window)
    break_even = 1 + k * stats.cost_ratio
    speculating = True
    t0 = time.perf_counter()
    while len(out) < max_new_tokens:
        n = len(seq)
        remaining = max_new_tokens - len(out)
        k_eff = min(k, remaining - 1) if speculating else 0
        proposal = propose(seq, n, k_eff, gen) if k_eff > 0 else None
        if proposal is None:  # target alone: the last token, after the fallback, or nothing to draft from
            logits = tgt.feed(seq[tgt.fed:n], 1)
            stats.target_forwards += 1
            new = [_draw(logits[-1], temperature, top_k, top_p, gen)[0]]
        else:
            drafts, q = proposal
            stats.draft_forwards += k_eff
            tgt.snapshot()
            logits = tgt.feed(seq[tgt.fed:n] + drafts, k_eff + 1)
            stats.target_forwards += 1
            p = logits if temperature <= 0 else sampling_probs(logits, temperature, top_k, top_p)
            a, nxt = accept_tokens(p, q, drafts, temperature, gen)
            tgt.rollback(n + a)
            after_round(n, a)
            new = drafts[:a] + [nxt]
            stats.rounds += 1
            stats.proposed += k_eff
            stats.accepted += a
            stats.accepted_per_round.append(a)
            recent.append(a + 1)
            if fallback and len(recent) == window and sum(recent) / window <= break_even:
                speculating = False
                tgt.hidden = None  # no more drafts: the captured steps may serve the target alone
                stats.fallback_at = len(out) + len(new)
                print(f"speculative: draft dropped after {stats.rounds} rounds: "
                      f"{sum(recent) / window:.2f} tokens per target forward over the last {window} rounds <= "
                      f"break-even 1 + k·c = {break_even:.2f} (k={k}, cost ratio c={stats.cost_ratio:.3f}); "
                      f"continuing with the target alone", file=sys.stderr)  # a diagnostic: stdout is the text
        for t in new:
            seq.append(t)
            out.append(t)
            if t in stops or len(out) >= max_new_tokens:
                break
        if out and (out[-1] in stops):
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - t0
    stats.new_tokens = len(out)
    return out


def _active_params(model) -> int:
    return model.num_params(active=True)


@torch.no_grad()
def speculative_generate(target, draft, prompt: Sequence[int], max_new_tokens: int, k: int = 4,
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         stop_tokens: Sequence[int] = (), seed: int | None = None, cost_ratio: float | None = None,
                         window: int = 8, fallback: bool = True,
                         target_cache: ModelCache | None = None, draft_cache: ModelCache | None = None,
                         target_step: Callable | None = None, draft_step: Callable | None = None,
                         ) -> tuple[list[int], SpeculativeStats]:
    """New tokens of one prompt (a stop token, when hit, is included and ends it) and the stats.

    cost_ratio: draft step / target step cost (default: active-parameter ratio).
    window, fallback: drop the draft when the mean tokens per round over the last `window`
    rounds is <= 1 + k·cost_ratio (fallback=False keeps speculating).
    *_cache: preallocated batch-1 caches (the ones the steps were captured on);
    *_step: step(model, tokens [1, T], positions [1, T], cache) -> logits [1, T, V] for every
    feed, e.g. `decode_graph.CapturedSteps(target, target_cache, lengths=(1, k + 1))` and
    `CapturedSteps(draft, draft_cache, lengths=(1, 2))` on GPU; None runs eagerly.
    """
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"draft vocabulary {draft.cfg.vocab_size} != target vocabulary {target.cfg.vocab_size}")
    c = _active_params(draft) / _active_params(target) if cost_ratio is None else float(cost_ratio)
    stats = SpeculativeStats(k=k, cost_ratio=c)
    need = len(prompt) + max_new_tokens - 1
    dcache = draft_cache if draft_cache is not None else draft.make_cache(1, min(draft.cfg.max_seq_len, need))
    if dcache.batch != 1 or dcache.max_len < need:
        raise CacheFullError(f"the draft cache (batch {dcache.batch}, {dcache.max_len} positions) must be batch 1 "
                             f"with >= {need} positions")
    _check_ring_slack(dcache, k, "draft")
    tgt = _target_stream(target, prompt, max_new_tokens, k, target_cache, target_step)
    if draft_step is not None and getattr(draft_step, "cache", dcache) is not dcache:
        raise ValueError("the draft step was captured on another cache: pass that cache as draft_cache")
    dcache.reset()
    drf = _Stream(draft, dcache, draft_step)

    def propose(seq, n, k_eff, gen):
        drf.snapshot()
        logits = drf.feed(seq[drf.fed:n], 1)[-1]
        tokens, qs = [], []
        for i in range(k_eff):
            token, q = _draw(logits, temperature, top_k, top_p, gen)
            tokens.append(token)
            if q is not None:
                qs.append(q)
            if i < k_eff - 1:
                logits = drf.feed(tokens[-1:], 1)[-1]
        return tokens, (torch.stack(qs) if qs else None)

    def after_round(n, a):
        drf.rollback(min(drf.fed, n + a))

    out = _speculate(tgt, propose, prompt, max_new_tokens, k, temperature, top_k, top_p, stop_tokens, seed,
                     stats, window, fallback, after_round)
    return out, stats


def _mtp_active_params(model) -> tuple[int, int]:
    """(active parameters of the MTP modules + the shared head they use, of the trunk + head)."""
    return (model.num_params(active=True, mtp=True) + model.head_weight.numel(),
            model.num_params(active=True, mtp=False))


@torch.no_grad()
def mtp_speculative_generate(model, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                             top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
                             seed: int | None = None, cost_ratio: float | None = None, window: int = 8,
                             fallback: bool = True, cache: ModelCache | None = None,
                             step: Callable | None = None) -> tuple[list[int], SpeculativeStats]:
    """Self-speculation with the model's own multi-token-prediction modules (DeepSeek-V3 §2.2,
    §5.4.3: the MTP module "can be repurposed for speculative decoding").

    With D modules, each round drafts k = D tokens: at the last position i whose main hidden
    state is known, depth 1 reads h_i and Emb(t_{i+1}) (the pending token) and predicts t_{i+2},
    depth j reads depth j-1's output and Emb(d_{j-1}). Each depth keeps a cache for its block and
    is run over every position it has not yet seen with known inputs, so its attention sees the
    whole prefix exactly as in training. Positions whose inputs included a draft are rewritten
    the next round (the MTP blocks are MLA, position-indexed). The main model's hidden states
    come from its verification forwards, so `step` (logits only, as in `speculative_generate`)
    serves only target-alone steps after a fallback. Same arguments and output as
    `speculative_generate`.
    """
    if model.mtp is None:
        raise ValueError("the model has no MTP modules (n_mtp == 0): use speculative_generate with a draft model")
    D = len(model.mtp)
    prompt = [int(t) for t in prompt]
    mtp_params, trunk_params = _mtp_active_params(model)
    c = mtp_params / trunk_params if cost_ratio is None else float(cost_ratio)
    stats = SpeculativeStats(k=D, cost_ratio=c)
    tgt = _target_stream(model, prompt, max_new_tokens, D, cache, step, keep_hidden=True)
    caches = model.make_mtp_caches(1, tgt.cache.max_len)
    for j, c_j in enumerate(caches):
        if not _is_positional(c_j):
            raise ValueError(f"MTP depth {j + 1}: its block's cache {type(c_j).__name__} is not position-indexed; "
                             "rolling back a recurrent MTP state is not implemented")
    hidden = [tgt.hidden] + [torch.zeros_like(tgt.hidden) for _ in range(D)]
    fed = [0] * (D + 1)  # fed[j]: positions < fed[j] of depth j (cache and hidden) hold exact values
    valid_main = [0]  # positions < this have exact main hidden states

    if len(prompt) >= 2:  # the main hidden states of the prompt but its last (pending) token
        tgt.feed(prompt[:-1], 1)
        stats.target_forwards += 1
        valid_main[0] = len(prompt) - 1

    ran = [0]  # depths run in the current round

    def propose(seq, n, k_eff, gen):
        valid_main[0] = max(valid_main[0], tgt.fed)  # target-only steps feed exact positions
        if n < 2 or valid_main[0] < n - 1:
            return None
        ran[0] = k_eff
        ext = list(seq)
        tokens, qs = [], []
        dev = tgt.device
        for j in range(1, k_eff + 1):
            s = fed[j]
            pos = torch.arange(s, n - 1, device=dev)
            ahead = torch.tensor(ext[s + j:n - 1 + j], device=dev)
            h = model.mtp_hidden(j, hidden[j - 1][s:n - 1][None], ahead[None], pos[None], cache=caches[j - 1])[0]
            hidden[j][s:n - 1] = h
            logits = model.logits(h[-1]).float()
            token, q = _draw(logits, temperature, top_k, top_p, gen)
            tokens.append(token)
            if q is not None:
                qs.append(q)
            ext.append(tokens[-1])
        return tokens, (torch.stack(qs) if qs else None)

    def after_round(n, a):
        valid_main[0] = n + a
        # depth j wrote positions < n - 1; at position i it read t_{i+j}, a real token iff
        # i + j <= n - 1 + a (drafts d_1..d_a accepted), and depth j-1's output there, exact likewise
        for j in range(1, ran[0] + 1):
            fed[j] = min(n - 1, n + a - j)

    out = _speculate(tgt, propose, prompt, max_new_tokens, D, temperature, top_k, top_p, stop_tokens, seed,
                     stats, window, fallback, after_round)
    return out, stats
