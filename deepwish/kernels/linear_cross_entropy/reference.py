"""Linear (LM head) + cross-entropy: the plain torch reference (CPU path and test oracle).

Shape legend: N tokens, D hidden size, V vocabulary.

    logits   = h @ weight.T                         (fp32 here)
    logits   = softcap * tanh(logits / softcap)     (if softcap; Gemma-2 style logit capping)
    lse      = logsumexp(logits)
    loss_i   = lse_i - logits[i, target_i] + z_loss * lse_i**2   (z-loss: PaLM, keeps lse near 0)
    logprob_i = logits[i, target_i] - lse_i

Tokens whose target equals ignore_index give loss 0 and logprob 0; 'mean' divides the sum by the
number of tokens that are not ignored (nan when there are none, as torch's cross_entropy).
This path materialises the [N, V] logits; `triton.py` does not.
"""
from __future__ import annotations

import torch

REDUCTIONS = ("sum", "mean", "none")


def check_lce_inputs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str,
                     softcap: float | None) -> None:
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: need h [N, D] and weight [V, D], got "
                         f"{tuple(h.shape)} and {tuple(weight.shape)}")
    if not h.is_floating_point() or h.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: h and weight must share one floating dtype, got "
                         f"{h.dtype} and {weight.dtype} (cast the weight; its gradient flows back)")
    if targets.dim() != 1 or targets.shape[0] != h.shape[0] or targets.is_floating_point():
        raise ValueError(f"linear_cross_entropy: targets must be integer [N={h.shape[0]}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be positive or None, got {softcap}")


def check_target_values(targets: torch.Tensor, V: int, ignore_index: int, where: str = "linear_cross_entropy") -> None:
    """Targets must index the vocabulary unless ignored (reads the tensor: on a GPU it synchronises);
    `where` starts the error."""
    bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"{where}: targets outside the vocabulary [0, {V}) that are not "
                         f"ignore_index={ignore_index}: {targets[bad][:8].tolist()}")


def reduce_loss(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "sum", z_loss: float = 0.0,
                         softcap: float | None = None, return_logprobs: bool = False):
    """h: [N, D], weight: [V, D], targets: int [N].
    Returns loss (fp32; scalar for sum/mean, [N] for none), and logprobs [N] (fp32) if asked."""
    check_lce_inputs(h, weight, targets, reduction, softcap)
    check_target_values(targets, weight.shape[0], ignore_index)
    logits = h.float() @ weight.float().t()                     # [N, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)                        # [N]
    valid = targets != ignore_index
    target_logit = logits.gather(1, torch.where(valid, targets, 0).long()[:, None])[:, 0]
    zero = torch.zeros((), device=h.device)
    loss = torch.where(valid, lse - target_logit + z_loss * lse.square(), zero)
    out = reduce_loss(loss, valid, reduction)
    if return_logprobs:
        return out, torch.where(valid, target_logit - lse, zero)
    return out
