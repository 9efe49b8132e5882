"""Qwen3 (`Qwen3ForCausalLM`) and Qwen3-MoE (`Qwen3MoeForCausalLM`): config conversion and
the name table."""
from __future__ import annotations

from deepwish.config import ModelConfig
from deepwish.hf.table import Entry, cat, one, stack_cat

ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


ROPE_TYPES = ("default", "yarn", "linear", "dynamic", "llama3", "longrope")


def rope_from_hf(d: dict) -> dict:
    """rope_parameters (transformers ≥5) or rope_theta/rope_scaling (older files) -> our fields."""
    rp = dict(d.get("rope_parameters") or {})
    if not rp:
        rp = dict(d.get("rope_scaling") or {})
        rp.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise ValueError(f"rope_parameters: rope_type={rtype!r} is not supported ({', '.join(ROPE_TYPES)})")
    out = {"rope_theta": float(rp.get("rope_theta", d.get("rope_theta", 10000.0))), "rope_type": rtype}
    if "partial_rotary_factor" in rp or "partial_rotary_factor" in d:
        out["rope_partial"] = float(rp.get("partial_rotary_factor", d.get("partial_rotary_factor")))
    orig = rp.get("original_max_position_embeddings") or d.get("max_position_embeddings")
    if rtype in ("linear", "dynamic"):
        out["rope_factor"] = float(rp["factor"])
    elif rtype == "llama3":
        out.update(rope_factor=float(rp["factor"]), rope_original_max_len=int(orig),
                   rope_low_freq_factor=float(rp["low_freq_factor"]),
                   rope_high_freq_factor=float(rp["high_freq_factor"]))
    elif rtype == "longrope":
        orig = int(rp["original_max_position_embeddings"])
        out.update(rope_original_max_len=orig,
                   rope_factor=float(rp.get("factor") or d["max_position_embeddings"] / orig),
                   rope_short_factor=tuple(float(f) for f in rp["short_factor"]),
                   rope_long_factor=tuple(float(f) for f in rp["long_factor"]),
                   rope_attention_factor=float(rp.get("attention_factor") or 0.0))
    elif rtype == "yarn":
        out.update(
            rope_factor=float(rp["factor"]),
            rope_original_max_len=int(orig),
            yarn_beta_fast=float(rp.get("beta_fast") or 32.0),
            yarn_beta_slow=float(rp.get("beta_slow") or 1.0),
            yarn_mscale=float(rp.get("mscale") or 0.0),
            yarn_mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0),
            yarn_attention_factor=float(rp.get("attention_factor") or 0.0),
        )
        if rp.get("truncate") is False:
            raise ValueError("rope_parameters: YaRN with truncate=False is not supported")
    return out


def rope_to_hf(cfg: ModelConfig) -> dict:
    rp = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
    if cfg.rope_partial != 1.0:
        rp["partial_rotary_factor"] = cfg.rope_partial
    if cfg.rope_type in ("linear", "dynamic"):
        rp["factor"] = cfg.rope_factor
    elif cfg.rope_type == "llama3":
        rp.update(factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_max_len,
                  low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    elif cfg.rope_type == "longrope":
        rp.update(factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_max_len,
                  short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor))
        if cfg.rope_attention_factor:
            rp["attention_factor"] = cfg.rope_attention_factor
    elif cfg.rope_type == "yarn":
        rp.update(factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_max_len,
                  beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow)
        if cfg.yarn_mscale:
            rp["mscale"] = cfg.yarn_mscale
        if cfg.yarn_mscale_all_dim:
            rp["mscale_all_dim"] = cfg.yarn_mscale_all_dim
        if cfg.yarn_attention_factor:
            rp["attention_factor"] = cfg.yarn_attention_factor
    return rp


