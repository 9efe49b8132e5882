"""The one model definition: training (no cache), prefill and decode (cache), RL and export.

One forward contract serves every consumer:

    out = model(input_ids, positions=None, doc_ids=None, cache=None, targets=None,
                objective=Objective(), logits_to_keep=0, return_hidden=False)   -> ModelOutput

- inference: `out.logits` [B, T, V] (the last `logits_to_keep` positions when > 0);
- training: with `targets`, `out.loss` (the objective of model/objective.py: cross-entropy, MTP,
  MoE balance and DSA indexer losses, each named in `out.aux_losses` with its weight applied),
  the summed CE and target count for logging, and the per-layer MoE loads (MTP blocks included),
  which `update_router_bias` turns into the aux-loss-free bias step.
Modes that change the computation (DSA indexer mode, MTP on/off, loss backend) are fields of the
`Objective` argument, never state left on the model. Data parallelism, compilation and activation
checkpointing wrap this module from outside (train/parallel.py).

Shape legend: B batch, T tokens, d model width, V vocabulary, E experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import nn

from deepwish.config import ModelConfig
from deepwish.model.attention import AttnBackends
from deepwish.model.block import Block, ForwardContext
from deepwish.model.cache import ModelCache
from deepwish.model.moe import MoE
from deepwish.model.mtp import MTP, mtp_ce_sums
from deepwish.model.norm import EmbedNorm, RMSNorm
from deepwish.model.objective import Objective, cross_entropy_sums, IGNORE_INDEX
from deepwish.model.roles import (EXPERT_ROLES, NORMAL_INIT_ROLES, OWNER_INIT_ROLES, RESIDUAL_OUT_ROLES,
                                  param_roles)
from deepwish.model.rope import Rotary

DEFAULT_OBJECTIVE = Objective()


@dataclass
class ModelOutput:
    """What one forward returns (module docstring). Fields a forward did not compute are None."""

    logits: torch.Tensor | None = None  # [B, T, V] (or the last logits_to_keep positions); None when fused
    hidden: torch.Tensor | None = None  # [B, T, d] final-normed hidden states (return_hidden=True)
    loss: torch.Tensor | None = None  # scalar objective (targets given)
    ce_sum: torch.Tensor | None = None  # Σ cross-entropy (+ z-loss when fused) over the targets
    z_sum: torch.Tensor | None = None  # Σ z-loss (0 when fused with the CE)
    n_targets: torch.Tensor | None = None  # targets that count (!= -100)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> weighted term of `loss`
    moe_loads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> tokens per expert [E]


# A pytree node, so DDP's output hooks, torch.compile and the checkpoint wrappers see its tensors.
pytree.register_dataclass(ModelOutput)


def rotary_dim(cfg: ModelConfig) -> int:
    if any(m in ("mla", "dsa") for m, _ in cfg.layer_types):
        return cfg.qk_rope_head_dim
    return cfg.rope_dim


class ValueEmbeddings(nn.Module):
    """GPT family (model.value_embeds = K): K token tables of KV width [V, Hkv·D]; table k's rows
    are added, gated by the layer's attention, to the values of layer k and of layer n - K + k."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = cfg.value_embed_layers  # {layer: table}
        self.tables = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.n_kv_heads * cfg.head_dim)
                                    for _ in range(cfg.value_embeds))

    def forward(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.by_layer([t(input_ids) for t in self.tables])

    def by_layer(self, rows: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """{layer: its table's rows} from the K tables' lookups."""
        return {layer: rows[k] for layer, k in self.layers.items()}


class GatedAdd(nn.Module):
    """x + g·s (a U-net skip's entry). A module of its own, like `EmbedNorm` and the final norm, so
    that training compiles it as it compiles the blocks (train/parallel.py, `Transformer.
    stack_modules`): eager, it is separate passes over the fp32 residual stream, more in backward."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x + gate.to(x.dtype) * skip


class UNetSkips(nn.Module):
    """GPT family (model.unet_skips): the outputs of the first n//2 blocks are added, each scaled by
    a learned gate, to the inputs of the mirrored blocks of the second half (block n-1-i takes
    block i's output). Gates start at 1 (modded-nanogpt); at 0 the stack is the plain one."""

    PARAM_ROLES = {"gates": "scalar"}

    def __init__(self, n_layers: int):
        super().__init__()
        self.n_layers, self.half = n_layers, n_layers // 2
        self.gates = nn.Parameter(torch.ones(self.half))
        self.mix = GatedAdd()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.gates.fill_(1.0)

    def enter(self, i: int, x: torch.Tensor, stack: list[torch.Tensor]) -> torch.Tensor:
        """Block i's input: x plus the gated output of its mirror in the first half, if any."""
        j = self.n_layers - 1 - i  # the mirror
        if i >= self.n_layers - self.half:
            return self.mix(x, self.gates[j], stack[j])
        return x

    def leave(self, i: int, x: torch.Tensor, stack: list[torch.Tensor]) -> None:
        if i < self.half:
            stack.append(x)


class Transformer(nn.Module):
    PARAM_ROLES = {"lm_head.weight": "head"}  # model/roles.py

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # GPT-2 absolute positions (model.position=learned): a lookup added to the token embedding, no rotary
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.value_embeds = ValueEmbeddings(cfg) if cfg.value_embeds > 0 else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.skips = UNetSkips(cfg.n_layers) if cfg.unet_skips else None
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_zero_centered)
        self.embed_norm = EmbedNorm(cfg.norm_eps) if cfg.embed_norm else None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # the tied table is the head too, and the head's side bounds its stable step: it takes the
            # head's optimizer group (train.head_lr), not the embeddings' (embed_lr 0.3 in gpt_124m
            # diverges as a head: val loss 8.56 after 100 steps where the untied model has 3.34)
            self.PARAM_ROLES = {"embed.weight": "head"}
        self.rotary = Rotary(cfg, rotary_dim(cfg))  # unused (ctx.cos None) with learned positions
        self.mtp = nn.ModuleList(MTP(cfg, cfg.n_layers + i) for i in range(cfg.n_mtp)) if cfg.n_mtp > 0 else None
        # whether a layer runs packed documents through the flash kernel (then `context` makes its
        # document bounds once per forward)
        self._flash_packed = any(isinstance(getattr(m, "backends", None), AttnBackends) and m.backends.packed == "triton"
                                 for m in self.modules())  # attention, MLA, NSA's window branch
        self.reset_parameters()

    # ---- parameters ----------------------------------------------------------------------
    def param_roles(self) -> dict[str, str]:
        """{parameter name: role} (model/roles.py): read by optimizer groups, init and counts."""
        return param_roles(self)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter by its role: N(0, init_std), residual-stream outputs
        N(0, init_std/√(2L)) (GPT-2 style), biases 0, norms / convs / scalars by their owner."""
        roles = self.param_roles()
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for mname, mod in self.named_modules():
            own = [(f"{mname}.{n}" if mname else n, p) for n, p in mod.named_parameters(recurse=False)]
            if any(roles.get(n) in OWNER_INIT_ROLES for n, _ in own):
                mod.reset_parameters()
            for n, p in own:
                role = roles.get(n)  # None: a tied parameter already initialised under its first name
                if role in NORMAL_INIT_ROLES:
                    nn.init.normal_(p, std=out_std if role in RESIDUAL_OUT_ROLES else std)
                elif role == "bias":
                    nn.init.zeros_(p)

    def num_params(self, active: bool = False, mtp: bool | None = None) -> int:
        """Parameter count; `active=True` counts only the top-k routed experts of MoE layers.
        mtp: None = everything, True = only the MTP modules, False = everything but them."""
        total = 0
        for name, role in self.param_roles().items():
            if mtp is not None and name.startswith("mtp.") != mtp:
                continue
            n = self.get_parameter(name).numel()
            if active and role in EXPERT_ROLES:
                n = n * self.cfg.n_experts_per_tok // self.cfg.n_experts
            total += n
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·(active matmul params) + attention and gated-delta terms,
        counted as train/mfu.py documents (the one count behind every MFU figure).
        Every parameter but the embedding lookup is counted as a matmul (the tied head is one)."""
        from deepwish.train.mfu import attention_flops_per_token, gated_delta_flops_per_token, mean_keys

        c = self.cfg
        n = self.num_params(active=True) - self.embed.weight.numel()
        if self.lm_head is None:
            n += self.embed.weight.numel()
        for lookup in (self.pos_embed, self.value_embeds):  # table lookups, not matmuls
            n -= sum(p.numel() for p in lookup.parameters()) if lookup is not None else 0
        mixer = 0.0
        for b in self.blocks:
            if b.mixer_kind in ("gqa", "gated_gqa") and b.mixer.sparse is not None:
                from deepwish.model.block_sparse import mean_visible_keys
                mixer += attention_flops_per_token(c.n_heads, c.head_dim, c.head_dim,
                                                   mean_visible_keys(seq_len, *b.mixer.sparse))
            elif b.mixer_kind in ("gqa", "gated_gqa", "swa"):  # the mixer's window: swa's, or the layer pattern's
                mixer += attention_flops_per_token(c.n_heads, c.head_dim, c.head_dim, mean_keys(seq_len, b.mixer.window))
            elif b.mixer_kind in ("mla", "dsa"):
                mixer += attention_flops_per_token(c.n_heads, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim,
                                                   mean_keys(seq_len))
            elif b.mixer_kind == "nsa":  # window + selected blocks + compressed tokens (train/mfu.py)
                m = b.mixer
                keys = (mean_keys(seq_len, m.window_size) + min(m.n_select * m.select_len, seq_len / 2)
                        + mean_keys(seq_len) / m.cmp_stride)
                mixer += attention_flops_per_token(c.n_heads, c.head_dim, c.head_dim, keys)
            elif b.mixer_kind == "gdn":
                mixer += gated_delta_flops_per_token(c.linear_n_v_heads, c.linear_k_head_dim, c.linear_v_head_dim)
        return 6.0 * n + mixer

    # ---- forward -------------------------------------------------------------------------
    def context(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, objective: Objective = DEFAULT_OBJECTIVE,
                indexer_loss: bool = False) -> ForwardContext:
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary(positions) if self.pos_embed is None else (None, None)
        bounds = None
        if doc_ids is not None and self._flash_packed:  # once here, not in each layer's kernel call
            from deepwish.kernels.attention.triton import document_bounds
            bounds = document_bounds(doc_ids, B, T, doc_ids.device)
        return ForwardContext(positions=positions, cos=cos, sin=sin, doc_ids=doc_ids,
                              dense_indexer_attention=objective.indexer_mode == "dense_warmup",
                              indexer_loss=indexer_loss, window_blocks=objective.window_blocks, doc_bounds=bounds)

    def embed_tokens(self, input_ids: torch.Tensor, ctx: ForwardContext,
                     residual_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x0 [B,T,d]: token embedding (+ learned positions), RMS-normed with model.embed_norm, in
        residual_dtype under autocast (Objective.residual_dtype); fills the context's GPT-family side
        inputs (x0 for residual scales, value-embedding rows)."""
        value_rows = None
        if self.cfg.embed_backend == "triton":  # every token table in one lookup: one sort in the backward
            from deepwish.kernels.embedding import lookups
            tables = [self.embed] + (list(self.value_embeds.tables) if self.value_embeds is not None else [])
            x, *value_rows = lookups(input_ids, [t.weight for t in tables], "triton")
        else:  # auto, torch: the modules, each its own lookup
            x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(ctx.positions)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if residual_dtype is not None and torch.is_autocast_enabled(x.device.type):
            x = x.to(residual_dtype)
        if self.cfg.residual_scales:
            ctx.x0 = x
        if self.value_embeds is not None:
            ctx.value_embeds = (self.value_embeds(input_ids) if value_rows is None
                                else self.value_embeds.by_layer(value_rows))
        return x

    def stack_modules(self) -> list[nn.Module]:
        """The modules the stack runs on the residual stream between the blocks (the final norm, the
        GPT family's x0 norm and skip entries): training compiles them in place beside the blocks."""
        mods = [self.norm, self.embed_norm, self.skips.mix if self.skips is not None else None]
        return [m for m in mods if m is not None]

    @property
    def head_weight(self) -> torch.Tensor:
        """[V, d]: the LM head, or the embedding when tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head: final-normed hidden states [..., d] -> logits [..., V] (soft-capped
        c·tanh(z/c) with model.logit_softcap = c > 0)."""
        z = h @ self.head_weight.t() if self.lm_head is None else self.lm_head(h)
        c = self.cfg.logit_softcap
        return c * torch.tanh(z / c) if c > 0 else z

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, cache: ModelCache | None = None,
                targets: torch.Tensor | None = None, objective: Objective = DEFAULT_OBJECTIVE,
                logits_to_keep: int = 0, return_hidden: bool = False) -> ModelOutput:
        """input_ids [B, T] -> ModelOutput (module docstring). positions [B, T] (default 0..T-1),
        doc_ids [B, T] packed-document ids, cache: preallocated (make_cache), targets [B, T]
        (-100 = ignore), logits_to_keep: only the last n positions' logits (inference)."""
        train_aux = targets is not None
        ctx = self.context(input_ids, positions, doc_ids, objective,
                           indexer_loss=train_aux and objective.indexer_mode != "off" and objective.indexer_weight > 0)
        x = self.embed_tokens(input_ids, ctx, objective.residual_dtype)
        block_aux = []
        stack: list[torch.Tensor] = []  # U-net skips: first-half outputs
        for i, block in enumerate(self.blocks):
            if self.skips is not None:
                x = self.skips.enter(i, x, stack)
            if ctx.value_embeds:
                ctx.value_embed = ctx.value_embeds.get(block.layer_idx)
            x, aux = block(x, ctx, None if cache is None else cache[i])
            if self.skips is not None:
                self.skips.leave(i, x, stack)
            block_aux.append((block.layer_idx, aux))
        h = self.norm(x)
        out = ModelOutput(hidden=h if return_hidden else None)
        if targets is None:
            out.logits = self.logits(h[:, -logits_to_keep:] if logits_to_keep else h)
        else:
            out.ce_sum, out.z_sum, out.logits = cross_entropy_sums(h, self.logits, self.head_weight, targets, objective,
                                                                   softcap=self.cfg.logit_softcap)
            out.n_targets = (targets != IGNORE_INDEX).sum()
            if self.mtp is not None and objective.mtp_weight > 0:
                hidden = []
                for k in range(1, len(self.mtp) + 1):
                    hk, aux = self._mtp_depth(k, hidden[-1] if hidden else h, input_ids, ctx)
                    hidden.append(hk)
                    block_aux.append((self.cfg.n_layers + k - 1, aux))
                sums, _ = mtp_ce_sums(hidden, self.logits, targets, doc_ids)
                out.aux_losses["mtp"] = sums.mean()  # normalised with the CE below
        out.moe_loads = {layer: aux["moe_load"] for layer, aux in block_aux if "moe_load" in aux}
        if train_aux:
            self._objective(out, block_aux, objective)
        return out

    def _objective(self, out: ModelOutput, block_aux: list, objective: Objective) -> None:
        """Fill out.loss and the weighted out.aux_losses (model/objective.py)."""
        norm = objective.loss_norm if objective.loss_norm is not None else out.n_targets.clamp_min(1).float()
        share = out.n_targets.float() / norm
        loss = (out.ce_sum + out.z_sum) / norm
        weighted = {}
        if "mtp" in out.aux_losses:
            weighted["mtp"] = objective.aux_weight("mtp") * out.aux_losses["mtp"] / norm
        moe = [aux["moe_aux"].float() for _, aux in block_aux if "moe_aux" in aux]
        if moe:
            weighted["moe"] = objective.aux_weight("moe") * share * torch.stack(moe).sum()
        indexer = [aux["indexer"] for _, aux in block_aux if "indexer" in aux]
        if indexer:
            weighted["indexer"] = objective.aux_weight("indexer") * share * torch.stack(indexer).mean().float()
        unknown = {k for _, aux in block_aux for k in aux} - {"moe_load", "moe_aux", "indexer"}
        if unknown:
            raise KeyError(f"block side results {sorted(unknown)} have no place in the objective (model/objective.py)")
        for term in weighted.values():
            loss = loss + term
        out.loss, out.aux_losses = loss, weighted

    # ---- multi-token prediction (DeepSeek-V3, model/mtp.py) ---------------------------------
    def _mtp_depth(self, depth: int, h_prev: torch.Tensor, input_ids: torch.Tensor, ctx: ForwardContext,
                   cache=None) -> tuple[torch.Tensor, dict]:
        ahead = torch.roll(input_ids, -depth, dims=1)  # token i+k at position i; the tail wraps (ignored)
        return self.mtp[depth - 1](h_prev, self.embed(ahead), ctx, cache)

    def mtp_hidden(self, depth: int, h_prev: torch.Tensor, tokens_ahead: torch.Tensor,
                   positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                   cache=None) -> torch.Tensor:
        """One MTP depth over a chunk: h_prev [B,T,d] (depth-1's normed states; depth 1 reads the
        model's final hidden states), tokens_ahead [B,T] = t_{i+depth}, cache: this depth's block
        cache (`make_mtp_caches`) -> normed h^depth [B,T,d], whose logits predict t_{i+depth+1}."""
        if self.mtp is None:
            raise ValueError("the model has no MTP modules (n_mtp == 0)")
        ctx = self.context(tokens_ahead, positions, doc_ids)
        h, _ = self.mtp[depth - 1](h_prev, self.embed(tokens_ahead), ctx, cache)
        return h

    # ---- routers -------------------------------------------------------------------------
    def moe_layers(self) -> dict[int, MoE]:
        """Layer index -> MoE module, MTP blocks included (index n_layers + depth - 1)."""
        blocks = list(self.blocks) + ([m.block for m in self.mtp] if self.mtp is not None else [])
        return {b.layer_idx: b.ffn for b in blocks if isinstance(b.ffn, MoE)}

    @torch.no_grad()
    def update_router_bias(self, loads: dict[int, torch.Tensor], rate: float) -> None:
        """DeepSeek-V3 aux-loss-free balancing: one correction-bias step per optimizer step from the
        step's summed loads {layer: tokens per expert [E]} (every MoE layer, MTP blocks included)."""
        layers = self.moe_layers()
        for layer, load in loads.items():
            layers[layer].update_correction_bias(load, rate)

    # ---- decoding --------------------------------------------------------------------------
    def make_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> ModelCache:
        """Preallocated per-layer caches for `batch` sequences of up to `max_len` tokens."""
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        p = self.embed.weight
        dtype = dtype or p.dtype
        device = device or p.device
        return ModelCache([b.mixer.make_cache(batch, max_len, dtype, device) for b in self.blocks], max_len, batch)

    def make_mtp_caches(self, batch: int, max_len: int) -> list:
        """One cache per MTP depth (its block's mixer), for self-speculative decoding."""
        if self.mtp is None:
            raise ValueError("the model has no MTP modules (n_mtp == 0)")
        p = self.embed.weight
        return [m.block.mixer.make_cache(batch, max_len, p.dtype, p.device) for m in self.mtp]
