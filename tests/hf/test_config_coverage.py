"""HF configurations beyond the released checkpoints' defaults: each either matches HF (logits
at every position, cached decode, greedy, save_hf -> HF: `check_hf_parity`) or is refused with
an error naming the field. Covers attention biases (q/k/v/o), Qwen3 sliding-window layers,
Qwen3-Next layer_types of any order and the RoPE scaling types; and walks every field of each
family's HF config class."""
import pytest
import torch
from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV32Config, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM)

from deepwish.hf.qwen3 import config_from_hf as qwen3_config_from_hf
from deepwish.hf.qwen3_next import config_from_hf as next_config_from_hf
from tests.hf.hf_utils import check_hf_parity, random_hf_model

V = 97
QWEN = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, max_position_embeddings=64,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
NEXT = dict(QWEN, num_hidden_layers=4, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
            linear_value_head_dim=8, shared_expert_intermediate_size=16, **MOE)
DEEPSEEK = dict(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=64)
Q3, Q3MOE, Q3NEXT = (Qwen3Config, Qwen3ForCausalLM), (Qwen3MoeConfig, Qwen3MoeForCausalLM), \
    (Qwen3NextConfig, Qwen3NextForCausalLM)
DSV3 = (DeepseekV3Config, DeepseekV3ForCausalLM)

CASES = {
    # attention_bias: HF biases q, k, v and o
    "qwen3_attention_bias": (Q3, dict(QWEN, attention_bias=True)),
    "qwen3_moe_attention_bias": (Q3MOE, dict(QWEN, attention_bias=True, **MOE)),
    "qwen3_next_attention_bias": (Q3NEXT, dict(NEXT, attention_bias=True, full_attention_interval=2)),
    # sliding windows shorter than the 40-token test sequences: by max_window_layers, by an
    # explicit layer_types list, and Qwen3-MoE's window on every layer
    "qwen3_swa_max_window_layers": (Q3, dict(QWEN, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3_swa_layer_types": (Q3, dict(QWEN, use_sliding_window=True, sliding_window=5,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "qwen3_moe_swa": (Q3MOE, dict(QWEN, use_sliding_window=True, sliding_window=7, **MOE)),
    # Qwen3-Next layer_types that are not 'every k-th layer is full attention'
    "qwen3_next_irregular_layer_types": (Q3NEXT, dict(NEXT, layer_types=[
        "full_attention", "linear_attention", "linear_attention", "full_attention"])),
    # RoPE scaling types, each in a family it can be configured with
    "qwen3_rope_linear": (Q3, dict(QWEN, rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 1e4})),
    # positions past max_position_embeddings (24) in the 40-token forward: the NTK base grows
    "qwen3_rope_dynamic": (Q3, dict(QWEN, max_position_embeddings=24,
                                    rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})),
    "qwen3_next_rope_dynamic": (Q3NEXT, dict(NEXT, max_position_embeddings=24, full_attention_interval=2,
                                             rope_parameters={"rope_type": "dynamic", "factor": 4.0,
                                                              "rope_theta": 1e4, "partial_rotary_factor": 0.5})),
    # wavelengths 6.3, 63, 628, 6283 against 64/4 and 64/1: kept, blended, divided, divided
    "qwen3_moe_rope_llama3": (Q3MOE, dict(QWEN, **MOE, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 1e4}, max_position_embeddings=128)),
    # the 40-token forward and decode past position 16 switch to long_factor
    "qwen3_rope_longrope": (Q3, dict(QWEN, rope_parameters={
        "rope_type": "longrope", "original_max_position_embeddings": 16, "rope_theta": 1e4,
        "short_factor": [1.0, 1.3, 2.0, 3.5], "long_factor": [1.1, 2.0, 5.0, 9.0]})),
    "deepseek_v3_rope_llama3": (DSV3, dict(DEEPSEEK, rope_parameters={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 1e4}, max_position_embeddings=128)),
    "deepseek_v3_rope_dynamic": (DSV3, dict(DEEPSEEK, max_position_embeddings=24, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})),
}


