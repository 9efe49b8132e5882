"""What a forward with targets computes: the language-model loss and the weights of the
auxiliary losses, in one place.

    loss = (Σ CE + z-loss) / loss_norm
           + mtp_weight · mean_depth(Σ MTP CE) / loss_norm
           + (n_targets / loss_norm) · (Σ MoE balance losses + indexer_weight · mean indexer KL)

`loss_norm` is the number of target tokens the summed losses are divided by: by default this
batch's own count (so `model(ids, targets=t).loss` is the mean cross-entropy, as in HF and
nanoGPT); the trainer passes the GLOBAL count of the optimizer step (every micro-batch, every
rank), so summing the backward of each micro-batch gives exactly the gradient of one big batch,
whatever the padding or packing of each micro-batch.

The auxiliary losses (MoE balance, MTP, DSA indexer) are per-micro-batch means; they are weighted
by the micro-batch's share of target tokens so that their total weight per step is 1 (the MTP
loss is a sum over targets like the main one and is normalised the same way). Unlike the
cross-entropy they are not exactly batch-size invariant (a balance loss is nonlinear in the
batch's expert loads); this is the usual approximation.

Weights: every auxiliary loss the model can produce has its weight here, `AUX_NAMES` lists them,
and a forward that meets an unlisted one fails (a new loss never gets a silent weight of 1). The
MoE balance losses are weighted by the model config's own coefficients (router_aux_loss_coef,
seq_aux_loss_coef) inside the MoE layer, so their weight here is 1.

Backends: 'torch' materialises logits [N, V] and calls F.cross_entropy; 'triton' feeds the final
hidden states and head weight to the fused linear-cross-entropy kernel, which never holds the
logits (Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024), and is
given only the rows whose target is not ignored (a loss-masked chat's prompt costs no head work).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
INDEXER_MODES = ("off", "dense_warmup", "sparse")
LOSS_BACKENDS = ("torch", "triton")
AUX_NAMES = ("moe", "mtp", "indexer")


@dataclass(frozen=True)
class Objective:
    """How a forward with targets turns the model's outputs into one loss (module docstring)."""

    loss_backend: str = "torch"  # torch | triton (resolved: train/loss.py resolve_loss_backend)
    z_loss: float = 0.0  # PaLM z-loss coefficient
    loss_norm: float | None = None  # divide summed losses by this; None = this batch's target count
    mtp_weight: float = 0.0  # λ of the multi-token-prediction loss (0: the MTP modules do not run)
    indexer_mode: str = "off"  # DSA: off | dense_warmup | sparse (model/dsa.py)
    indexer_weight: float = 1.0  # weight of the DSA indexer KL (0: not computed)
    # GPT-family window schedule (train/schedule.py window_blocks_at): every windowed layer attends
    # with min(its final window, window_blocks·128 tokens); 0 = no cap (the final windows)
    window_blocks: int = 0
    # the caller's count of this batch's targets that are not ignored, made on the host after checking
    # every target is in the vocabulary or ignored (train/loss.py checked_target_count): the fused
    # loss then reads nothing back from the device (no target check, no data-dependent row count)
    checked_targets: int | None = None
    # Carry the residual stream in this dtype under autocast (train.residual_dtype):
    # the embedding output x0 is cast once, so every block's input, output and residual sum is in
    # it. None: the embedding's dtype (fp32 parameters under autocast give an fp32 stream, as in
    # plain AMP; FSDP2's bf16 parameters give bf16). Without autocast it has no effect.
    residual_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.loss_backend not in LOSS_BACKENDS:
            raise ValueError(f"loss backend must be one of {LOSS_BACKENDS} (resolve 'auto' first), "
                             f"got {self.loss_backend!r}")
        if self.indexer_mode not in INDEXER_MODES:
            raise ValueError(f"indexer mode {self.indexer_mode!r} is not one of {INDEXER_MODES}")
        if self.loss_norm is not None and not self.loss_norm > 0:
            raise ValueError(f"loss_norm must be positive, got {self.loss_norm}")
        if self.checked_targets is not None and self.checked_targets < 0:
            raise ValueError(f"checked_targets must be a count, got {self.checked_targets}")

    def aux_weight(self, name: str) -> float:
        weights = {"moe": 1.0, "mtp": self.mtp_weight, "indexer": self.indexer_weight}
        if name not in weights:
            raise KeyError(f"auxiliary loss {name!r} has no weight in Objective (known: {', '.join(AUX_NAMES)})")
        return weights[name]


def cross_entropy_sums(h: torch.Tensor, logits_fn, head_weight: torch.Tensor, targets: torch.Tensor,
                       objective: Objective, softcap: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Final hidden states h [B, T, d], targets [B, T] (-100 = ignore) ->
    (Σ CE, Σ z-loss (0 when fused: the kernel returns them together), logits [B, T, V] or None).
    softcap: the head's logit soft-cap, which `logits_fn` applies itself; the fused kernel is told."""
    flat_targets = targets.reshape(-1)
    if objective.loss_backend == "torch":
        logits = logits_fn(h)
        flat = logits.float().reshape(-1, logits.size(-1))
        ce_sum = F.cross_entropy(flat, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
        z_sum = flat.new_zeros(())
        if objective.z_loss:
            # PaLM z-loss: keeps log Z near 0 so logits do not drift (Chowdhery et al., 2022).
            lse = torch.logsumexp(flat, dim=-1)
            z_sum = objective.z_loss * (lse.square() * (flat_targets != IGNORE_INDEX)).sum()
        return ce_sum, z_sum, logits
    from deepwish.kernels.linear_cross_entropy.triton import linear_cross_entropy
    hf = h.reshape(-1, h.size(-1))
    # Ignored rows (loss-masked prompts, document padding) are dropped before the kernel, so their
    # [V]-wide logits are never computed; index_select's backward gives them exactly zero gradient.
    # With the count known on the host (objective.checked_targets) nothing is read back from the
    # device; without it the row count (and the kernel's target check) synchronise.
    n = objective.checked_targets
    if n is None:
        keep = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    elif n < flat_targets.numel():
        keep = torch.nonzero_static(flat_targets != IGNORE_INDEX, size=n).squeeze(1)
    else:
        keep = None
    if keep is not None and keep.numel() < flat_targets.numel():
        hf, flat_targets = hf.index_select(0, keep), flat_targets.index_select(0, keep)
    # Under autocast the head's matmuls run in the autocast dtype, as the head itself would: the
    # final norm returns fp32 (the residual stream is fp32), and an fp32 fused loss at a 152k
    # vocabulary would spend most of a step in fp32 GEMMs.
    dev = hf.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hf.dtype
    total = linear_cross_entropy(hf.to(dtype), head_weight.to(dtype), flat_targets, ignore_index=IGNORE_INDEX,
                                 reduction="sum", z_loss=objective.z_loss, softcap=softcap if softcap > 0 else None,
                                 check_targets=n is None)
    return total, total.new_zeros(()), None
