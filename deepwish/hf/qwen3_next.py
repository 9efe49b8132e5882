"""Qwen3-Next (`Qwen3NextForCausalLM`): config conversion and the name table.

Layout choices (see model/gated_deltanet.py):
- `in_proj_qkvz` is stored by HF interleaved per key head: the rows are H groups of
  [q_h (K) | k_h (K) | v_h (r·V) | z_h (r·V)] with r = HV/H, the v/z of a group being the r value
  heads that read key head h. We de-interleave at load time into [q | k | v | z] (heads in order
  within each part) and re-interleave at save time. Likewise `in_proj_ba` (H groups of
  [b_h (r) | a_h (r)]) becomes [b | a].
- The depthwise conv weight [D_conv, 1, W] is stored as [D_conv, W]; its channel order
  [q | k | v] is already de-interleaved in HF.
- Every other tensor maps 1:1 (zero-centred norm weights are stored as offsets in both).
- `mtp.*` tensors of the released checkpoints (the multi-token-prediction head, which HF drops
  too) are ignored on load.
"""
from __future__ import annotations

import torch

from deepwish.config import ModelConfig
from deepwish.hf.qwen3 import (attention_entries, embedding_entries, expert_entries, moe_to_hf, rope_from_hf,
                               rope_to_hf, swiglu_entries)
from deepwish.hf.table import Entry, one

ARCHITECTURES = ("Qwen3NextForCausalLM",)
IGNORABLE = ("mtp.",)
FP32_KEYS = ("A_log", "dt_bias")  # decay parameters stay fp32 when the rest is loaded in bf16
GDN_CONV_ACTIVATIONS = ("silu", "swish")  # HF's Gated DeltaNet convolution applies hidden_act too


# older layer_types names HF still reads (transformers' configuration_utils renames them)
LEGACY_LAYER_TYPES = {"conv": "linear_attention", "mamba": "linear_attention", "attention": "full_attention"}


def mixers_from_layer_types(layer_types: list[str]) -> dict:
    """HF layer_types -> our layer-pattern fields: a single mixer, 'every k-th layer is full
    attention' (full_attention_interval, as the released checkpoints), or an explicit list."""
    layer_types = [LEGACY_LAYER_TYPES.get(t, t) for t in layer_types]
    kinds = set(layer_types)
    if not kinds <= {"linear_attention", "full_attention"}:
        unknown = sorted(kinds - {"linear_attention", "full_attention"})
        raise ValueError(f"Qwen3-Next layer_types has unknown entries: {unknown}")
    if kinds == {"linear_attention"}:
        return dict(mixer="gdn", full_attention_interval=0)
    if kinds == {"full_attention"}:
        return dict(mixer="gated_gqa", full_attention_interval=0)
    k = layer_types.index("full_attention") + 1
    if layer_types == ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(len(layer_types))]:
        return dict(mixer="gdn", full_attention_interval=k)
    return dict(mixer="gdn", full_attention_interval=0,
                layer_mixers=tuple("gated_gqa" if t == "full_attention" else "gdn" for t in layer_types))


