"""`hidden_act`: every stateless HF activation is implemented and used by dense MLPs, routed
experts and shared experts of every family; the others are refused by name."""
import pytest
import torch
from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM)
from transformers.activations import ACT2CLS, ACT2FN

from deepwish.config import ConfigError, ModelConfig
from deepwish.hf.qwen3_next import config_from_hf as next_config_from_hf
from deepwish.model.mlp import ACTIVATIONS, UNSUPPORTED_ACTIVATIONS, activation
from tests.hf.hf_utils import check_hf_parity, random_hf_model

V = 97


def test_every_hf_activation_is_implemented_or_refused():
    assert set(ACT2CLS) == set(ACTIVATIONS) | set(UNSUPPORTED_ACTIVATIONS)
    x = torch.linspace(-14, 14, 4001, dtype=torch.float32)
    for name in ACTIVATIONS:
        ref = ACT2FN[name](x)
        assert torch.allclose(activation(name)(x), ref, rtol=1e-6, atol=1e-6), name


@pytest.mark.parametrize("name", ["prelu", "xielu", "gelu_typo"])
def test_unsupported_activation_is_a_clear_error(name):
    with pytest.raises(ConfigError, match=f"hidden_act='{name}' is not supported"):
        ModelConfig(hidden_act=name)


QWEN = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
CASES = {
    "qwen3_gelu_tanh": (Qwen3Config, Qwen3ForCausalLM, dict(QWEN, hidden_act="gelu_pytorch_tanh")),
    "qwen3_relu": (Qwen3Config, Qwen3ForCausalLM, dict(QWEN, hidden_act="relu")),
    "qwen3_moe_gelu": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                       dict(QWEN, hidden_act="gelu", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                            mlp_only_layers=[0])),
    # attention layers only: Qwen3-Next also feeds hidden_act to the Gated DeltaNet convolution
    "qwen3_next_quick_gelu": (Qwen3NextConfig, Qwen3NextForCausalLM,
                              dict(QWEN, hidden_act="quick_gelu", layer_types=["full_attention"] * 2,
                                   num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                   shared_expert_intermediate_size=16, mlp_only_layers=[0],
                                   linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                                   linear_value_head_dim=8)),
    "deepseek_v3_gelu_new": (DeepseekV3Config, DeepseekV3ForCausalLM,
                             dict(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                                  q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                  n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
                                  topk_group=1,
                                  first_k_dense_replace=1, max_position_embeddings=64, hidden_act="gelu_new")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_activation_parity_with_hf(case, tmp_path, one_thread):
    cfg_cls, model_cls, kw = CASES[case]
    torch.manual_seed(0)
    hf = random_hf_model(model_cls, cfg_cls(**kw))
    check_hf_parity(hf, tmp_path, V)


def test_qwen3_next_gdn_with_other_activation_is_refused():
    d = {"architectures": ["Qwen3NextForCausalLM"], "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "intermediate_size": 48, "vocab_size": V, "linear_num_key_heads": 2,
         "linear_num_value_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
         "full_attention_interval": 2, "hidden_act": "gelu"}
    with pytest.raises(ValueError, match="hidden_act='gelu'.*Gated DeltaNet"):
        next_config_from_hf(d)
    with pytest.raises(ValueError, match="hidden_act='gelu'.*Gated DeltaNet"):  # HF's older name for the layer
        next_config_from_hf(dict(d, layer_types=["mamba", "full_attention"]))
