"""Learning-rate schedules as a pure function of the step: the factor that multiplies every
group's `base_lr`. Nothing is stored but the step, so resuming needs only the step number.

- cosine: linear warm-up, then half a cosine from 1 down to `min_lr_frac`.
- wsd (warmup-stable-decay; Hu et al., MiniCPM, arXiv:2404.06395): warm-up, a constant plateau,
  then a linear decay to `min_lr_frac` over the last `decay_frac` of the steps. (MiniCPM uses
  an exponential decay; linear is the common simplification.)
- constant: warm-up, then 1.

The horizon is `steps`: steps at or after it (`train.extend_steps` runs them) take the final
factor, so extending a run changes no step it has already planned.
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")


def lr_factor(step: int, cfg) -> float:
    """Factor for the update taken at 0-based `step` of `cfg.steps` (TrainConfig).

    Warm-up reaches 1.0 at step `warmup_steps - 1` (the first step is not taken at lr 0).
    """
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"train.schedule={cfg.schedule!r} is not one of {SCHEDULES}")
    if step < 0:
        raise ValueError(f"lr_factor: step must be >= 0, got {step}")
    total, warmup, floor = cfg.steps, cfg.warmup_steps, cfg.min_lr_frac
    if step >= total > 0:  # an extension past the horizon: the final factor, held
        step = total - 1
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, total - warmup - 1)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_frac * total))
    decay_start = max(warmup, total - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
    return 1.0 - (1.0 - floor) * progress


def apply_lr(optimizer, step: int, cfg) -> float:
    """Set every group's lr to base_lr * lr_factor(step); returns the factor."""
    f = lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * f
    return f