def random_model(model_cls, cfg):
    hf = random_hf_model(model_cls, cfg)
    with torch.no_grad():  # Gated DeltaNet decay rates in HF's init range, not around 1
        for name, p in hf.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(1.0, 16.0).log())
    return hf


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_hf(case, tmp_path, one_thread):
    (cfg_cls, model_cls), kw = CASES[case]
    torch.manual_seed(0)
    check_hf_parity(random_model(model_cls, cfg_cls(**kw)), tmp_path, V)


def test_sliding_window_mapping():
    d = dict(Qwen3Config(**QWEN, use_sliding_window=True, sliding_window=6, max_window_layers=1).to_dict(),
             architectures=["Qwen3ForCausalLM"])
    c = qwen3_config_from_hf(d)
    assert [m for m, _ in c.layer_types] == ["gqa", "swa", "swa"] and c.sliding_window == 6
    d_off = dict(Qwen3Config(**QWEN, use_sliding_window=False, sliding_window=6, max_window_layers=1).to_dict(),
                 architectures=["Qwen3ForCausalLM"])
    assert {m for m, _ in qwen3_config_from_hf(d_off).layer_types} == {"gqa"}  # HF: no window at all
    bad = dict(QWEN, architectures=["Qwen3ForCausalLM"], layer_types=["sliding_attention"] * 3)
    with pytest.raises(ValueError, match="sliding_attention layers but no window"):
        qwen3_config_from_hf(bad)


def test_irregular_qwen3_next_layer_types_map_to_an_explicit_list():
    d = dict(NEXT, architectures=["Qwen3NextForCausalLM"],
             layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"])
    c = next_config_from_hf(d)
    assert [m for m, _ in c.layer_types] == ["gated_gqa", "gdn", "gdn", "gated_gqa"]
    legacy = next_config_from_hf(dict(d, layer_types=["attention", "mamba", "conv", "full_attention"]))  # HF's renames
    assert legacy.layer_types == c.layer_types
    with pytest.raises(ValueError, match="unknown entries"):
        next_config_from_hf(dict(d, layer_types=["full_attention", "sliding_attention", "linear_attention",
                                                 "full_attention"]))


# ---- every field of each family's HF config class --------------------------------------------
# Each field (beyond PretrainedConfig's own: ids/labels/output switches; `dtype` is read by
# load_hf) is mapped onto ModelConfig, checked (a value deepwish cannot honour is refused with
# an error naming the field), or listed here with the reason it does not affect the forward.
# The test changes each field of a small valid config: a mapped field changes the ModelConfig
# or is refused, a checked one is refused by name, a listed one leaves the ModelConfig equal.
NO_FORWARD_EFFECT = {
    "use_cache": "HF's switch for its own KV cache; deepwish passes caches explicitly",
    "attention_dropout": "acts only in training mode, not on logits; deepwish has no attention dropout",
    "pad_token_id": "a token id for generation and padding, not part of the forward",
    "bos_token_id": "a token id for generation, not part of the forward",
    "eos_token_id": "a token id for generation, not part of the forward",
    "output_router_logits": "adds router logits (and HF's aux loss) to HF's outputs; logits unchanged",
}
QWEN3_MAPPED = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                "tie_word_embeddings", "rope_parameters", "attention_bias"}
SOFTMAX_MOE = {"decoder_sparse_step", "moe_intermediate_size", "num_experts_per_tok", "num_experts", "norm_topk_prob",
               "router_aux_loss_coef", "mlp_only_layers"}
DEEPSEEK_MAPPED = {"vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                   "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group",
                   "topk_group", "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "hidden_act",
                   "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
                   "rope_parameters", "attention_bias"}
