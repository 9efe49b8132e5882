"""DeepSeek-V3 (`DeepseekV3ForCausalLM`) and DeepSeek-V3.2 (`DeepseekV32ForCausalLM`): config
conversion, the name table (MLA, DSA indexer, DeepSeekMoE, MTP modules), FP8 block dequantisation.

Checkpoint layout facts this table encodes:
- routed experts are stored per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`), the
  router as `mlp.gate.weight` plus the fp32 buffer `mlp.gate.e_score_correction_bias`;
- multi-token-prediction modules live at `model.layers.{num_hidden_layers + i}` with `enorm`,
  `hnorm`, `eh_proj`, a full decoder layer, `shared_head.norm`, and copies of the shared
  embedding (`embed_tokens`) and output head (`shared_head.head`). HF's model drops these
  tensors; we load them and write them (the copies are written from the shared tensors and on
  load the main model's own embedding and head win).
- A checkpoint whose config asks for MTP modules but holds none of their tensors (every
  checkpoint HF itself writes) is loaded with n_mtp=0 and a printed note rather than an error:
  the main model is complete without them.
- FP8 checkpoints (DeepSeek's release): `*.weight` in float8_e4m3fn with `*.weight_scale_inv`
  [ceil(out/128), ceil(in/128)] fp32; dequantised on load as W·scale_inv per 128×128 block.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from deepwish.config import ModelConfig
from deepwish.hf.qwen3 import embedding_entries, expert_entries, rope_from_hf, rope_to_hf, swiglu_entries
from deepwish.hf.table import Entry, one

ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM")
FP32_KEYS = ("e_score_correction_bias", "weights_proj")
FP8_BLOCK = 128


# ---- config -------------------------------------------------------------------------------
def config_from_hf(d: dict) -> ModelConfig:
    arch = d["architectures"][0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"deepseek: architecture {arch!r} is not one of {ARCHITECTURES}")
    v32 = arch == "DeepseekV32ForCausalLM"
    for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if key in d and d[key] != want:
            raise ValueError(f"deepseek config: {key}={d[key]!r} is not supported (only {want!r})")
    q = d.get("quantization_config") or {}
    if q and (q.get("quant_method") != "fp8" or list(q.get("weight_block_size") or [FP8_BLOCK, FP8_BLOCK])
              != [FP8_BLOCK, FP8_BLOCK]):
        raise ValueError(f"deepseek config: quantization_config={q} is not supported "
                         f"(only fp8 with {FP8_BLOCK}x{FP8_BLOCK} weight blocks)")
    n_kv = d.get("num_key_value_heads", d["num_attention_heads"])
    if n_kv != d["num_attention_heads"]:  # MLA keys/values have one head per query head
        raise ValueError(f"deepseek config: num_key_value_heads={n_kv} must equal num_attention_heads="
                         f"{d['num_attention_heads']} (MLA)")
    if v32 and d.get("layer_types") is not None and (len(d["layer_types"]) != d["num_hidden_layers"] or
                                                     set(d["layer_types"]) != {"deepseek_sparse_attention"}):
        raise ValueError(f"deepseek config: layer_types={d['layer_types']} must be 'deepseek_sparse_attention' "
                         f"for each of the {d['num_hidden_layers']} layers")
    if d.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"deepseek config: moe_layer_freq={d['moe_layer_freq']} is not supported (only 1)")
    n_layers = d["num_hidden_layers"]
    first_k = d.get("first_k_dense_replace", 0) or 0
    dense_layers: tuple[int, ...] = ()
    if v32 and d.get("mlp_layer_types"):
        types = list(d["mlp_layer_types"])
        if len(types) != n_layers or set(types) - {"dense", "sparse"}:
            raise ValueError(f"deepseek config: mlp_layer_types={types} must list 'dense'/'sparse' per layer")
        first_k = next((i for i, t in enumerate(types) if t == "sparse"), n_layers)
        dense_layers = tuple(i for i, t in enumerate(types) if t == "dense" and i >= first_k)
    n_heads = d["num_attention_heads"]
    kw = dict(
        family="deepseek_v32" if v32 else "deepseek_v3",
        vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=n_heads, head_dim=d["qk_nope_head_dim"] + d["qk_rope_head_dim"],
        d_ff=d["intermediate_size"], hidden_act=d.get("hidden_act", "silu"), norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_seq_len=d.get("max_position_embeddings", 4096), init_std=d.get("initializer_range", 0.02),
        qk_norm=False, attn_bias=bool(d.get("attention_bias", False)),
        mixer="dsa" if v32 else "mla",
        # HF V3.2 always rotates interleaved pairs; V3 reads the flag (default True)
        rope_interleave=True if v32 else bool(d.get("rope_interleave", True)),
        n_experts=d["n_routed_experts"], n_experts_per_tok=d["num_experts_per_tok"],
        d_ff_expert=d["moe_intermediate_size"], router="sigmoid",
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
        n_shared_experts=d.get("n_shared_experts") or 0, first_k_dense=first_k, dense_layers=dense_layers,
        q_lora_rank=d.get("q_lora_rank") or 0, kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
        v_head_dim=d["v_head_dim"], n_mtp=d.get("num_nextn_predict_layers", 0) or 0,
        **rope_from_hf(d),
    )
    if v32:
        kw.update(index_n_heads=d["index_n_heads"], index_head_dim=d["index_head_dim"], index_topk=d["index_topk"])
    return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict:
    v32 = cfg.family == "deepseek_v32"
    d = {
        "architectures": ["DeepseekV32ForCausalLM" if v32 else "DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v32" if v32 else "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff, "moe_intermediate_size": cfg.d_ff_expert,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "attention_bias": cfg.attn_bias, "hidden_act": cfg.hidden_act,
        "n_routed_experts": cfg.n_experts, "num_experts_per_tok": cfg.n_experts_per_tok,
        "n_shared_experts": cfg.n_shared_experts, "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": cfg.norm_topk_prob, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "first_k_dense_replace": cfg.first_k_dense, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "num_nextn_predict_layers": cfg.n_mtp,
        "rope_parameters": rope_to_hf(cfg),
    }
    if v32:
        d.update(index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
                 mlp_layer_types=["sparse" if f == "moe" else "dense" for _, f in cfg.layer_types])
    else:
        d["rope_interleave"] = cfg.rope_interleave
    return d


def _check_supported(cfg: ModelConfig) -> None:
    problems = []
    if cfg.family not in ("deepseek_v3", "deepseek_v32"):
        problems.append(f"family {cfg.family!r} is not a DeepSeek family")
    if cfg.moe_every != 1:
        problems.append(f"moe_every={cfg.moe_every} cannot be expressed (DeepSeek checkpoints: every layer "
                        f"after first_k_dense is MoE)")
    if cfg.family == "deepseek_v3" and cfg.dense_layers:
        problems.append("DeepseekV3 checkpoints cannot express dense_layers (use first_k_dense)")
    want = "dsa" if cfg.family == "deepseek_v32" else "mla"
    if any(m != want for m, _ in cfg.layer_types):
        problems.append(f"every layer of a {cfg.family} checkpoint is {want!r}")
    if cfg.n_experts == 0 or cfg.router != "sigmoid":
        problems.append("DeepSeek checkpoints need routed experts with the sigmoid router")
    if problems:
        raise ValueError("cannot map this config to a DeepSeek checkpoint: " + "; ".join(problems))


def fit_config_to_checkpoint(cfg: ModelConfig, keys: set[str]) -> ModelConfig:
    """Drop MTP modules the config announces but the checkpoint does not hold (HF never writes
    them); a partial set is an error left to the name table to report."""
    if cfg.n_mtp > 0 and not any(k.startswith(f"model.layers.{cfg.n_layers}.") for k in keys):
        print(f"[deepwish] note: config asks for {cfg.n_mtp} MTP module(s) (num_nextn_predict_layers) but the "
              f"checkpoint holds no model.layers.{cfg.n_layers}.* tensors; loading the main model with n_mtp=0")
        return replace(cfg, n_mtp=0)
    return cfg


# ---- name table ---------------------------------------------------------------------------
def attention_entries(p: str, q: str, cfg: ModelConfig, dsa: bool) -> list[Entry]:
    """MLA (+ DSA indexer) of our `{p}.mixer` from HF `{q}.self_attn`."""
    a, m = f"{q}.self_attn", f"{p}.mixer"
    names = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    names += ["q_a_proj", "q_b_proj"] if cfg.q_lora_rank > 0 else ["q_proj"]
    out = [one(f"{m}.{n}.weight", f"{a}.{n}.weight") for n in names]
    out.append(one(f"{m}.kv_a_layernorm.weight", f"{a}.kv_a_layernorm.weight"))
    if cfg.q_lora_rank > 0:
        out.append(one(f"{m}.q_a_layernorm.weight", f"{a}.q_a_layernorm.weight"))
    if cfg.attn_bias:
        biased = ["kv_a_proj_with_mqa", "o_proj"] + (["q_a_proj"] if cfg.q_lora_rank > 0 else [])
        out += [one(f"{m}.{n}.bias", f"{a}.{n}.bias") for n in biased]
    if dsa:
        i, j = f"{m}.indexer", f"{a}.indexer"
        out += [one(f"{i}.{n}", f"{j}.{n}") for n in
                ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")]
    return out


def block_entries(p: str, q: str, cfg: ModelConfig, mixer: str, ffn: str) -> list[Entry]:
    t = [one(f"{p}.attn_norm.weight", f"{q}.input_layernorm.weight"),
         one(f"{p}.ffn_norm.weight", f"{q}.post_attention_layernorm.weight")]
    t += attention_entries(p, q, cfg, dsa=mixer == "dsa")
    if ffn == "moe":
        t += [one(f"{p}.ffn.router.weight", f"{q}.mlp.gate.weight"),
              one(f"{p}.ffn.e_score_correction_bias", f"{q}.mlp.gate.e_score_correction_bias")]
        t += expert_entries(f"{p}.ffn", f"{q}.mlp", cfg.n_experts)
        if cfg.n_shared_experts > 0:
            t += swiglu_entries(f"{p}.ffn.shared", f"{q}.mlp.shared_experts")
    else:
        t += swiglu_entries(f"{p}.ffn", f"{q}.mlp")
    return t


def name_table(cfg: ModelConfig) -> list[Entry]:
    _check_supported(cfg)
    t: list[Entry] = []
    # MTP copies of the shared embedding/head come first so the main model's own tensors win on load
    head = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
    for j in range(cfg.n_mtp):
        q = f"model.layers.{cfg.n_layers + j}"
        t += [one("embed.weight", f"{q}.embed_tokens.weight"), one(head, f"{q}.shared_head.head.weight")]
    t += embedding_entries(cfg)
    for i, (mixer, ffn) in enumerate(cfg.layer_types):
        t += block_entries(f"blocks.{i}", f"model.layers.{i}", cfg, mixer, ffn)
    if cfg.n_mtp:
        ext = replace(cfg, n_layers=cfg.n_layers + cfg.n_mtp).layer_types
        for j in range(cfg.n_mtp):
            L = cfg.n_layers + j
            p, q = f"mtp.{j}", f"model.layers.{L}"
            t += [one(f"{p}.enorm.weight", f"{q}.enorm.weight"), one(f"{p}.hnorm.weight", f"{q}.hnorm.weight"),
                  one(f"{p}.eh_proj.weight", f"{q}.eh_proj.weight"),
                  one(f"{p}.norm.weight", f"{q}.shared_head.norm.weight")]
            t += block_entries(f"{p}.block", q, cfg, *ext[L])
    return t


# ---- FP8 ----------------------------------------------------------------------------------
def dequantize_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """w [O, I] fp8, scale_inv [ceil(O/block), ceil(I/block)] -> fp32 [O, I], w·scale_inv per block."""
    O, I = w.shape
    need = (-(-O // block), -(-I // block))
    if tuple(scale_inv.shape) != need:
        raise ValueError(f"fp8 scale_inv shape {tuple(scale_inv.shape)} does not fit a {tuple(w.shape)} weight "
                         f"in {block}x{block} blocks (expected {need})")
    s = scale_inv.float().repeat_interleave(block, 0)[:O].repeat_interleave(block, 1)[:, :I]
    return w.float() * s


def dequantize(name: str, tensor: torch.Tensor, files, have: set[str], used: set[str]) -> torch.Tensor:
    """io.py hook: FP8 weights are multiplied by their `{name}_scale_inv` blocks; others pass."""
    if tensor.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return tensor
    key = f"{name}_scale_inv"
    if key not in have:
        raise ValueError(f"{name} is stored as {tensor.dtype} but the checkpoint has no {key}")
    used.add(key)
    return dequantize_fp8_blocks(tensor, files.get(key))
