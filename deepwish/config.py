"""Frozen configuration dataclasses, YAML presets and `--set` overrides.

A preset is a YAML file whose top-level sections (`model`, `train`, `data`) map 1:1 onto
the dataclasses below. An unknown key is an error that names the key and the file, so a
typo never silently falls back to a default.

Per-layer structure is *derived* here, once (`layer_types`), and consumed only by
`Block.__init__`; model code never branches on layer indices.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

import yaml

PRESET_DIR = Path(__file__).parent / "configs"

MIXERS = ("gqa", "gated_gqa", "mla", "gdn", "nsa", "dsa", "swa")
FFNS = ("dense", "moe")
BACKENDS = ("auto", "torch", "triton", "fla")
ROPE_TYPES = ("default", "yarn", "linear", "dynamic", "llama3", "longrope")
POSITIONS = ("rope", "learned")
WINDOW_BLOCK = 128  # tokens per window block: window_short / window_long and the window schedule count these


class ConfigError(ValueError):
    """A configuration that cannot be honoured; the message names the key and the source."""


def _activation_problem(name: str) -> str | None:
    from deepwish.model.mlp import activation  # imported late: the table lives with the MLP
    try:
        activation(name)
    except ValueError as e:
        return str(e)
    return None


@dataclass(frozen=True)
class ModelConfig:
    # --- identity -------------------------------------------------------------------
    family: str = "qwen3"  # qwen3 | qwen3_moe | qwen3_next | deepseek_v3 | deepseek_v32 | gpt
    # --- trunk ----------------------------------------------------------------------
    vocab_size: int = 151936
    d_model: int = 1024  # hidden size
    n_layers: int = 28
    n_heads: int = 16  # query heads
    n_kv_heads: int = 8  # key/value heads (GQA groups)
    head_dim: int = 128  # may differ from d_model // n_heads (Qwen3 does this)
    d_ff: int = 3072  # SwiGLU inner size of dense FFNs
    hidden_act: str = "silu"  # activation of the gated FFNs (dense, experts, shared): model/mlp.py ACTIVATIONS
    norm_eps: float = 1e-6
    norm_zero_centered: bool = False  # Qwen3-Next: x̂·(1+w) with w initialised at 0
    tie_embeddings: bool = False  # head shares the embedding matrix
    max_seq_len: int = 40960  # max_position_embeddings; caches are sized at most to this
    init_std: float = 0.02
    # --- attention ------------------------------------------------------------------
    qk_norm: bool = True  # per-head RMSNorm on q and k (Qwen3)
    attn_bias: bool = False  # bias on the q/k/v/o projections (MLA: q_a, kv_a, o), as HF's attention_bias
    attn_output_gate: bool = False  # Qwen3-Next gated attention: sigmoid gate from q_proj
    sliding_window: int = 0  # 0 = full causal attention; >0 for "swa" layers
    attn_backend: str = "auto"  # auto | triton | flex | sdpa | torch (explicit softmax); model/attention.py
    # q/k/v weights as row views of one [q+2kv, d] tensor, projected by one matmul when no gradient is
    # needed (decode); the parameters, their names and the checkpoints stay q_proj/k_proj/v_proj
    fuse_projections: bool = True
    # a decode step's QK-norm, rotary and k/v cache write in one kernel (kernels/attention/decode.py
    # decode_prologue) wherever the own split-KV decode kernel reads a plain cache after the fused
    # q/k/v projection (Qwen3's layers); false: the separate ops (compiled, five kernels a layer).
    # Qwen3-0.6B's captured step 1.228 -> 1.116 ms on one H200 (reports/inference.md)
    decode_prologue: bool = True
    # torch: every matmul through F.linear (cuBLAS) | triton: inference matmuls of <= 16 rows on CUDA (a decode
    # step of batch <= 16: q/k/v, o, gate/up, down) through kernels/gemv, the rest through F.linear |
    # auto: triton on CUDA (Qwen3-0.6B decode step 1.25 vs 1.52 ms on one H200, reports/inference.md)
    decode_matmul: str = "auto"
    # the decode step's GEMVs take in the ops around them (kernels/gemv/triton.py): each pre-norm
    # (RMSNorm) in the prologue of the projection after it, SwiGLU's activation in the down
    # projection's prologue, the residual add in the o and down projections' epilogues (model/block.py
    # residual_branch): three kernels a layer fewer for Qwen3's dense blocks. Applies where the GEMV serves
    # the step (decode_matmul auto / triton on CUDA); 1.116 -> 1.042 ms a step on one H200 (reports/inference.md).
    # The split-KV merge stays its own kernel: merged inside the split kernel the step was 2-7% slower
    # on one H100, so that form was removed (2026-12-07, reports/inference.md)
    decode_fusion: bool = True
    # the decode step's own kernels (GEMV, prologue, split-KV attention) launched with programmatic
    # dependent launch (kernels/pdl.py; Hopper or later): each starts while the one before finishes.
    # auto: where the GPU has it | on: required (an error elsewhere) | off. With decode_fusion
    # 1.042 -> 0.909-0.919 ms a step on one H200; without it no faster (reports/inference.md)
    decode_pdl: str = "auto"
    # weight gradients of the token tables read at the same ids (the embedding and the GPT family's
    # value-embedding tables): torch: each table an nn.Embedding (its backward sorts the ids per table) |
    # triton: one sort for all tables and a run-sum kernel (kernels/embedding) | auto: torch (the kernel's
    # first form measured slower than torch's on an H200, reports/speedrun.md run 6; its chunked form is untimed)
    embed_backend: str = "auto"
    # --- rotary ---------------------------------------------------------------------
    rope_theta: float = 1_000_000.0
    rope_partial: float = 1.0  # fraction of head_dim that is rotated (Qwen3-Next: 0.25)
    rope_interleave: bool = False  # pairs (2i, 2i+1) instead of halves (DeepSeek MLA weights)
    rope_type: str = "default"  # default | yarn | linear | dynamic | llama3 | longrope (model/rope.py)
    rope_factor: float = 1.0  # scaling factor (yarn, linear, dynamic, llama3, longrope)
    rope_original_max_len: int = 0  # original_max_position_embeddings (yarn, llama3, longrope)
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors up to the original length
    rope_long_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors beyond it
    rope_attention_factor: float = 0.0  # longrope: cos/sin scale (0 = derived from factor)
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0  # DeepSeek YaRN: softmax scale multiplied by mscale(factor, this)²
    yarn_mscale_all_dim: float = 0.0  # DeepSeek YaRN: denominator of the attention factor
    yarn_attention_factor: float = 0.0  # 0 = derived (0.1·ln(factor)+1), else explicit
    # --- layer pattern --------------------------------------------------------------
    mixer: str = "gqa"  # default mixer of every layer
    layer_mixers: tuple[str, ...] = ()  # explicit mixer of every layer (overrides mixer/interval when set)
    full_attention_interval: int = 0  # hybrid: every k-th layer is `attn_mixer`, others `mixer`
    attn_mixer: str = "gated_gqa"  # the full-attention mixer of a hybrid stack
    first_k_dense: int = 0  # the first k layers use a dense FFN even in an MoE model
    moe_every: int = 1  # decoder_sparse_step: every k-th layer (after first_k_dense) is MoE
    dense_layers: tuple[int, ...] = ()  # mlp_only_layers: explicit dense layers in an MoE model
    # --- mixture of experts ---------------------------------------------------------
    n_experts: int = 0  # routed experts; 0 = dense model
    n_experts_per_tok: int = 0  # top-k
    d_ff_expert: int = 0  # moe_intermediate_size
    router: str = "softmax"  # softmax (Qwen3-MoE) | sigmoid (DeepSeek-V3) | centroid (cosine to learned centroids)
    router_temperature: float = 0.1  # centroid router: softmax(cos / temperature); smaller is sharper
    norm_topk_prob: bool = True  # renormalise the chosen k weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies routed weights (DeepSeek), independent of norm
    n_group: int = 1  # group-limited routing: experts split into groups
    topk_group: int = 1  # groups kept per token
    n_shared_experts: int = 0  # DeepSeek shared experts (summed into one wide SwiGLU)
    d_ff_shared: int = 0  # Qwen3-Next shared expert size (used when shared_expert_gate)
    shared_expert_gate: bool = False  # Qwen3-Next: sigmoid(x·w) scales the shared expert
    router_aux_loss_coef: float = 0.0  # Switch-style load-balancing loss weight
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss weight
    bias_update_rate: float = 0.0  # aux-loss-free balancing: correction-bias step per update
    # --- multi-head latent attention (DeepSeek) ------------------------------------
    q_lora_rank: int = 0  # 0 = full-rank query projection (V2-Lite)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # --- DeepSeek-V3.2 sparse attention (lightning indexer) ------------------------
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    dsa_backend: str = "auto"  # auto | triton: row-block indexer + sparse_mla; torch: the dense reference; model/dsa.py
    # --- Gated DeltaNet (Qwen3-Next linear attention) ------------------------------
    linear_n_k_heads: int = 0
    linear_n_v_heads: int = 0
    linear_k_head_dim: int = 0
    linear_v_head_dim: int = 0
    linear_conv_kernel: int = 4
    gdn_backend: str = "auto"  # auto | torch | triton | fla
    # --- native sparse attention (mixer 'nsa', model/nsa.py) -----------------------
    nsa_cmp_len: int = 32  # l: tokens per compression block
    nsa_cmp_stride: int = 16  # d: stride between compression blocks (they overlap by l - d)
    nsa_select_len: int = 64  # l': tokens per selection block (a multiple of d)
    nsa_n_select: int = 16  # n: selection blocks per query and KV group, the initial and local ones included
    nsa_n_local: int = 2  # blocks always selected: the one holding the query and the nsa_n_local - 1 before it
    nsa_window: int = 512  # tokens of the sliding-window branch
    nsa_gate: str = "sigmoid"  # sigmoid: per-head gates from the input | sum: the three branches added
    nsa_backend: str = "auto"  # compressed/selected kernels: auto (triton on CUDA) | triton | torch
    # --- multi-token prediction -----------------------------------------------------
    n_mtp: int = 0  # num_nextn_predict_layers
    # --- GPT family (modded-nanogpt style); every switch is off at its default ----------
    fused_qkv: bool = False  # q, k, v as one [3, H·D, d] stack `qkv_weight` (one matmul, Muon per slice); H = Hkv
    attn_softcap: float = 0.0  # attention scores c·tanh(s/c); 0 = off
    logit_softcap: float = 0.0  # LM-head logits c·tanh(z/c); 0 = off
    window_pattern: str = ""  # per-layer S(hort)/L(ong) windows or B(lock-sparse), tiled ("SSSL"); "" = off
    window_short: int = 0  # S window in WINDOW_BLOCK-token blocks
    window_long: int = 0  # L window in blocks; 0 = full causal attention
    sparse_local: int = 0  # B layers: local dense blocks (the diagonal included); model/block_sparse.py
    sparse_stride: int = 0  # B layers: long links to every stride-th earlier block (0 = none, 1 = full causal)
    residual_scales: bool = False  # learned x <- λ_res·x + λ_0·x0 at every block entry (x0: embedding output)
    unet_skips: bool = False  # first-half block outputs added, gated, to the inputs of the mirrored second half
    value_embeds: int = 0  # K value-embedding tables, added (gated) to the values of the first K and last K layers
    gated_ffn: bool = True  # False: plain MLP down(act(up(x))) (ReLU² with hidden_act=relu2, GPT-2 GELU)
    position: str = "rope"  # rope | learned (GPT-2 absolute position embeddings, no rotary)
    embed_norm: bool = False  # RMSNorm (no gain) on the embedding output

    def __post_init__(self) -> None:
        checks = [
            (self.family in ("qwen3", "qwen3_moe", "qwen3_next", "deepseek_v3", "deepseek_v32", "gpt"),
             f"family={self.family!r} is not one of qwen3, qwen3_moe, qwen3_next, deepseek_v3, deepseek_v32, gpt"),
            (self.mixer in MIXERS, f"mixer={self.mixer!r} is not one of {MIXERS}"),
            (self.attn_mixer in MIXERS, f"attn_mixer={self.attn_mixer!r} is not one of {MIXERS}"),
            (self.n_heads % max(self.n_kv_heads, 1) == 0,
             f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"),
            (self.router in ("softmax", "sigmoid", "centroid"),
             f"router={self.router!r} is not softmax, sigmoid or centroid"),
            (self.router_temperature > 0 and self.router_temperature != float("inf"),
             f"router_temperature={self.router_temperature} must be a finite number > 0"),
            (self.n_experts == 0 or 0 < self.n_experts_per_tok <= self.n_experts,
             f"n_experts_per_tok={self.n_experts_per_tok} must be in 1..n_experts={self.n_experts}"),
            (self.n_experts == 0 or self.n_experts % self.n_group == 0,
             f"n_experts={self.n_experts} must be divisible by n_group={self.n_group}"),
            (self.topk_group <= self.n_group, f"topk_group={self.topk_group} > n_group={self.n_group}"),
            (self.gdn_backend in BACKENDS, f"gdn_backend={self.gdn_backend!r} is not one of {BACKENDS}"),
            (self.attn_backend in ("auto", "triton", "flex", "sdpa", "torch"),
             f"attn_backend={self.attn_backend!r} is not one of auto, triton, flex, sdpa, torch"),
            (self.decode_matmul in ("auto", "torch", "triton"),
             f"decode_matmul={self.decode_matmul!r} is not one of auto, torch, triton"),
            (self.decode_pdl in ("auto", "on", "off"), f"decode_pdl={self.decode_pdl!r} is not one of auto, on, off"),
            (self.embed_backend in ("auto", "torch", "triton"),
             f"embed_backend={self.embed_backend!r} is not one of auto, torch, triton"),
            (self.dsa_backend in ("auto", "triton", "torch"),
             f"dsa_backend={self.dsa_backend!r} is not one of auto, triton, torch"),
            (self.rope_type in ROPE_TYPES, f"rope_type={self.rope_type!r} is not one of {ROPE_TYPES}"),
            (0.0 < self.rope_partial <= 1.0, f"rope_partial={self.rope_partial} must be in (0, 1]"),
            (_activation_problem(self.hidden_act) is None, _activation_problem(self.hidden_act)),
            (not self.layer_mixers or len(self.layer_mixers) == self.n_layers,
             f"layer_mixers has {len(self.layer_mixers)} entries for n_layers={self.n_layers}"),
            (set(self.layer_mixers) <= set(MIXERS), f"layer_mixers={self.layer_mixers} has entries not in {MIXERS}"),
            (self.position in POSITIONS, f"position={self.position!r} is not one of {POSITIONS}"),
            (set(self.window_pattern) <= {"S", "L", "B"},
             f"window_pattern={self.window_pattern!r} may hold only S, L and B"),
            ("S" not in self.window_pattern or self.window_short > 0,
             f"window_pattern={self.window_pattern!r} needs window_short > 0 (blocks of {WINDOW_BLOCK} tokens)"),
            ("B" not in self.window_pattern or self.sparse_local > 0,
             f"window_pattern={self.window_pattern!r} needs sparse_local > 0 for its block-sparse (B) layers"),
            (self.sparse_stride >= 0, "sparse_stride must be >= 0"),
            (self.window_short >= 0 and self.window_long >= 0, "window_short and window_long must be >= 0"),
            (self.attn_softcap >= 0 and self.logit_softcap >= 0, "attn_softcap and logit_softcap must be >= 0"),
            (0 <= 2 * self.value_embeds <= self.n_layers,
             f"value_embeds={self.value_embeds}: the first and last K layers take one table each, so 2K <= n_layers"),
            (self.n_mtp == 0 or not (self.value_embeds or self.unet_skips),
             "value_embeds and unet_skips are trunk-wide and not defined for MTP blocks (n_mtp > 0)"),
        ]
        if any(m == "nsa" for m, _ in self.layer_types):
            checks += self._nsa_checks()
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"model config: {msg}")
        gqa_options = [name for name, on in (("window_pattern", self.window_pattern),
                                             ("position=learned", self.position == "learned"),
                                             ("fused_qkv", self.fused_qkv), ("attn_softcap", self.attn_softcap),
                                             ("value_embeds", self.value_embeds)) if on]
        others = sorted({m for m, _ in self.layer_types} - {"gqa", "gated_gqa"})
        if self.fused_qkv and (self.n_kv_heads != self.n_heads or self.attn_bias
                               or any(m == "gated_gqa" for m, _ in self.layer_types)):
            raise ConfigError("model config: fused_qkv stacks q, k and v as three equal matrices: it needs "
                              "n_kv_heads == n_heads, no attn_bias and no gated_gqa layers")
        if gqa_options and others:
            raise ConfigError(f"model config: {', '.join(gqa_options)} are options of the gqa/gated_gqa attention; "
                              f"this stack also has {', '.join(others)} layers")

    def _nsa_checks(self) -> list[tuple[bool, str]]:
        """What an 'nsa' layer needs of the nsa_* fields (model/nsa.py)."""
        l, d, sl = self.nsa_cmp_len, self.nsa_cmp_stride, self.nsa_select_len
        return [
            (d >= 1 and l >= d, f"nsa_cmp_len={l} and nsa_cmp_stride={d}: need 1 <= stride <= length"),
            (d < 1 or l % d == 0, f"nsa_cmp_len={l} must be a multiple of nsa_cmp_stride={d} (blocks tile the row)"),
            (d < 1 or (sl >= 1 and sl % d == 0),
             f"nsa_select_len={sl} must be a positive multiple of nsa_cmp_stride={d}: a selection block must "
             f"start where a compression block does"),
            (self.nsa_n_local >= 1, f"nsa_n_local={self.nsa_n_local} must be >= 1 (the query's own block)"),
            (self.nsa_n_select >= self.nsa_n_local + 1,
             f"nsa_n_select={self.nsa_n_select} must be >= nsa_n_local + 1 = {self.nsa_n_local + 1} "
             f"(the initial and local blocks are always selected)"),
            (self.nsa_window >= 1, f"nsa_window={self.nsa_window} must be >= 1"),
            (self.nsa_gate in ("sigmoid", "sum"), f"nsa_gate={self.nsa_gate!r} is not sigmoid or sum"),
            (self.nsa_backend in ("auto", "triton", "torch"),
             f"nsa_backend={self.nsa_backend!r} is not one of auto, triton, torch"),
            (self.n_kv_heads >= 1 and self.head_dim >= 1, "nsa layers need n_kv_heads >= 1 and head_dim >= 1"),
        ]

    @property
    def layer_types(self) -> tuple[tuple[str, str], ...]:
        """(mixer, ffn) for every layer, derived once from the pattern fields."""
        out = []
        for i in range(self.n_layers):
            if self.layer_mixers:
                mixer = self.layer_mixers[i]
            elif self.full_attention_interval > 0:
                mixer = self.attn_mixer if (i + 1) % self.full_attention_interval == 0 else self.mixer
            else:
                mixer = self.mixer
            is_moe = (
                self.n_experts > 0
                and i >= self.first_k_dense
                and i not in self.dense_layers
                and (i + 1) % max(self.moe_every, 1) == 0
            )
            out.append((mixer, "moe" if is_moe else "dense"))
        return tuple(out)

    @property
    def gpt_options(self) -> tuple[str, ...]:
        """The GPT-family switches that are on (none of them has an HF counterpart)."""
        return tuple(name for name, on in (
            ("fused_qkv", self.fused_qkv), ("attn_softcap", self.attn_softcap), ("logit_softcap", self.logit_softcap),
            ("window_pattern", self.window_pattern), ("residual_scales", self.residual_scales),
            ("unet_skips", self.unet_skips), ("value_embeds", self.value_embeds),
            ("gated_ffn=false", not self.gated_ffn),
            ("position=learned", self.position == "learned"), ("embed_norm", self.embed_norm)) if on)

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Attention window in tokens of every layer (0 = full causal): window_pattern tiled over the
        layers, S -> window_short blocks, L -> window_long blocks; `sliding_window` for swa layers."""
        out = []
        for i, (mixer, _) in enumerate(self.layer_types):
            if self.window_pattern:
                kind = self.window_pattern[i % len(self.window_pattern)]
                out.append({"S": WINDOW_BLOCK * self.window_short, "L": WINDOW_BLOCK * self.window_long, "B": 0}[kind])
            else:
                out.append(self.sliding_window if mixer == "swa" else 0)
        return tuple(out)

    def block_sparse_layer(self, i: int) -> bool:
        """Layer i attends through the block-sparse mask (a B of window_pattern)."""
        return bool(self.window_pattern) and self.window_pattern[i % len(self.window_pattern)] == "B"

    @property
    def value_embed_layers(self) -> dict[int, int]:
        """{layer: value-embedding table}: table k feeds layer k and layer n_layers - K + k."""
        K, n = self.value_embeds, self.n_layers
        return {**{k: k for k in range(K)}, **{n - K + k: k for k in range(K)}}

    @property
    def rope_dim(self) -> int:
        """Number of rotated channels per head for GQA-style mixers."""
        return int(self.head_dim * self.rope_partial)


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/default"  # checkpoints, metrics.jsonl, plots
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    steps: int = 200  # optimizer steps; also the schedule's horizon (warm-up, decay and floor are planned on it)
    extend_steps: int = 0  # steps run after `steps` at the schedule's final rate (extends a run, same schedule)
    batch_size: int = 8  # sequences per micro-batch (per rank)
    grad_accum: int = 1  # micro-batches per step
    seq_len: int = 256
    optimizer: str = "muon"  # muon | adamw
    lr: float = 3e-3  # AdamW learning rate (embeddings, head, norms, gates, or everything)
    muon_lr: float = 0.02  # Muon learning rate for 2-D hidden matrices
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    muon_ns_schedule: str = "jordan"  # Newton–Schulz coefficients: jordan (original) | polar_express (train/muon.py)
    muon_normuon: bool = False  # NorMuon per-neuron normalisation after orthogonalisation (train/muon.py)
    muon_backend: str = "auto"  # auto (triton on CUDA, torch elsewhere) | torch | triton: Muon's step (train/muon.py)
    # CUDA, optimizer=muon: the AdamW part of the step (embeddings, head, norms) runs on a second stream
    # beside Muon's compute-bound Newton–Schulz (train/optim.py ChainedOptimizer); off until timed
    optimizer_overlap: bool = False
    weight_decay: float = 0.0
    # Per-group settings (train/optim.py param_groups; groups by parameter role): 0 lr = train.lr,
    # negative decay = train.weight_decay. Scalars/gates (norms, biases, gates, scalars) take no decay by default.
    embed_lr: float = 0.0  # token, value and position embeddings (a tied token table is the head: head_lr)
    head_lr: float = 0.0  # the LM head, tied or not
    scalar_lr: float = 0.0  # norms, biases, gates, convolutions, learned scalars
    embed_wd: float = -1.0
    head_wd: float = -1.0
    scalar_wd: float = 0.0
    muon_wd: float = -1.0  # hidden matrices (Muon; AdamW's matrix group with optimizer=adamw)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 = off
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_frac: float = 0.2  # wsd: fraction of steps in the final decay
    # Scheduled shapes (train/schedule.py), each a pure function of the step (resumes exactly):
    window_warmup_frac: float = 0.0  # windows capped, the cap growing from window_start_blocks to seq_len over this
    # fraction of the steps
    window_start_blocks: int = 1  # blocks of 128 tokens
    seq_len_schedule: tuple[int, ...] = ()  # lengths of equal stages over `steps` (each divides seq_len); () = seq_len
    batch_schedule: tuple[int, ...] = ()  # micro-batches per step of equal stages over `steps`; () = grad_accum
    min_lr_frac: float = 0.1  # floor of the schedule as a fraction of peak
    ema_decay: float = 0.0  # 0 = no EMA of weights
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 2  # newest checkpoints kept in out_dir/checkpoints (older ones deleted)
    log_every: int = 10
    loss_backend: str = "auto"  # auto (fused on GPU, torch on CPU) | torch | triton
    z_loss: float = 0.0
    mtp_lambda: float = 0.3  # weight of the multi-token-prediction loss
    mtp_lambda_final: float = -1.0  # <0: constant; else linear ramp to this at the last step
    indexer_mode: str = "off"  # DSA: off | dense_warmup | sparse
    indexer_loss_coef: float = 1.0
    tensorboard: bool = False
    mlflow: bool = False
    mlflow_experiment: str = ""  # MLflow experiment name (empty: mlflow_experiment_id, MLFLOW_EXPERIMENT_ID/_NAME, else "deepwish")
    mlflow_experiment_id: str = ""  # MLflow experiment id, used when mlflow_experiment is empty
    mlflow_run_name: str = ""  # MLflow run name of a new run (empty: the run directory's name)
    # torch.profiler over profile_steps steps of this loop from step profile_start (0-based; 0 steps:
    # off): RUN_DIR/profile/{summary.txt, trace.json.gz}, the GPU's idle time by host phase (train/profile.py)
    profile_steps: int = 0
    profile_start: int = 10
    # Python's garbage collector during the loop: every object alive after the warm-up (model,
    # compiled graphs, caches) is frozen out of its scans, automatic collection is off, and one full
    # collection runs every gc_every steps (0: Python's automatic collection, as outside the loop).
    # An automatic collection of the whole heap can take the host tens of milliseconds in the
    # middle of a step's launches, at an unpredictable step.
    gc_every: int = 50
    sample_tokens: int = 64  # tokens sampled at the end of the run
    sample_prompt: str = "ROMEO:"
    # --- scale-out (train/parallel.py) ---------------------------------------------
    parallel: str = "none"  # none | ddp | fsdp
    compile: str = "auto"  # auto (on for GPU) | on | off
    # inductor's mode for the compiled blocks: default | coordinate-descent (each fused elementwise and
    # reduction kernel's launch config timed at compile time and kept: inductor's coordinate_descent_tuning,
    # GEMMs left to cuBLAS) | max-autotune-no-cudagraphs (that, and GEMMs timed against Triton templates
    # that can take the following elementwise ops into their epilogue; minutes more of compilation,
    # before the clock with compile_warmup). Modes that capture CUDA graphs are refused: untested with
    # per-block compilation, scheduled shapes and accumulation.
    compile_mode: str = "default"
    # before the clock: one forward+backward at every shape the schedules use and the evaluation's
    # forward, no update (train/warmup.py)
    compile_warmup: bool = False
    activation_checkpoint: str = "none"  # none | selective | full
    offload: str = "none"  # none | params | activations
    reshard_after_forward: bool = True  # fsdp: true = ZeRO-3-like (blocks re-gathered for backward); false = ZeRO-2-like (kept gathered until backward)
    dtype: str = "bf16"  # compute dtype under autocast on GPU: bf16 | fp32
    # the residual stream's dtype under bf16 autocast: fp32 (autocast's own: the fp32 embedding rows
    # carry through every residual add) | bf16 (x0 cast once: every elementwise kernel on the stream
    # and every sum of its gradients moves half the bytes; what FSDP2's bf16 parameters give anyway).
    # Matmuls and norm statistics are bf16 / fp32 either way; CPU runs compute in fp32 throughout.
    residual_dtype: str = "fp32"