FAMILIES = {
    "Qwen3ForCausalLM": (Qwen3Config, dict(QWEN, use_sliding_window=True, sliding_window=4, max_window_layers=1),
                         QWEN3_MAPPED | {"head_dim", "use_sliding_window", "sliding_window", "max_window_layers",
                                         "layer_types"}, set(), {}),
    "Qwen3MoeForCausalLM": (Qwen3MoeConfig, dict(QWEN, **MOE, use_sliding_window=True, sliding_window=4),
                            QWEN3_MAPPED | SOFTMAX_MOE | {"use_sliding_window", "sliding_window"}, set(), {}),
    "Qwen3NextForCausalLM": (Qwen3NextConfig, dict(NEXT, full_attention_interval=2),
                             QWEN3_MAPPED | SOFTMAX_MOE | {"head_dim", "layer_types", "shared_expert_intermediate_size",
                                                           "linear_conv_kernel_dim", "linear_key_head_dim",
                                                           "linear_value_head_dim", "linear_num_key_heads",
                                                           "linear_num_value_heads"}, set(), {}),
    "DeepseekV3ForCausalLM": (DeepseekV3Config, dict(DEEPSEEK, q_lora_rank=None),
                              DEEPSEEK_MAPPED | {"rope_interleave", "num_mtp_layers"}, {"num_key_value_heads"},
                              {"pretraining_tp": "not read by HF's DeepSeek-V3 forward"}),
    "DeepseekV32ForCausalLM": (DeepseekV32Config, dict(DEEPSEEK, index_n_heads=2, index_head_dim=16, index_topk=4),
                               DEEPSEEK_MAPPED | {"mlp_layer_types", "index_topk", "index_head_dim", "index_n_heads"},
                               {"num_key_value_heads", "layer_types"},
                               {"mlp_bias": "not read by HF's DeepSeek-V3.2 forward",
                                "head_dim": "HF sets it to qk_rope_head_dim whatever the file says"}),
}
DICT_KEY = {"num_mtp_layers": "num_nextn_predict_layers"}  # attribute_map: the name config.json uses
# fields whose effect shows only once a derived field is left for HF to derive from them
DERIVED_FROM = {"max_window_layers": "layer_types", "first_k_dense_replace": "mlp_layer_types"}


def changed(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v * 1.5 + 0.25
    if isinstance(v, str):
        return "gelu" if v == "silu" else v + "_other"
    if isinstance(v, list):
        return v[:-1] if v else [1]
    if isinstance(v, dict):
        return {**v, "rope_theta": v["rope_theta"] * 2}
    return 2  # None


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_every_hf_config_field_is_mapped_checked_or_listed(arch):
    import dataclasses

    from transformers import PretrainedConfig

    from deepwish.hf.io import config_from_hf

    cfg_cls, kw, mapped, checked, extra = FAMILIES[arch]
    no_effect = {**NO_FORWARD_EFFECT, **extra}
    base_fields = {f.name for f in dataclasses.fields(PretrainedConfig)}
    own = {f.name for f in dataclasses.fields(cfg_cls)} - base_fields
    assert own == mapped | checked | (own & set(no_effect)), sorted(own - mapped - checked - set(no_effect))
    assert not (mapped & checked) and not ((mapped | checked) & set(no_effect))
    base = dict(cfg_cls(**kw).to_dict(), architectures=[arch])
    for name in sorted(own):
        key = DICT_KEY.get(name, name)
        d0 = dict(base)
        if name in DERIVED_FROM:
            d0[DERIVED_FROM[name]] = None
        d1 = dict(d0, **{key: changed(d0.get(key))})
        ref = config_from_hf(d0)
        try:
            got = config_from_hf(d1)
        except ValueError as e:  # ConfigError and CheckpointError are ValueErrors
            assert name not in no_effect, f"{name} is listed as not affecting the forward but is refused: {e}"
            if name in checked:
                assert key in str(e), f"{name}: the error does not name the field: {e}"
            continue
        if name in no_effect:
            assert got == ref, f"{name} is listed as not affecting the forward but changes the config"
        else:
            assert name not in checked, f"{name} is checked but {d1[key]!r} was accepted"
            assert got != ref, f"{name} is mapped but changing it does not change the config"
