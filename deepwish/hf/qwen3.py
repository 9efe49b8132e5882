"""Qwen3 (`Qwen3ForCausalLM`) and Qwen3-MoE (`Qwen3MoeForCausalLM`): config conversion and
the name table."""
from __future__ import annotations

from deepwish.config import ModelConfig
from deepwish.hf.table import Entry, cat, one, stack_cat

ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


def rope_from_hf(d: dict) -> dict:
    """rope_parameters (transformers ≥5) or rope_theta/rope_scaling (older files) -> our fields."""
    rp = dict(d.get("rope_parameters") or {})
    if not rp:
        rp = dict(d.get("rope_scaling") or {})
        rp.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype not in ("default", "yarn"):
        raise ValueError(f"rope type {rtype!r} is not supported (default, yarn)")
    out = {"rope_theta": float(rp.get("rope_theta", d.get("rope_theta", 10000.0))), "rope_type": rtype}
    if "partial_rotary_factor" in rp or "partial_rotary_factor" in d:
        out["rope_partial"] = float(rp.get("partial_rotary_factor", d.get("partial_rotary_factor")))
    if rtype == "yarn":
        out.update(
            rope_factor=float(rp["factor"]),
            rope_original_max_len=int(rp.get("original_max_position_embeddings") or d["max_position_embeddings"]),
            yarn_beta_fast=float(rp.get("beta_fast") or 32.0),
            yarn_beta_slow=float(rp.get("beta_slow") or 1.0),
            yarn_mscale=float(rp.get("mscale") or 0.0),
            yarn_mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0),
            yarn_attention_factor=float(rp.get("attention_factor") or 0.0),
        )
        if rp.get("truncate") is False:
            raise ValueError("YaRN with truncate=False is not supported")
    return out


def rope_to_hf(cfg: ModelConfig) -> dict:
    rp = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
    if cfg.rope_partial != 1.0:
        rp["partial_rotary_factor"] = cfg.rope_partial
    if cfg.rope_type == "yarn":
        rp.update(factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_max_len,
                  beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow)
        if cfg.yarn_mscale:
            rp["mscale"] = cfg.yarn_mscale
        if cfg.yarn_mscale_all_dim:
            rp["mscale_all_dim"] = cfg.yarn_mscale_all_dim
        if cfg.yarn_attention_factor:
            rp["attention_factor"] = cfg.yarn_attention_factor
    return rp


def config_from_hf(d: dict) -> ModelConfig:
    arch = d["architectures"][0]
    if d.get("use_sliding_window"):
        raise ValueError("Qwen3 checkpoints with use_sliding_window=true are not supported")
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
        **rope_from_hf(d),
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
    d = {
        "architectures": ["Qwen3MoeForCausalLM" if cfg.n_experts else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if cfg.n_experts else "qwen3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len, "attention_bias": cfg.attn_bias, "hidden_act": cfg.hidden_act,
        "initializer_range": cfg.init_std, "rope_parameters": rope_to_hf(cfg), "use_sliding_window": False,
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
        out += [one(f"{p}.mixer.{n}.bias", f"{q}.{n}.bias") for n in ("q_proj", "k_proj", "v_proj")]
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