@dataclass(frozen=True)
class DataConfig:
    train_bin: str = ""  # path to a training shard (empty: the embedded corpus, built on demand)
    val_bin: str = ""
    tokenizer: str = ""  # tokenizer.json path (empty: the embedded corpus's tokenizer)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(cls, name: str, value: Any, source: str) -> Any:
    """Convert a YAML/CLI value to the declared type of `cls.name`, or raise naming both.

    A string (every `--set` value arrives as one) is parsed by the field's type alone: a str
    field keeps it verbatim (`JULIET:`, `no`; one pair of enclosing quotes is removed), a bool takes true/false/yes/no/on/off/1/0, an int
    or a float must parse whole, a tuple is a YAML list. Values already typed by YAML must fit
    the field: a bool is never an int, a non-integral float never an int.
    """
    hint = get_type_hints(cls)[name]
    origin = getattr(hint, "__origin__", None)
    try:
        if hint is bool:
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                return bool(value)
            raise ValueError(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value.strip()) if isinstance(value, str) else int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value.strip()) if isinstance(value, str) else float(value)
        if hint is str:
            if isinstance(value, bool):  # YAML reads a bare on/off (or yes/no) as a boolean
                return "on" if value else "off"
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                return value[1:-1]  # quoted on the command line (--set "train.compile='off'"): the text inside
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip() else []
                if not isinstance(value, (list, tuple)):
                    value = [value]
            args = hint.__args__
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_scalar(args[0], v) for v in value)
            if len(value) != len(args):
                raise ValueError(value)
            return tuple(_scalar(t, v) for t, v in zip(args, value))
    except (TypeError, ValueError):
        kind = getattr(hint, "__name__", None) or str(hint)
        raise ConfigError(f"{source}: {name}={value!r} is not a valid {kind}") from None
    return value


