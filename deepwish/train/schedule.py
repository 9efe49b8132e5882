"""Learning-rate schedules as a pure function of the step: the factor that multiplies every
group's `base_lr`. Nothing is stored but the step, so resuming needs only the step number.

- cosine: linear warm-up, then half a cosine from 1 down to `min_lr_frac`.
- wsd (warmup-stable-decay; Hu et al., MiniCPM, arXiv:2404.06395): warm-up, a constant plateau,
  then a linear decay to `min_lr_frac` over the last `decay_frac` of the steps. (MiniCPM uses
  an exponential decay; linear is the common simplification.)
- constant: warm-up, then 1.

The horizon is `steps`: steps at or after it (`train.extend_steps` runs them) take the final
factor, so extending a run changes no step it has already planned. (warmup-stable-linear-cooldown,
modded-nanogpt's schedule: `wsd` with min_lr_frac=0 and decay_frac the cooldown fraction.)

Scheduled shapes, also pure functions of the step (a resumed run takes the same shape at every step):
- window_blocks_at: attention windows (GPT family, per-layer window_pattern) are capped at a
  number of 128-token blocks that grows linearly, in whole blocks, from window_start_blocks to
  the row length (seq_len) over the first window_warmup_frac of the steps; each layer attends with
  min(its final window, the cap) (model/attention.py scheduled_window), full-attention layers uncapped;
- seq_len_at: train.seq_len_schedule, equal stages over `steps`: the loader's rows of seq_len
  tokens are split into rows of the stage's length (the same tokens, shorter contexts);
- accum_at: train.batch_schedule, equal stages over `steps`: micro-batches per optimizer step
  (the batch size grows by accumulation; the loader's position is in every checkpoint).
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


def _stage(step: int, stages: tuple, total: int):
    """The entry of `stages` (equal stages over `total` steps) in force at 0-based `step`."""
    return stages[min(len(stages) - 1, step * len(stages) // max(total, 1))]


def window_blocks_at(step: int, cfg, block: int) -> int:
    """The window cap at `step` in blocks of `block` tokens (config.WINDOW_BLOCK); 0 = no cap (the
    final windows)."""
    span = cfg.window_warmup_frac * cfg.steps
    if span <= 0 or step >= span:
        return 0
    full = -(-cfg.seq_len // block)  # a cap of the row length caps nothing
    start = min(cfg.window_start_blocks, full)
    return start + int((full - start) * step / span)


def seq_len_at(step: int, cfg) -> int:
    """Sequence length of the step's micro-batches (train.seq_len_schedule, else train.seq_len)."""
    return _stage(step, cfg.seq_len_schedule, cfg.steps) if cfg.seq_len_schedule else cfg.seq_len


def accum_at(step: int, cfg) -> int:
    """Micro-batches of the step (train.batch_schedule, else train.grad_accum)."""
    return _stage(step, cfg.batch_schedule, cfg.steps) if cfg.batch_schedule else cfg.grad_accum


def split_rows(batch: tuple, length: int) -> tuple:
    """A loader batch (tensors [B, T] or None) as rows of `length` tokens: [B·T/length, length]."""
    return tuple(None if t is None else t.reshape(-1, length) for t in batch)
