"""The trainer's side of the objective: which loss backend, which weights this step, and what
to log. The loss itself is computed by the model's forward (model/objective.py):

    out = model(input_ids, positions=..., doc_ids=..., targets=targets,
                objective=step_objective(train_cfg, step, backend, n_global))
    out.loss.backward()

`n_global` counts the target tokens of every micro-batch of the optimizer step and, under data
parallelism, of every rank (train/parallel.py all-reduces it), so summing each micro-batch's
backward gives exactly the gradient of one big batch.
"""
from __future__ import annotations


import torch

from deepwish.config import WINDOW_BLOCK
from deepwish.kernels.backend import resolve_triton_or_torch
from deepwish.kernels.linear_cross_entropy.reference import check_target_values
from deepwish.model.mtp import mtp_lambda_at
from deepwish.model.objective import IGNORE_INDEX, Objective
from deepwish.train.schedule import window_blocks_at

__all__ = ["IGNORE_INDEX", "checked_target_count", "count_targets", "eval_objective", "lm_loss", "resolve_loss_backend", "step_metrics",
           "step_objective"]


def resolve_loss_backend(requested: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' otherwise; printed once by the caller's call."""
    return resolve_triton_or_torch("loss", "deepwish.kernels.linear_cross_entropy.triton", requested, device)


def count_targets(targets: torch.Tensor) -> int:
    return int((targets != IGNORE_INDEX).sum())


def checked_target_count(targets: torch.Tensor, vocab_size: int) -> int:
    """The targets not ignored, after checking every target is in [0, vocab_size) or ignored; on
    the batch's host copy, so the model's fused loss need not read them back from the device
    (Objective.checked_targets)."""
    check_target_values(targets, vocab_size, IGNORE_INDEX,
                        where="batch (do the data's tokenizer and model.vocab_size agree?)")
    return count_targets(targets)


def step_objective(tc, step: int, backend: str, n_global: int, checked_targets: int | None = None) -> Objective:
    """The objective of training step `step` (0-based) per TrainConfig `tc`: the one place where
    the auxiliary losses get their weights (λ of the MTP loss with its ramp, the indexer
    coefficient) and the loss its normaliser, the step's global target count. checked_targets:
    the micro-batch's `checked_target_count`, when the caller made it on the host."""
    if n_global <= 0:
        raise ValueError(f"the step's global target count must be positive, got {n_global}")
    return Objective(loss_backend=backend, z_loss=tc.z_loss, loss_norm=float(n_global),
                     mtp_weight=mtp_lambda_at(tc.mtp_lambda, tc.mtp_lambda_final, step, tc.steps),
                     indexer_mode=tc.indexer_mode, indexer_weight=tc.indexer_loss_coef,
                     window_blocks=window_blocks_at(step, tc, WINDOW_BLOCK), checked_targets=checked_targets,
                     residual_dtype=residual_dtype(tc))


def eval_objective(tc, backend: str) -> Objective:
    """Validation reports the main cross-entropy only: no MTP heads, no indexer loss, and the
    attention the training run uses (dense during a DSA dense warm-up)."""
    return Objective(loss_backend=backend, indexer_mode=tc.indexer_mode, indexer_weight=0.0,
                     residual_dtype=residual_dtype(tc))


def residual_dtype(tc) -> torch.dtype | None:
    """Objective.residual_dtype of train.residual_dtype: bf16, or None (the embedding's dtype)."""
    return torch.bfloat16 if tc.residual_dtype == "bf16" else None


def step_metrics(out) -> dict:
    """Detached, summable metrics of one micro-batch's ModelOutput: 'ce_sum', 'z_sum', 'n_targets',
    'aux/<name>' (each weighted term of the loss) and 'moe/loads' {layer: tokens per expert}."""
    m = {"ce_sum": out.ce_sum.detach(), "z_sum": out.z_sum.detach(), "n_targets": out.n_targets}
    m.update({f"aux/{k}": v.detach().float() for k, v in out.aux_losses.items()})
    if out.moe_loads:
        m["moe/loads"] = out.moe_loads
    return m


def lm_loss(model, batch, tc, n_global: int, *, backend: str, step: int | None = None,
            checked_targets: int | None = None) -> tuple[torch.Tensor, dict]:
    """One micro-batch through the model's forward: (loss to call backward on, `step_metrics`).
    batch: (input_ids [B,T], targets [B,T] with -100 = ignore, doc_ids [B,T] | None,
    positions [B,T] | None); step: 0-based optimizer step (scheduled weights); None = step 0;
    checked_targets: the batch's `checked_target_count` from its host copy (None: the fused loss
    checks and counts on the device, synchronising)."""
    input_ids, targets, doc_ids, positions = batch
    out = model(input_ids, positions=positions, doc_ids=doc_ids, targets=targets,
                objective=step_objective(tc, step or 0, backend, n_global, checked_targets))
    return out.loss, step_metrics(out)