def attention_pattern_from_hf(d: dict, moe: bool) -> dict:
    """Sliding-window layers as HF's Qwen3 / Qwen3-MoE configs define them -> our layer-pattern
    fields ("swa" layers with `sliding_window`, "gqa" elsewhere). HF: the window exists only
    with use_sliding_window=true; Qwen3 puts it on `layer_types` entries "sliding_attention"
    (by default layers >= max_window_layers), Qwen3-MoE on every layer."""
    n = d["num_hidden_layers"]
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    if moe:
        types = ["sliding_attention" if window is not None else "full_attention"] * n
    elif d.get("layer_types") is not None:
        types = list(d["layer_types"])
    else:
        first = d.get("max_window_layers", 28)
        types = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)]
    if len(types) != n or not set(types) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"Qwen3 config: layer_types={types} must list 'full_attention' / 'sliding_attention' for "
                         f"each of the {n} layers")
    if "sliding_attention" in types and window is None:
        raise ValueError(f"Qwen3 config: layer_types has sliding_attention layers but no window (use_sliding_window="
                         f"{d.get('use_sliding_window')}, sliding_window={d.get('sliding_window')})")
    mixers = tuple("swa" if t == "sliding_attention" else "gqa" for t in types)
    out: dict = {"sliding_window": int(window)} if "swa" in mixers else {}
    if len(set(mixers)) == 1:
        out["mixer"] = mixers[0]
    else:
        out["layer_mixers"] = mixers
    return out


def attention_pattern_to_hf(cfg: ModelConfig) -> dict:
    mixers = [m for m, _ in cfg.layer_types]
    if not set(mixers) <= {"gqa", "swa"}:
        raise ValueError(f"config cannot be written as a Qwen3 checkpoint: mixers must be gqa / swa, got "
                         f"{sorted(set(mixers))}")
    if "swa" not in mixers:
        return {"use_sliding_window": False}
    if cfg.n_experts and set(mixers) != {"swa"}:
        raise ValueError("config cannot be written as Qwen3MoeForCausalLM: its sliding window applies to every "
                         "layer, so mixers must be all swa or all gqa")
    out = {"use_sliding_window": True, "sliding_window": cfg.sliding_window}
    if not cfg.n_experts:
        out.update(layer_types=["sliding_attention" if m == "swa" else "full_attention" for m in mixers],
                   max_window_layers=mixers.index("swa"))
    return out


