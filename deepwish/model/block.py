"""One residual block, and the context every mixer reads.

`cfg.layer_types` — derived once in the config — gives every layer a (mixer, ffn) pair, read only
here in `Block.__init__`; forward never branches on strings or layer indices.

The block contract (every mixer and FFN keeps it, so the block treats them alike):

    mixer(x [B,T,d], ctx, cache | None) -> (y [B,T,d], aux)
    ffn(x [B,T,d])                      -> (y [B,T,d], aux)
    Block(x, ctx, cache | None)         -> (x [B,T,d], aux)

and, optionally, the whole residual branch x + f(norm(x)) in one call, for a branch that can fuse
the norm and the add into its own kernels (model.decode_fusion; `residual_branch` below):

    mixer.residual_forward(x, norm, ctx, cache) -> (x [B,T,d], aux) | None   (None: not here)
    ffn.residual_forward(x, norm)               -> (x [B,T,d], aux) | None

`aux` is a dict of this forward's side results (names below), returned rather than kept on the
module, so a compiled, checkpointed or sharded block gives the same results as a plain one and
nothing is read back from modules after the fact:

    "moe_load"   [E] int64  tokens routed to each expert           (MoE FFNs)
    "moe_aux"    scalar     balance loss, already weighted by the model config's coefficients
    "indexer"    scalar     DSA lightning-indexer KL (unweighted)   (DSA mixers, when asked for)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from deepwish.config import ModelConfig
from deepwish.model.attention import Attention, attention_mask
from deepwish.model.mlp import MLP, SwiGLU
from deepwish.model.moe import MoE
from deepwish.model.norm import RMSNorm

NO_AUX: dict = {}


@dataclass
class ForwardContext:
    """What every mixer may need besides its input, computed once per forward."""

    positions: torch.Tensor  # [B, T] absolute positions (restart at 0 in each packed document)
    cos: torch.Tensor  # [B, T, R/2] rotary tables for `positions`
    sin: torch.Tensor
    doc_ids: torch.Tensor | None = None  # [B, T] packed-document index, or None
    # DeepSeek-V3.2 indexer training (Objective.indexer_mode, model/dsa.py): main attention dense
    # over all causal keys (the warm-up) instead of the indexer's top-k, and the indexer KL computed.
    dense_indexer_attention: bool = False
    indexer_loss: bool = False
    # GPT family: the window schedule's cap in 128-token blocks (0 = none: every layer at its final window;
    # model/attention.py scheduled_window), the embedding output x0 (residual scales),
    # {layer: value-embedding rows [B,T,Hkv·D]} and the rows of the block being run (set by the
    # stack before each block: a block that read its own rows by its layer index would be compiled
    # once per layer, the index being a constant of the graph)
    window_blocks: int = 0
    x0: torch.Tensor | None = None
    value_embeds: dict = field(default_factory=dict)
    value_embed: torch.Tensor | None = None
    # (start, end) [B, T] int32 of each token's document for the flash-attention kernel
    # (kernels/attention/triton.py document_bounds), made once per forward, not once per layer
    doc_bounds: tuple[torch.Tensor, torch.Tensor] | None = None
    _masks: dict = field(default_factory=dict)

    def sparse_mask(self, local: int, stride: int) -> torch.Tensor:
        """Block-sparse (and same-document) boolean mask [B, 1, T, T] (model/block_sparse.py), built once."""
        key = ("sparse", local, stride)
        if key not in self._masks:
            from deepwish.model.block_sparse import block_sparse_mask
            self._masks[key] = block_sparse_mask(self.positions, self.positions, local, stride, self.doc_ids,
                                                 self.doc_ids)
        return self._masks[key]

    @torch.compiler.disable
    def flex_sparse_mask(self, local: int, stride: int):
        """The same as a FlexAttention BlockMask, built eagerly once per forward."""
        key = ("flex-sparse", local, stride)
        if key not in self._masks:
            from deepwish.model.block_sparse import flex_block_sparse_mask
            self._masks[key] = flex_block_sparse_mask(self.positions, self.doc_ids, local, stride)
        return self._masks[key]

    def mask(self, window: int = 0) -> torch.Tensor:
        """Causal, same-document (and windowed) boolean mask [B, 1, T, T], built once per window."""
        if window not in self._masks:
            self._masks[window] = attention_mask(self.positions, self.positions, window, self.doc_ids, self.doc_ids)
        return self._masks[window]

    def cache_mask(self, window: int, k_pos: torch.Tensor) -> torch.Tensor:
        """The mask [B, 1, T, L] of these queries over a plain static cache whose slot j holds position
        j (k_pos [B, L], the same for every layer), built once per window and step."""
        key = ("cache", window, k_pos.shape[-1])
        if key not in self._masks:
            self._masks[key] = attention_mask(self.positions, k_pos, window)
        return self._masks[key]

    @torch.compiler.disable
    def flex_mask(self, window: int = 0):
        """FlexAttention BlockMask for the same visibility as `mask`, built once per window.
        Built eagerly (outside a compiled block: the mask is an input of the compiled kernel)."""
        key = ("flex", window)
        if key not in self._masks:
            from deepwish.kernels.attention.flex import block_mask
            B, T = self.positions.shape
            self._masks[key] = block_mask(B, T, self.doc_ids, window, self.positions.device)
        return self._masks[key]

    def cu_seqlens(self) -> torch.Tensor:
        """Start offsets [N+1] of the sequences in the flattened [B·T] token stream: a new
        sequence starts at every batch row and at every document boundary. For recurrent mixers."""
        B, T = self.positions.shape
        starts = torch.zeros(B, T, dtype=torch.bool, device=self.positions.device)
        starts[:, 0] = True
        if self.doc_ids is not None:
            starts[:, 1:] |= self.doc_ids[:, 1:] != self.doc_ids[:, :-1]
        idx = starts.reshape(-1).nonzero().squeeze(-1)
        return torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)


class DenseFFN(SwiGLU):
    """The dense FFN of a block: a SwiGLU that keeps the block contract (no side results)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return super().forward(x), NO_AUX

    def residual_forward(self, x: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, dict] | None:
        out = super().residual_forward(x, norm)
        return None if out is None else (out, NO_AUX)


