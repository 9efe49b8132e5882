"""Multi-token prediction (DeepSeek-V3 §2.2).

Depth k (1..D) predicts token i+k+1 from position i:

    x_i^k = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i^{k-1})])      (embedding first, as the
            released weights expect; the paper writes the two halves the other way round)
    h_i^k = shared_head.norm(Block_k(x_i^k))                         logits = Head(h_i^k)

Emb and Head are the main model's (shared, not copied); each module owns enorm, hnorm, eh_proj,
one decoder block (the block of layer n_layers + k - 1: MLA/DSA + MoE as the config derives for
that index) and its own output norm (`shared_head.norm` in the checkpoint).

Choices where the paper is silent (stated, not guessed silently):
- h^0 is the main model's *final-normed* hidden state, the tensor the LM head consumes; this is
  what inference engines feed the released MTP weights. Depth k > 1 receives h^{k-1} after its
  module's output norm, so every depth starts from the same kind of representation.
- Shapes stay [B, T]: the input tokens are shifted left by k (wrapping at the end) instead of
  truncating the sequence; positions whose target falls off the row or crosses a packed-document
  boundary get the ignore index, so the wrapped tokens never reach a loss.
- The MTP loss is the mean over depths of the summed cross-entropy, normalised by the main
  loss's global target count, times λ (train.mtp_lambda, optionally ramped linearly to
  train.mtp_lambda_final). It is computed inside the model's forward (`Objective.mtp_weight`),
  so the MoE layers of the MTP blocks report their loads and balance losses like the trunk's.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from deepwish.config import ModelConfig
from deepwish.model.block import Block
from deepwish.model.norm import RMSNorm

IGNORE_INDEX = -100


class MTP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        # layer_types continued past the trunk (an explicit per-layer list continues with `mixer`)
        ext = replace(cfg, n_layers=cfg.n_layers + cfg.n_mtp,
                      layer_mixers=cfg.layer_mixers + (cfg.mixer,) * cfg.n_mtp if cfg.layer_mixers else ())
        if not cfg.n_layers <= layer_idx < ext.n_layers:
            raise ValueError(f"MTP layer index {layer_idx} is outside {cfg.n_layers}..{ext.n_layers - 1}")
        d = cfg.d_model
        self.depth = layer_idx - cfg.n_layers + 1
        self.enorm = RMSNorm(d, cfg.norm_eps, cfg.norm_zero_centered)
        self.hnorm = RMSNorm(d, cfg.norm_eps, cfg.norm_zero_centered)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(ext, layer_idx)
        self.norm = RMSNorm(d, cfg.norm_eps, cfg.norm_zero_centered)

    def forward(self, h_prev: torch.Tensor, emb_ahead: torch.Tensor, ctx, cache=None) -> tuple[torch.Tensor, dict]:
        """h_prev [B,T,d] (normed representation of depth k-1), emb_ahead [B,T,d] = Emb(t_{i+k}),
        cache: this depth's block cache (speculative decoding) -> (normed h^k [B,T,d], block aux)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_ahead), self.hnorm(h_prev)], dim=-1))
        x, aux = self.block(x, ctx, cache)
        return self.norm(x), aux


def mtp_targets(targets: torch.Tensor, k: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """targets [B,T] (targets[i] = token i+1, -100 = ignore) -> depth-k targets [B,T]:
    token i+k+1 = targets[i+k], ignored past the row's end or across a document boundary."""
    B, T = targets.shape
    out = torch.full_like(targets, IGNORE_INDEX)
    if k >= T:
        return out
    out[:, : T - k] = targets[:, k:]
    if doc_ids is not None:
        same = doc_ids[:, k:] == doc_ids[:, : T - k]
        out[:, : T - k] = out[:, : T - k].masked_fill(~same, IGNORE_INDEX)
    return out


def mtp_ce_sums(hidden: list[torch.Tensor], head, targets: torch.Tensor, doc_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy [D] and target counts [D] of every MTP depth (fp32 logits).
    hidden: per depth k = 1..D the hidden states [B,T,d] (`Transformer.mtp_hidden`); head: h -> logits."""
    sums, counts = [], []
    for k, hk in enumerate(hidden, start=1):
        tk = mtp_targets(targets, k, doc_ids).reshape(-1)
        logits = head(hk).float()
        logits = logits.reshape(-1, logits.shape[-1])
        sums.append(F.cross_entropy(logits, tk, ignore_index=IGNORE_INDEX, reduction="sum"))
        counts.append((tk != IGNORE_INDEX).sum())
    return torch.stack(sums), torch.stack(counts)


def mtp_lambda_at(mtp_lambda: float, mtp_lambda_final: float, step: int, steps: int) -> float:
    """λ of the MTP loss at `step` (0-based): constant when mtp_lambda_final < 0, else a linear
    ramp from mtp_lambda (step 0) to mtp_lambda_final (last step)."""
    if mtp_lambda_final < 0 or steps <= 1:
        return mtp_lambda
    f = min(max(step / (steps - 1), 0.0), 1.0)
    return mtp_lambda + (mtp_lambda_final - mtp_lambda) * f


def mtp_hidden_states(model, h: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      doc_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Every depth's hidden states over a whole sequence, as the training forward computes them:
    h [B,T,d] the model's final-normed hidden states (`model(ids, return_hidden=True).hidden`) ->
    per depth k = 1..D hidden states [B,T,d] whose logits at position i predict token i+k+1
    (invalid where that runs off the row: see `mtp_targets`)."""
    out, prev = [], h
    for k in range(1, (len(model.mtp) if model.mtp is not None else 0) + 1):
        prev = model.mtp_hidden(k, prev, torch.roll(input_ids, -k, dims=1), positions, doc_ids)
        out.append(prev)
    if not out:
        raise ValueError("the model has no MTP modules (n_mtp == 0)")
    return out