def config_from_hf(d: dict) -> ModelConfig:
    n_layers = d["num_hidden_layers"]
    layer_types = d.get("layer_types")
    if layer_types is None:
        k = d.get("full_attention_interval", 4)
        layer_types = ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(n_layers)]
    if len(layer_types) != n_layers:
        raise ValueError(f"Qwen3-Next layer_types has {len(layer_types)} entries for {n_layers} layers")
    layer_types = [LEGACY_LAYER_TYPES.get(t, t) for t in layer_types]
    pattern = mixers_from_layer_types(layer_types)
    act = d.get("hidden_act", "silu")
    if "linear_attention" in layer_types and act not in GDN_CONV_ACTIVATIONS:
        raise ValueError(f"Qwen3-Next config: hidden_act={act!r} with linear_attention layers is not supported: HF "
                         f"applies hidden_act in the Gated DeltaNet short convolution too, whose kernels implement "
                         f"only {' / '.join(GDN_CONV_ACTIVATIONS)}")
    n_heads = d["num_attention_heads"]
    rope = rope_from_hf(d)
    rope.setdefault("rope_partial", 0.25)  # HF's default for this family
    kw = dict(
        family="qwen3_next",
        vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
        d_ff=d["intermediate_size"], hidden_act=d.get("hidden_act", "silu"), norm_eps=d.get("rms_norm_eps", 1e-6),
        norm_zero_centered=True,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_seq_len=d.get("max_position_embeddings", 32768), init_std=d.get("initializer_range", 0.02),
        qk_norm=True, attn_output_gate=True, attn_bias=bool(d.get("attention_bias", False)),
        attn_mixer="gated_gqa", **pattern,
        linear_n_k_heads=d["linear_num_key_heads"], linear_n_v_heads=d["linear_num_value_heads"],
        linear_k_head_dim=d["linear_key_head_dim"], linear_v_head_dim=d["linear_value_head_dim"],
        linear_conv_kernel=d.get("linear_conv_kernel_dim", 4),
        **rope,
    )
    if d.get("num_experts", 0) > 0:
        if not d.get("shared_expert_intermediate_size"):
            raise ValueError("Qwen3-Next MoE without a shared expert (shared_expert_intermediate_size=0) "
                             "is not supported")
        kw.update(
            n_experts=d["num_experts"], n_experts_per_tok=d["num_experts_per_tok"],
            d_ff_expert=d["moe_intermediate_size"], d_ff_shared=d["shared_expert_intermediate_size"],
            shared_expert_gate=True, norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            moe_every=d.get("decoder_sparse_step", 1), dense_layers=tuple(d.get("mlp_only_layers") or ()),
            router_aux_loss_coef=d.get("router_aux_loss_coef", 0.0), router="softmax",
        )
    return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict:
    problems = []
    if not cfg.norm_zero_centered:
        problems.append("norm_zero_centered must be true")
    if not cfg.qk_norm:
        problems.append("attention needs qk_norm=true")
    mixers = {m for m, _ in cfg.layer_types}
    if not mixers <= {"gdn", "gated_gqa"}:
        problems.append(f"mixers must be gdn / gated_gqa, got {sorted(mixers)}")
    if cfg.n_experts and (cfg.router != "softmax" or cfg.n_shared_experts or not cfg.d_ff_shared
                          or not cfg.shared_expert_gate or cfg.first_k_dense or cfg.routed_scaling_factor != 1.0):
        problems.append("MoE must be a softmax router with one gated shared expert (d_ff_shared > 0)")
    if cfg.n_mtp:
        problems.append("MTP heads are not exported")
    if "gdn" in mixers and cfg.hidden_act not in GDN_CONV_ACTIVATIONS:
        problems.append(f"hidden_act={cfg.hidden_act!r}: HF would apply it in the Gated DeltaNet convolution "
                        f"too (deepwish's is SiLU)")
    if problems:
        raise ValueError("config cannot be written as Qwen3NextForCausalLM: " + "; ".join(problems))
    layer_types = ["full_attention" if m == "gated_gqa" else "linear_attention" for m, _ in cfg.layer_types]
    rope = rope_to_hf(cfg)
    rope["partial_rotary_factor"] = cfg.rope_partial
    d = {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len, "attention_bias": cfg.attn_bias, "hidden_act": cfg.hidden_act,
        "initializer_range": cfg.init_std, "rope_parameters": rope, "partial_rotary_factor": cfg.rope_partial,
        "layer_types": layer_types,
        "linear_num_key_heads": cfg.linear_n_k_heads, "linear_num_value_heads": cfg.linear_n_v_heads,
        "linear_key_head_dim": cfg.linear_k_head_dim, "linear_value_head_dim": cfg.linear_v_head_dim,
        "linear_conv_kernel_dim": cfg.linear_conv_kernel,
        "num_experts": cfg.n_experts,
    }
    if cfg.n_experts:
        d.update(shared_expert_intermediate_size=cfg.d_ff_shared, **moe_to_hf(cfg))
    return d


# ---- Gated DeltaNet projections: HF per-key-head interleaving <-> [q | k | v | z] -----------------

