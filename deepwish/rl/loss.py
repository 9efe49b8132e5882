"""The GRPO objective with the DAPO changes, as small pure functions over one step's batch.

Shapes: P prompts, G samples per prompt, N = P·G completions, T completion positions.

    A_i      = (r_i - mean_group(r)) / (std_group(r) + eps)        group-relative advantage
    ρ_t      = exp(log π(y_t) - log π_old(y_t))                     per-token ratio
    L_t      = -min(ρ_t A, clip(ρ_t, 1 - ε_low, 1 + ε_high) A) + β · k3_t
    k3_t     = exp(log π_ref - log π) - (log π_ref - log π) - 1      (≥ 0, unbiased for KL(π‖π_ref))
    loss     = Σ_{kept tokens} L_t / (number of kept tokens in the global batch)   (token-level)

Sources: GRPO, DeepSeekMath (Shao et al., arXiv 2402.03300, §4.1): group-relative advantages
normalised by the group std, a clipped ratio, a KL penalty with the k3 estimator, loss averaged
per sequence then over sequences. DAPO (Yu et al., arXiv 2503.14476): clip-higher (ε_high >
ε_low, §3.1), dynamic sampling (groups whose rewards are all equal carry no signal, §3.2),
token-level policy-gradient loss (§3.3), overlong filtering (truncated completions are masked,
§3.4), no KL term. k3: J. Schulman, "Approximating KL Divergence" (2020, joschu.net/blog/kl-approx).

Deviations: dynamic sampling here drops the all-equal groups of a step instead of sampling
more prompts until the batch is full (a step's batch can shrink; the loss normalises by what
is kept, so the gradient scale does not depend on how many groups were dropped).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GRPOLoss:
    """Every choice of the objective (module docstring); defaults follow DAPO, β = 0."""

    clip_low: float = 0.2  # ε_low: ratio floor 1 - ε_low for negative advantages (PPO/GRPO ε, 2402.03300)
    clip_high: float = 0.28  # ε_high: ratio ceiling 1 + ε_high; > ε_low is DAPO's clip-higher (2503.14476 §3.1)
    scale_by_std: bool = True  # divide advantages by the group std (GRPO, 2402.03300 §4.1.2); False: mean-centred only
    std_eps: float = 1e-6  # added to the group std before dividing
    token_level: bool = True  # DAPO token-level loss (2503.14476 §3.3): Σ tokens / global token count;
    #                           False: GRPO's mean per sequence, then mean over sequences (2402.03300 eq. 3)
    kl_beta: float = 0.0  # β of the KL penalty to a frozen reference, k3 estimator (Schulman 2020; GRPO used
    #                       0.04, DAPO drops it); 0 = no reference model is kept
    mask_truncated: bool = True  # completions that hit max_new_tokens without a stop token get no loss
    #                              (DAPO overlong filtering, 2503.14476 §3.4)
    drop_equal_groups: bool = True  # groups whose rewards are all equal are dropped (DAPO dynamic sampling,
    #                                 2503.14476 §3.2; their advantages are 0 anyway, they only dilute the mean)

    def __post_init__(self) -> None:
        bad = []
        if not 0 <= self.clip_low < 1:
            bad.append(f"clip_low={self.clip_low} must be in [0, 1)")
        if not self.clip_high >= 0:
            bad.append(f"clip_high={self.clip_high} must be >= 0")
        if not self.std_eps > 0:
            bad.append(f"std_eps={self.std_eps} must be > 0")
        if not self.kl_beta >= 0:
            bad.append(f"kl_beta={self.kl_beta} must be >= 0")
        if bad:
            raise ValueError("GRPO loss: " + "; ".join(bad))


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]: reward minus its group's mean, divided by the group's
    (unbiased, as torch.std) std + eps when scale_by_std. A group of equal rewards gives zeros."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, samples] with >= 2 samples per prompt, got {tuple(rewards.shape)}")
    r = rewards.float()
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [P, G] -> bool [P]: groups whose rewards are not all equal."""
    return (rewards != rewards[:, :1]).any(dim=1)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from samples of π: e^d - d - 1 with d = log π_ref - log π."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_mask(completion_mask: torch.Tensor, truncated: torch.Tensor, keep_rows: torch.Tensor,
               cfg: GRPOLoss) -> torch.Tensor:
    """The tokens that carry loss: completion tokens [N, T] of kept rows [N], minus truncated
    completions [N] when cfg.mask_truncated."""
    rows = keep_rows.clone()
    if cfg.mask_truncated:
        rows &= ~truncated
    return completion_mask & rows[:, None]


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar: this micro-batch's share of the step's objective
    pg_sum: torch.Tensor  # Σ policy-gradient term over masked tokens (detached)
    kl_sum: torch.Tensor  # Σ k3 over masked tokens (detached; 0 without a reference)
    clipped: torch.Tensor  # masked tokens whose clipped term is the active one (detached count)
    tokens: torch.Tensor  # masked tokens (count)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              cfg: GRPOLoss, *, norm: float, ref_logp: torch.Tensor | None = None,
              seq_tokens: torch.Tensor | None = None) -> LossTerms:
    """One micro-batch of the objective (module docstring).

    logp [n, T] (with grad), old_logp [n, T], ref_logp [n, T] or None: log-probabilities of the
    sampled tokens under the policy, the sampling-time policy and the reference; advantages [n];
    mask [n, T] (token_mask). norm: the step's global normaliser — the number of masked tokens
    of the whole step (token_level) or the number of kept sequences (sequence level), so that
    summing the micro-batches' losses gives the loss of the whole batch. seq_tokens [n]: masked
    tokens per sequence (sequence level only; default mask.sum(1))."""
    if cfg.kl_beta > 0 and ref_logp is None:
        raise ValueError("kl_beta > 0 needs the reference log-probabilities (ref_logp)")
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None].to(logp.dtype)
    unclipped = ratio * a
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * a
    pg = -torch.minimum(unclipped, clipped)
    per_token = pg
    kl = torch.zeros_like(pg)
    if cfg.kl_beta > 0:
        kl = k3(logp, ref_logp)
        per_token = pg + cfg.kl_beta * kl
    if cfg.token_level:
        loss = (per_token * m).sum() / norm
    else:
        n_tok = (mask.sum(1) if seq_tokens is None else seq_tokens).to(logp.dtype).clamp_min(1)
        loss = ((per_token * m).sum(1) / n_tok).sum() / norm
    active = (clipped < unclipped) & mask  # the clip bounds the objective here: no gradient through ρ
    return LossTerms(loss=loss, pg_sum=(pg * m).sum().detach(), kl_sum=(kl * m).sum().detach(),
                     clipped=active.sum(), tokens=mask.sum())


def mismatch_share(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                   tol: float = 0.1) -> float:
    """Share of masked tokens whose ratio π_trainer / π_sampler lies outside [1 - tol, 1 + tol]."""
    ratio = torch.exp(trainer_logp.float() - sampler_logp.float())
    bad = ((ratio - 1).abs() > tol) & mask
    return float(bad.sum()) / max(int(mask.sum()), 1)