def _scalar(t: type, v: Any) -> Any:
    """One element of a tuple field: an int element must be integral, not a bool."""
    if isinstance(v, bool) or (t is int and isinstance(v, float) and not v.is_integer()):
        raise ValueError(v)
    return t(v)


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _apply(cfg: RunConfig, section: str, updates: dict, source: str) -> RunConfig:
    if section not in _SECTIONS:
        raise _unknown(section, list(_SECTIONS), source)
    cls = _SECTIONS[section]
    names = [f.name for f in fields(cls)]
    clean = {}
    for k, v in (updates or {}).items():
        if k not in names:
            raise _unknown(k, names, f"{source} [{section}]")
        clean[k] = _coerce(cls, k, v, f"{source} [{section}]")
    try:
        sub = replace(getattr(cfg, section), **clean)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return replace(cfg, **{section: sub})


def preset_path(name_or_path: str) -> Path:
    """A preset name (`qwen3_tiny`) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        return p
    cand = PRESET_DIR / f"{name_or_path}.yaml"
    if not cand.exists():
        names = sorted(x.stem for x in PRESET_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name_or_path!r}{hint}; presets: {', '.join(names)}")
    return cand


def _read_sections(path: Path) -> dict:
    """A YAML file of model/train/data sections (a preset or a --config layer)."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping with model/train/data sections")
    for section, updates in data.items():
        if updates is not None and not isinstance(updates, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
    return data


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                base: RunConfig | None = None, files: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The one config layering, lowest first: `base` (default: the dataclass defaults) <- the preset
    or YAML path `name_or_path` <- each YAML file of `files` <- `section.key=value` overrides.
    Every layer is checked as it is applied; an error names the key and the layer."""
    cfg = base if base is not None else RunConfig()
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise ConfigError(f"config file not found: {missing[0]}")
    layers = ([preset_path(name_or_path)] if name_or_path else []) + [Path(f) for f in files]
    for path in layers:
        for section, updates in _read_sections(path).items():
            cfg = _apply(cfg, section, updates, str(path))
    for ov in overrides:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise ConfigError(f"--set {ov!r}: expected section.key=value, e.g. model.n_layers=4")
        key, value = ov.split("=", 1)
        section, name = key.split(".", 1)
        cfg = _apply(cfg, section, {name: value}, f"--set {ov}")  # typed by the field, not by YAML
    return cfg


MODEL_SHAPE_KEYS = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "d_ff")

# Model fields that choose how a model's weights are computed, not what they are: a saved model
# (checkpoint or HF directory) takes them at load time (`deepwish generate --set model.KEY=VALUE`).
RUNTIME_MODEL_FIELDS = ("attn_backend", "fuse_projections", "decode_prologue", "decode_matmul", "decode_fusion",
                        "decode_pdl", "embed_backend", "dsa_backend", "gdn_backend", "nsa_backend")


def runtime_overrides(cfg: ModelConfig, overrides: list[str] | tuple[str, ...]) -> ModelConfig:
    """`cfg` with `model.KEY=VALUE` overrides of RUNTIME_MODEL_FIELDS applied (typed and checked
    as --set is for training); any other key is an error naming the key and the fields allowed."""
    for ov in overrides:
        key = ov.split("=", 1)[0]
        name = key.removeprefix("model.")
        if "=" not in ov or not key.startswith("model.") or name not in RUNTIME_MODEL_FIELDS:
            raise ConfigError(f"--set {ov!r}: a saved model takes only model.KEY=VALUE for KEY in "
                              f"{', '.join(RUNTIME_MODEL_FIELDS)} (the rest is fixed by its weights)")
        cfg = _apply(replace(RunConfig(), model=cfg), "model", {name: ov.split("=", 1)[1]}, f"--set {ov}").model
    return cfg


def require_model_shape(path: str | Path) -> None:
    """A YAML file used without a preset must give the model's shape itself: the defaults are
    Qwen3-0.6B's (445M parameters), never what a file that left them out meant."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    model = data.get("model") if isinstance(data, dict) else None
    missing = [k for k in MODEL_SHAPE_KEYS if not isinstance(model, dict) or k not in model]
    if missing:
        raise ConfigError(f"{path}: without --preset the file's model section must set {', '.join(MODEL_SHAPE_KEYS)} "
                          f"(missing: {', '.join(missing)}); or add --preset NAME to apply the file on top of a preset")


def model_config(name_or_path: str, **updates: Any) -> ModelConfig:
    """The model section of a preset, with keyword updates: `model_config('qwen3_tiny', n_layers=2)`."""
    cfg = load_config(name_or_path).model
    return replace(cfg, **updates) if updates else cfg


def to_dict(cfg: Any) -> dict:
    """Plain dict (YAML/JSON-safe) of a config dataclass."""
    d = dataclasses.asdict(cfg)

    def fix(x):
        if isinstance(x, tuple):
            return [fix(v) for v in x]
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        return x

    return fix(d)


def from_dict(d: dict, source: str = "<dict>") -> RunConfig:
    cfg = RunConfig()
    for section, updates in d.items():
        cfg = _apply(cfg, section, updates, source)
    return cfg


# ---- whole-configuration validation --------------------------------------------------------------
OPTIMIZERS = ("muon", "adamw")
PARALLEL_MODES = ("none", "ddp", "fsdp")
COMPILE_MODES = ("auto", "on", "off")
INDUCTOR_MODES = ("default", "coordinate-descent", "max-autotune-no-cudagraphs")  # train.compile_mode
CHECKPOINT_MODES = ("none", "selective", "full")
OFFLOAD_MODES = ("none", "params", "activations")
LOSS_BACKENDS = ("auto", "torch", "triton")
DTYPES = ("bf16", "fp32")
RESIDUAL_DTYPES = ("fp32", "bf16")  # train.residual_dtype
INDEXER_MODES = ("off", "dense_warmup", "sparse")


def config_problems(cfg: RunConfig) -> list[str]:
    """Every problem of a resolved RunConfig that would stop or corrupt a training run, one
    `section.key=value: why` string each (an empty list: nothing found). The model section checks
    itself on construction (ModelConfig.__post_init__); this covers train and data, and the
    fields that relate them."""
    t, d = cfg.train, cfg.data
    out = train_problems(t)
    if t.seq_len > cfg.model.max_seq_len:
        out.append(f"train.seq_len={t.seq_len!r}: exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if not d.train_bin and (d.val_bin or d.tokenizer):
        out.append("data.val_bin/data.tokenizer given without data.train_bin: give all paths or none "
                   "(none = the embedded corpus)")
    if d.train_bin and not d.val_bin:
        out.append("data.train_bin given without data.val_bin")
    return out


def train_problems(t: TrainConfig) -> list[str]:
    """The problems of the train section on its own (config_problems' part that needs nothing else;
    train/parallel.py checks these where only the TrainConfig is at hand)."""
    from deepwish.train.schedule import SCHEDULES

    out: list[str] = []

    def need(ok: bool, name: str, why: str) -> None:
        if not ok:
            out.append(f"train.{name}={getattr(t, name)!r}: {why}")

    def finite(x: float) -> bool:
        return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")

    for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every",
                 "keep_checkpoints", "log_every"):
        need(getattr(t, name) >= 1, name, "must be >= 1")
    need(t.seq_len >= 2, "seq_len", "must be >= 2")
    need(t.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(t.sample_tokens >= 0, "sample_tokens", "must be >= 0")
    for name in ("profile_steps", "profile_start", "gc_every"):
        need(getattr(t, name) >= 0, name, "must be >= 0")
    need(t.profile_steps == 0 or t.profile_start + t.profile_steps <= t.steps + t.extend_steps, "profile_steps",
         f"steps {t.profile_start + 1}-{t.profile_start + t.profile_steps} are not all in the run's "
         f"{t.steps + t.extend_steps} steps (train.profile_start={t.profile_start} is 0-based)")
    need(t.muon_ns_steps >= 1, "muon_ns_steps", "must be >= 1")
    need(t.muon_ns_schedule in ("jordan", "polar_express"), "muon_ns_schedule", "is not one of jordan, polar_express")
    need(t.muon_backend in ("auto", "torch", "triton"), "muon_backend", "is not one of auto, torch, triton")
    for name in ("lr", "muon_lr"):
        need(finite(getattr(t, name)) and getattr(t, name) > 0, name, "must be a finite number > 0")
    for name in ("embed_lr", "head_lr", "scalar_lr"):
        need(finite(getattr(t, name)) and getattr(t, name) >= 0, name, "must be a finite number >= 0 (0: train.lr)")
    for name in ("embed_wd", "head_wd", "scalar_wd", "muon_wd"):
        need(finite(getattr(t, name)), name, "must be finite (< 0: train.weight_decay)")
    for name in ("weight_decay", "grad_clip", "z_loss", "mtp_lambda", "indexer_loss_coef"):
        need(finite(getattr(t, name)) and getattr(t, name) >= 0, name, "must be a finite number >= 0")
    need(finite(t.mtp_lambda_final), "mtp_lambda_final", "must be finite (< 0: constant)")
    for name in ("decay_frac", "min_lr_frac"):
        need(finite(getattr(t, name)) and 0 <= getattr(t, name) <= 1, name, "must be in [0, 1]")
    for name in ("ema_decay", "muon_momentum"):
        need(finite(getattr(t, name)) and 0 <= getattr(t, name) < 1, name, "must be in [0, 1)")
    need(all(finite(b) and 0 <= b < 1 for b in t.betas), "betas", "each must be in [0, 1)")
    for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("loss_backend", LOSS_BACKENDS),
                          ("dtype", DTYPES), ("residual_dtype", RESIDUAL_DTYPES), ("indexer_mode", INDEXER_MODES),
                          ("parallel", PARALLEL_MODES),
                          ("compile", COMPILE_MODES), ("compile_mode", INDUCTOR_MODES),
                          ("activation_checkpoint", CHECKPOINT_MODES),
                          ("offload", OFFLOAD_MODES)):
        value = getattr(t, name)
        need(value in allowed, name, f"is not one of {', '.join(allowed)}" + (
            " (YAML reads unquoted on/off as true/false: quote it, e.g. --set \"train.compile='off'\")"
            if str(value) in ("True", "False") else ""))
    need(t.device in ("auto", "cpu") or t.device == "cuda" or
         (t.device.startswith("cuda:") and t.device[5:].isdigit()), "device", "is not auto, cpu or cuda[:N]")
    need(t.residual_dtype == "fp32" or t.dtype == "bf16", "residual_dtype",
         f"{t.residual_dtype} needs train.dtype=bf16 (the stream is carried in autocast's dtype)")
    need(t.offload != "params" or t.parallel == "fsdp", "offload",
         "params uses FSDP2's CPUOffloadPolicy: set train.parallel=fsdp (torchrun --nproc_per_node=1 runs it on one GPU)")
    need(t.reshard_after_forward or t.parallel == "fsdp", "reshard_after_forward",
         "false (ZeRO-2-like sharding) needs train.parallel=fsdp")
    need(t.extend_steps >= 0, "extend_steps", "must be >= 0")
    need(finite(t.window_warmup_frac) and 0 <= t.window_warmup_frac <= 1, "window_warmup_frac", "must be in [0, 1]")
    need(t.window_start_blocks >= 1, "window_start_blocks", "must be >= 1")
    need(all(n >= 2 and t.seq_len % n == 0 for n in t.seq_len_schedule), "seq_len_schedule",
         f"every entry must be >= 2 and divide train.seq_len={t.seq_len} (rows of seq_len tokens are split)")
    need(all(n >= 1 for n in t.batch_schedule), "batch_schedule", "every entry must be >= 1 micro-batch")
    return out


def raise_problems(problems: list[str], what: str = "invalid configuration") -> None:
    """One ConfigError listing every problem (one line: problems joined by '; ')."""
    if problems:
        n = len(problems)
        raise ConfigError(f"{what} ({n} problem{'s' if n > 1 else ''}): " + "; ".join(problems))


def validate(cfg: RunConfig) -> RunConfig:
    """Raise one ConfigError listing every problem of `cfg` (config_problems), else return it."""
    raise_problems(config_problems(cfg))
    return cfg
