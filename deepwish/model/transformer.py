"""The one model definition: training (no cache), prefill and decode (cache), RL and export.

`cfg.layer_types` — derived once in the config — gives every layer a (mixer, ffn) pair, read
only here in `Block.__init__`. forward never branches on strings or layer indices.

Shape legend: B batch, T tokens, d model width, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from deepwish.config import ModelConfig
from deepwish.model.attention import Attention, attention_mask
from deepwish.model.cache import ModelCache
from deepwish.model.mlp import SwiGLU
from deepwish.model.moe import MoE
from deepwish.model.norm import RMSNorm
from deepwish.model.rope import Rotary


@dataclass
class ForwardContext:
    """What every mixer may need besides its input, computed once per forward."""

    positions: torch.Tensor  # [B, T] absolute positions (restart at 0 in each packed document)
    cos: torch.Tensor  # [B, T, R/2] rotary tables for `positions`
    sin: torch.Tensor
    doc_ids: torch.Tensor | None = None  # [B, T] packed-document index, or None
    _masks: dict = field(default_factory=dict)

    def mask(self, window: int = 0) -> torch.Tensor:
        """Causal, same-document (and windowed) boolean mask [B, 1, T, T], built once per window."""
        if window not in self._masks:
            self._masks[window] = attention_mask(self.positions, self.positions, window, self.doc_ids, self.doc_ids)
        return self._masks[window]

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
    raise ValueError(f"layer {layer_idx}: mixer {kind!r} is not implemented")


def build_ffn(kind: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if kind == "moe":
        return MoE(cfg, layer_idx)
    return SwiGLU(cfg.d_model, cfg.d_ff)


class Block(nn.Module):
    """Pre-norm residual block: x += mixer(norm(x)); x += ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        mixer, ffn = cfg.layer_types[layer_idx]
        self.layer_idx = layer_idx
        self.mixer_kind, self.ffn_kind = mixer, ffn
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_zero_centered)
        self.mixer = build_mixer(mixer, cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_zero_centered)
        self.ffn = build_ffn(ffn, cfg, layer_idx)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache=None) -> torch.Tensor:
        x = x + self.mixer(self.attn_norm(x), ctx, cache)
        return x + self.ffn(self.ffn_norm(x))


def rotary_dim(cfg: ModelConfig) -> int:
    if any(m in ("mla", "dsa") for m, _ in cfg.layer_types):
        return cfg.qk_rope_head_dim
    return cfg.rope_dim


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_zero_centered)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg, rotary_dim(cfg))
        if cfg.n_mtp > 0:
            from deepwish.model.mtp import MTP
            self.mtp = nn.ModuleList(MTP(cfg, cfg.n_layers + i) for i in range(cfg.n_mtp))
        else:
            self.mtp = None
        self.reset_parameters()

    # ---- initialisation ------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual-branch outputs (GPT-2 style)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                is_out = name.endswith(("o_proj", "w_down", "out_proj"))
                nn.init.normal_(mod.weight, std=out_std if is_out else std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=std)
            elif mod is not self and hasattr(mod, "reset_parameters") and not isinstance(mod, Transformer):
                mod.reset_parameters()

    # ---- forward -------------------------------------------------------------------
    def context(self, input_ids: torch.Tensor, positions: torch.Tensor | None,
                doc_ids: torch.Tensor | None) -> ForwardContext:
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary(positions)
        return ForwardContext(positions=positions, cos=cos, sin=sin, doc_ids=doc_ids)

    def trunk(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
              doc_ids: torch.Tensor | None = None, cache: ModelCache | None = None) -> torch.Tensor:
        """Hidden states [B, T, d] before the final norm (MTP modules start from these)."""
        ctx = self.context(input_ids, positions, doc_ids)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, None if cache is None else cache[i])
        return x

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      doc_ids: torch.Tensor | None = None, cache: ModelCache | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, d] (the fused loss consumes these)."""
        return self.norm(self.trunk(input_ids, positions, doc_ids, cache))

    @property
    def head_weight(self) -> torch.Tensor:
        """[V, d]: the LM head, or the embedding when tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.head_weight.t() if self.lm_head is None else self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, cache: ModelCache | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]."""
        return self.logits(self.hidden_states(input_ids, positions, doc_ids, cache))

    # ---- decoding --------------------------------------------------------------------
    def make_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> ModelCache:
        """Preallocated per-layer caches for `batch` sequences of up to `max_len` tokens."""
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        p = self.embed.weight
        dtype = dtype or p.dtype
        device = device or p.device
        return ModelCache([b.mixer.make_cache(batch, max_len, dtype, device) for b in self.blocks], max_len, batch)

    # ---- DeepSeek-V3.2 sparse attention: indexer training mode and its loss ---------------
    def set_indexer_mode(self, mode: str) -> None:
        """'off' | 'dense_warmup' | 'sparse' on every DSA layer (see model/dsa.py)."""
        layers = [m for m in self.modules() if hasattr(m, "set_indexer_mode") and m is not self]
        if not layers and mode != "off":
            raise ValueError(f"indexer mode {mode!r} asked for, but the model has no DSA layers")
        for m in layers:
            m.set_indexer_mode(mode)

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward, name -> scalar (unweighted): 'indexer' is the
        mean over DSA layers (MTP blocks included) of the indexer KL."""
        ix = [m.last_indexer_loss for m in self.modules() if getattr(m, "last_indexer_loss", None) is not None]
        return {"indexer": torch.stack(ix).mean()} if ix else {}

    # ---- bookkeeping -------------------------------------------------------------------
    def moe_stats(self) -> list[dict]:
        """Per MoE layer: {layer, aux_loss (tensor or None), tokens_per_expert [E]} of the last forward."""
        out = []
        for b in self.blocks:
            if isinstance(b.ffn, MoE) and b.ffn.last_stats:
                out.append({"layer": b.layer_idx, **b.ffn.last_stats})
        return out

    def num_params(self, active: bool = False) -> int:
        """Parameter count; `active=True` counts only the top-k routed experts of MoE layers."""
        total = 0
        for name, p in self.named_parameters():
            n = p.numel()
            if active and (name.endswith("w_gate_up") or name.endswith("w_down")) and p.dim() == 3:
                n = n * self.cfg.n_experts_per_tok // self.cfg.n_experts
            total += n
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·(active matmul params) + causal attention 6·L·H·D·T."""
        n = self.num_params(active=True) - self.embed.weight.numel()
        if self.lm_head is None:
            n += self.embed.weight.numel()  # the tied head is still a matmul
        attn = 0
        for b in self.blocks:
            if b.mixer_kind in ("gqa", "gated_gqa"):
                attn += 6 * self.cfg.n_heads * self.cfg.head_dim * seq_len
            elif b.mixer_kind in ("mla", "dsa"):
                c = self.cfg
                attn += 3 * c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * seq_len
            elif b.mixer_kind == "swa":
                attn += 6 * self.cfg.n_heads * self.cfg.head_dim * min(seq_len, self.cfg.sliding_window)
        return 6.0 * n + attn
