"""The language-model loss of one micro-batch, normalised by the step's GLOBAL target count.

    loss = Σ_{targets in this micro-batch} CE / N_global  (+ z-loss, same normalisation)
           + (n_local / N_global) · (MoE aux losses + model.extra_losses())

N_global counts the target tokens (targets != ignore_index) over every micro-batch of the
optimizer step — and, under data parallelism, over every rank (train/parallel.py all-reduces it
and then the gradient is a plain sum). Summing the backward of each micro-batch therefore gives
exactly the gradient of one big batch, whatever the padding or packing of each micro-batch.

Auxiliary losses (MoE balance, MTP, indexer) are per-micro-batch means computed by the model;
they are weighted by the micro-batch's share of target tokens so that their total weight per
step is 1. Unlike the cross-entropy they are not exactly batch-size invariant (a balance loss
is nonlinear in the batch's expert loads); this is the usual approximation.

Backends: 'torch' materialises logits [N, V] and calls F.cross_entropy; 'triton' feeds the final
hidden states and head weight to the fused linear-cross-entropy kernel, which never holds the
logits (Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from deepwish.kernels.backend import resolve_backend

IGNORE_INDEX = -100


def _triton_probe(device: torch.device):
    def probe() -> str | None:
        try:
            import deepwish.kernels.linear_cross_entropy.triton  # noqa: F401
        except ImportError as e:
            return f"fused kernel unavailable ({e})"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "no CUDA device (TRITON_INTERPRET=1 runs it in the interpreter, slowly)"
        return None
    return probe


def resolve_loss_backend(requested: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' otherwise; printed once by the caller's call."""
    return resolve_backend("loss", requested, {"triton": _triton_probe(device), "torch": lambda: None},
                           auto_order=["triton", "torch"] if device.type == "cuda" else ["torch"])


def count_targets(targets: torch.Tensor) -> int:
    return int((targets != IGNORE_INDEX).sum())


def lm_loss(model, batch, cfg, n_target_tokens_global: int, *, backend: str,
            step: int | None = None) -> tuple[torch.Tensor, dict]:
    """One micro-batch: (loss to call backward on, metrics of detached tensors).

    batch: (input_ids [B,T], targets [B,T] with -100 = ignore, doc_ids [B,T] | None,
            positions [B,T] | None), on the model's device.
    cfg: TrainConfig (z_loss). backend: 'torch' | 'triton' (from resolve_loss_backend).
    metrics: 'ce_sum' (summed CE of the micro-batch), 'z_sum', 'n_targets', and one entry per
    auxiliary loss ('aux/moe', 'aux/mtp_loss', 'extra/<name>') already weighted as added to the loss.
    step: the 0-based optimizer step, for scheduled weights (the MTP λ ramp); None = step 0.
    """
    if n_target_tokens_global <= 0:
        raise ValueError(f"n_target_tokens_global must be positive, got {n_target_tokens_global}")
    input_ids, targets, doc_ids, positions = batch
    flat_targets = targets.reshape(-1)
    n_local = (flat_targets != IGNORE_INDEX).sum()
    # ---- DeepSeek hooks (model/dsa.py, model/mtp.py), part 1: indexer mode, MTP needs h ----
    if hasattr(model, "set_indexer_mode"):
        model.set_indexer_mode(cfg.indexer_mode)
    # Training only: evaluation (no grad) reports the main cross-entropy and skips the MTP heads.
    want_mtp = (getattr(model, "mtp", None) is not None and (cfg.mtp_lambda > 0 or cfg.mtp_lambda_final > 0)
                and torch.is_grad_enabled())
    h_main = None
    # ---- end DeepSeek hooks, part 1 ----
    if backend == "torch":
        if want_mtp:  # the MTP modules start from the final hidden states: compute them once
            h_main = model.hidden_states(input_ids, positions=positions, doc_ids=doc_ids)
            logits = model.logits(h_main).float()
        else:
            logits = model(input_ids, positions=positions, doc_ids=doc_ids).float()
        logits = logits.reshape(-1, logits.size(-1))
        ce_sum = F.cross_entropy(logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
        z_sum = logits.new_zeros(())
        if cfg.z_loss:
            # PaLM z-loss: keeps log Z near 0 so logits do not drift (Chowdhery et al., 2022).
            lse = torch.logsumexp(logits, dim=-1)
            z_sum = cfg.z_loss * (lse.square() * (flat_targets != IGNORE_INDEX)).sum()
        total = ce_sum + z_sum
    elif backend == "triton":
        from deepwish.kernels.linear_cross_entropy.triton import linear_cross_entropy
        h = h_main = model.hidden_states(input_ids, positions=positions, doc_ids=doc_ids)
        h = h.reshape(-1, h.size(-1))
        # Under autocast the head's matmuls run in the autocast dtype, as `model.logits` would:
        # the final norm returns fp32 (the residual stream is fp32), and an fp32 fused loss at a
        # 152k vocabulary would spend most of a step in fp32 GEMMs.
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        h, w = h.to(dtype), model.head_weight.to(dtype)
        total = linear_cross_entropy(h, w, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum",
                                     z_loss=cfg.z_loss)
        # The fused kernel returns CE + z-loss together; z is not reported apart.
        ce_sum, z_sum = total.detach(), total.new_zeros(())
    else:
        raise ValueError(f"lm_loss: backend must be 'torch' or 'triton' (resolve 'auto' first), got {backend!r}")

    loss = total / n_target_tokens_global
    share = n_local.to(torch.float32) / n_target_tokens_global
    metrics = {"ce_sum": ce_sum.detach(), "z_sum": z_sum.detach(), "n_targets": n_local}
    # ---- DeepSeek hooks, part 2: multi-token prediction loss, λ·mean over depths ----------
    if want_mtp:
        from deepwish.model.mtp import mtp_ce_sums, mtp_lambda_at
        lam = mtp_lambda_at(cfg.mtp_lambda, cfg.mtp_lambda_final, step or 0, cfg.steps)
        if lam > 0:
            sums, _ = mtp_ce_sums(model, h_main, input_ids, targets, positions, doc_ids)
            mtp = lam * sums.mean() / n_target_tokens_global  # normalised like the main CE
            loss = loss + mtp
            metrics["aux/mtp_loss"] = mtp.detach()
    # ---- end DeepSeek hooks, part 2 ----
    moe = model.moe_stats() if hasattr(model, "moe_stats") else []
    aux_terms = [s["aux_loss"] for s in moe if s.get("aux_loss") is not None]
    if aux_terms:
        aux = torch.stack([a.float() for a in aux_terms]).sum()
        loss = loss + share * aux
        metrics["aux/moe"] = (share * aux).detach()
    if moe:
        metrics["moe/tokens_per_expert"] = torch.stack([s["tokens_per_expert"].detach().float() for s in moe])
        metrics["moe/layers"] = [s["layer"] for s in moe]
    extra = model.extra_losses() if hasattr(model, "extra_losses") else {}
    for name, value in extra.items():
        value = value.float() * getattr(cfg, f"{name}_loss_coef", 1.0)  # e.g. indexer -> indexer_loss_coef
        loss = loss + share * value
        metrics[f"extra/{name}"] = (share * value).detach().float()
    return loss, metrics