def qkvz_from_hf(w: torch.Tensor, H: int, K: int, HV: int, V: int) -> torch.Tensor:
    """[H·(2K + 2rV), d] interleaved per key head -> [q (H·K) | k (H·K) | v (HV·V) | z (HV·V)]."""
    r = HV // H
    q, k, v, z = w.view(H, 2 * K + 2 * r * V, -1).split([K, K, r * V, r * V], dim=1)
    return torch.cat([x.reshape(-1, w.shape[-1]) for x in (q, k, v, z)])


def qkvz_to_hf(w: torch.Tensor, H: int, K: int, HV: int, V: int) -> torch.Tensor:
    r = HV // H
    q, k, v, z = w.split([H * K, H * K, HV * V, HV * V])
    d = w.shape[-1]
    return torch.cat([q.view(H, K, d), k.view(H, K, d), v.view(H, r * V, d), z.view(H, r * V, d)], dim=1).view(-1, d)


def ba_from_hf(w: torch.Tensor, H: int, HV: int) -> torch.Tensor:
    """[H·2r, d] as H groups of [b_h (r) | a_h (r)] -> [b (HV) | a (HV)]."""
    r = HV // H
    b, a = w.view(H, 2 * r, -1).split([r, r], dim=1)
    return torch.cat([b.reshape(-1, w.shape[-1]), a.reshape(-1, w.shape[-1])])


def ba_to_hf(w: torch.Tensor, H: int, HV: int) -> torch.Tensor:
    r = HV // H
    d = w.shape[-1]
    b, a = w.split([HV, HV])
    return torch.cat([b.view(H, r, d), a.view(H, r, d)], dim=1).view(-1, d)


def gdn_entries(cfg: ModelConfig, p: str, q: str) -> list[Entry]:
    """Gated DeltaNet of our block `p` from HF `{q}` = model.layers.i.linear_attn."""
    H, HV, K, V = cfg.linear_n_k_heads, cfg.linear_n_v_heads, cfg.linear_k_head_dim, cfg.linear_v_head_dim
    m = f"{p}.mixer"
    return [
        Entry(f"{m}.in_proj_qkvz.weight", (f"{q}.in_proj_qkvz.weight",),
              lambda ts: qkvz_from_hf(ts[0], H, K, HV, V), lambda t: [qkvz_to_hf(t, H, K, HV, V)]),
        Entry(f"{m}.in_proj_ba.weight", (f"{q}.in_proj_ba.weight",),
              lambda ts: ba_from_hf(ts[0], H, HV), lambda t: [ba_to_hf(t, H, HV)]),
        Entry(f"{m}.conv_weight", (f"{q}.conv1d.weight",), lambda ts: ts[0].squeeze(1), lambda t: [t.unsqueeze(1)]),
        one(f"{m}.A_log", f"{q}.A_log"),
        one(f"{m}.dt_bias", f"{q}.dt_bias"),
        one(f"{m}.norm.weight", f"{q}.norm.weight"),
        one(f"{m}.out_proj.weight", f"{q}.out_proj.weight"),
    ]


def name_table(cfg: ModelConfig) -> list[Entry]:
    t = embedding_entries(cfg)
    for i, (mixer, ffn) in enumerate(cfg.layer_types):
        p, q = f"blocks.{i}", f"model.layers.{i}"
        t += [one(f"{p}.attn_norm.weight", f"{q}.input_layernorm.weight"),
              one(f"{p}.ffn_norm.weight", f"{q}.post_attention_layernorm.weight")]
        if mixer == "gdn":
            t += gdn_entries(cfg, p, f"{q}.linear_attn")
        else:
            t += attention_entries(p, f"{q}.self_attn", bias=cfg.attn_bias)
        if ffn == "moe":
            t.append(one(f"{p}.ffn.router.weight", f"{q}.mlp.gate.weight"))
            t += expert_entries(f"{p}.ffn", f"{q}.mlp", cfg.n_experts)
            t += swiglu_entries(f"{p}.ffn.shared", f"{q}.mlp.shared_expert")
            t.append(one(f"{p}.ffn.shared_gate.weight", f"{q}.mlp.shared_expert_gate.weight"))
        else:
            t += swiglu_entries(f"{p}.ffn", f"{q}.mlp")
    return t