def config_from_hf(d: dict) -> ModelConfig:
    arch = d["architectures"][0]
    n_heads = d["num_attention_heads"]
    kw = dict(
        family="qwen3",
        vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layers=d["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
        d_ff=d["intermediate_size"], hidden_act=d.get("hidden_act", "silu"), norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_seq_len=d.get("max_position_embeddings", 40960), attn_bias=bool(d.get("attention_bias", False)),
        init_std=d.get("initializer_range", 0.02), qk_norm=True,
        **rope_from_hf(d), **attention_pattern_from_hf(d, moe=arch == "Qwen3MoeForCausalLM"),
    )
    if arch == "Qwen3MoeForCausalLM":
        kw.update(
            family="qwen3_moe",
            n_experts=d.get("num_experts") or d["num_local_experts"], n_experts_per_tok=d["num_experts_per_tok"],
            d_ff_expert=d["moe_intermediate_size"], norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            moe_every=d.get("decoder_sparse_step", 1), dense_layers=tuple(d.get("mlp_only_layers") or ()),
            router_aux_loss_coef=d.get("router_aux_loss_coef", 0.0), router="softmax",
        )
    return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict:
    problems = [msg for bad, msg in (
        (not cfg.qk_norm, "qk_norm must be true"),
        (cfg.norm_zero_centered, "norm_zero_centered must be false"),
        (cfg.attn_output_gate, "attn_output_gate must be false"),
        (cfg.rope_partial != 1.0 or cfg.rope_interleave, "rope must rotate whole heads in halves "
                                                           "(rope_partial=1, rope_interleave=false)"),
        (cfg.n_experts > 0 and (cfg.router != "softmax" or cfg.n_shared_experts or cfg.d_ff_shared
                                or cfg.first_k_dense or cfg.routed_scaling_factor != 1.0 or cfg.n_group != 1),
         "MoE must be a softmax router without shared experts, groups, scaling or first_k_dense"),
    ) if bad]
    if problems:
        raise ValueError("config cannot be written as a Qwen3 checkpoint: " + "; ".join(problems))
    d = {
        "architectures": ["Qwen3MoeForCausalLM" if cfg.n_experts else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if cfg.n_experts else "qwen3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len, "attention_bias": cfg.attn_bias, "hidden_act": cfg.hidden_act,
        "initializer_range": cfg.init_std, "rope_parameters": rope_to_hf(cfg),
        **attention_pattern_to_hf(cfg),
    }
    if cfg.n_experts:
        d.update(num_experts=cfg.n_experts, **moe_to_hf(cfg))
    return d


def moe_to_hf(cfg: ModelConfig) -> dict:
    """The softmax-router MoE fields Qwen3-MoE and Qwen3-Next configs share."""
    return dict(num_experts_per_tok=cfg.n_experts_per_tok, moe_intermediate_size=cfg.d_ff_expert,
                norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.moe_every,
                mlp_only_layers=list(cfg.dense_layers), router_aux_loss_coef=cfg.router_aux_loss_coef)


def attention_entries(p: str, q: str, norms: bool = True, bias: bool = False) -> list[Entry]:
    """GQA projections of our block `p` from HF attention prefix `q`."""
    out = [one(f"{p}.mixer.{n}.weight", f"{q}.{n}.weight") for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if bias:
        out += [one(f"{p}.mixer.{n}.bias", f"{q}.{n}.bias") for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if norms:
        out += [one(f"{p}.mixer.q_norm.weight", f"{q}.q_norm.weight"), one(f"{p}.mixer.k_norm.weight", f"{q}.k_norm.weight")]
    return out


def swiglu_entries(ours: str, hf: str) -> list[Entry]:
    return [cat(f"{ours}.w_gate_up.weight", [f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"]),
            one(f"{ours}.w_down.weight", f"{hf}.down_proj.weight")]


def expert_entries(ours: str, hf: str, n_experts: int) -> list[Entry]:
    """Stacked experts from per-expert `{hf}.experts.{e}.{gate,up,down}_proj.weight`."""
    return [
        stack_cat(f"{ours}.w_gate_up", [[f"{hf}.experts.{e}.gate_proj.weight", f"{hf}.experts.{e}.up_proj.weight"]
                                       for e in range(n_experts)]),
        stack_cat(f"{ours}.w_down", [[f"{hf}.experts.{e}.down_proj.weight"] for e in range(n_experts)]),
    ]


def embedding_entries(cfg: ModelConfig) -> list[Entry]:
    out = [one("embed.weight", "model.embed_tokens.weight"), one("norm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        out.append(one("lm_head.weight", "lm_head.weight"))
    return out


def name_table(cfg: ModelConfig) -> list[Entry]:
    t = embedding_entries(cfg)
    for i, (mixer, ffn) in enumerate(cfg.layer_types):
        p, q = f"blocks.{i}", f"model.layers.{i}"
        t += [one(f"{p}.attn_norm.weight", f"{q}.input_layernorm.weight"),
              one(f"{p}.ffn_norm.weight", f"{q}.post_attention_layernorm.weight")]
        t += attention_entries(p, f"{q}.self_attn", bias=cfg.attn_bias)
        if ffn == "moe":
            t.append(one(f"{p}.ffn.router.weight", f"{q}.mlp.gate.weight"))
            t += expert_entries(f"{p}.ffn", f"{q}.mlp", cfg.n_experts)
        else:
            t += swiglu_entries(f"{p}.ffn", f"{q}.mlp")
    return t