class DenseMLP(MLP):
    """The ungated dense FFN (model.gated_ffn=False): ReLU² or GPT-2's GELU, block contract."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return super().forward(x), NO_AUX


def build_mixer(kind: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if kind == "gqa":
        return Attention(cfg, layer_idx)
    if kind == "gated_gqa":
        return Attention(cfg, layer_idx, gated=True)
    if kind == "swa":
        return Attention(cfg, layer_idx, window=cfg.sliding_window)
    if kind == "mla":
        from deepwish.model.mla import MLA
        return MLA(cfg, layer_idx)
    if kind == "dsa":
        from deepwish.model.dsa import DSA
        return DSA(cfg, layer_idx)
    if kind == "gdn":
        from deepwish.model.gated_deltanet import GatedDeltaNet
        return GatedDeltaNet(cfg, layer_idx)
    if kind == "nsa":
        from deepwish.model.nsa import NSA
        return NSA(cfg, layer_idx)
    raise ValueError(f"layer {layer_idx}: mixer {kind!r} is not implemented")


def build_ffn(kind: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if kind == "moe":
        return MoE(cfg, layer_idx)
    if not cfg.gated_ffn:
        return DenseMLP(cfg.d_model, cfg.d_ff, cfg.hidden_act)
    return DenseFFN(cfg.d_model, cfg.d_ff, cfg.hidden_act, cfg.decode_matmul, cfg.decode_pdl, cfg.decode_fusion)


class Block(nn.Module):
    """Pre-norm residual block: x += mixer(norm(x)); x += ffn(norm(x)).

    With model.residual_scales the block first mixes the embedding output back in,
    x <- λ_res·x + λ_0·x0 (two learned scalars, initialised to 1 and 0: the plain block at init)."""

    PARAM_ROLES = {"residual_scales": "scalar"}  # model/roles.py (absent unless residual_scales)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        mixer, ffn = cfg.layer_types[layer_idx]
        self.layer_idx = layer_idx
        self.residual_scales = nn.Parameter(torch.tensor([1.0, 0.0])) if cfg.residual_scales else None
        self.mixer_kind, self.ffn_kind = mixer, ffn
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_zero_centered)
        self.mixer = build_mixer(mixer, cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_zero_centered)
        self.ffn = build_ffn(ffn, cfg, layer_idx)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The block's own scalars (sub-modules initialise themselves): λ_res = 1, λ_0 = 0."""
        if self.residual_scales is not None:
            self.residual_scales.copy_(torch.tensor([1.0, 0.0]))

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache=None) -> tuple[torch.Tensor, dict]:
        if self.residual_scales is not None:
            lam = self.residual_scales.to(x.dtype)
            x = lam[0] * x + lam[1] * ctx.x0
        x, mixer_aux = residual_branch(self.mixer, self.attn_norm, x, ctx, cache)
        x, ffn_aux = residual_branch(self.ffn, self.ffn_norm, x)
        return x, {**mixer_aux, **ffn_aux}


def residual_branch(branch: nn.Module, norm: RMSNorm, x: torch.Tensor, *args) -> tuple[torch.Tensor, dict]:
    """x + branch(norm(x), *args) -> (x, aux). A branch may compute the whole of it itself
    (`residual_forward`, returning None where it cannot): the decode step's GEMVs take the norm into
    the first matmul's prologue and the add into the last one's epilogue (model.decode_fusion),
    kernels that compiled were launches of their own. The stream keeps its dtype
    (Objective.residual_dtype): a branch that returns fp32 under autocast (an MoE's fp32 combine
    weights) does not promote a bf16 stream back to fp32."""
    fused = getattr(branch, "residual_forward", None)
    out = fused(x, norm, *args) if fused is not None else None
    if out is not None:
        return out
    h, aux = branch(norm(x), *args)
    return x + h.to(x.dtype), aux
