import pytest

from deepwish.config import ConfigError, ModelConfig, load_config, preset_path

PRESETS = ["qwen3_tiny", "qwen3_0.6b", "qwen3_8b", "qwen3_moe_tiny", "qwen3_30b_a3b", "gpt_tiny", "gpt_moe_tiny",
           "gpt_124m", "gpt_350m", "gpt2_baseline_tiny", "gpt2_baseline_124m", "gpt2_baseline_350m"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(name)
    assert cfg.model.n_layers == len(cfg.model.layer_types)


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  n_layer: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    msg = str(e.value)
    assert "n_layer" in msg and str(f) in msg and "n_layers" in msg  # suggestion


def test_unknown_section(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("modle:\n  n_layers: 4\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config(str(f))


def test_bad_value_type(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  n_layers: four\n")
    with pytest.raises(ConfigError, match="n_layers"):
        load_config(str(f))


def test_set_overrides_apply_in_order():
    cfg = load_config("qwen3_tiny", ["model.n_layers=2", "train.lr=0.5", "model.tie_embeddings=false"])
    assert cfg.model.n_layers == 2 and cfg.train.lr == 0.5 and cfg.model.tie_embeddings is False


def test_set_bad_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("qwen3_tiny", ["n_layers=2"])
    with pytest.raises(ConfigError, match="n_layerz"):
        load_config("qwen3_tiny", ["model.n_layerz=2"])


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="qwen3_tiny"):
        preset_path("qwen3_tinny")


def test_invalid_combination_is_an_error():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(n_heads=6, n_kv_heads=4)
    with pytest.raises(ConfigError, match="n_experts_per_tok"):
        ModelConfig(n_experts=4, n_experts_per_tok=5)


def test_configs_are_frozen():
    cfg = load_config("qwen3_tiny").model
    with pytest.raises(Exception):
        cfg.n_layers = 3


def test_layer_types_hybrid_and_moe():
    c = ModelConfig(n_layers=8, mixer="gdn", attn_mixer="gated_gqa", full_attention_interval=4,
                    n_experts=4, n_experts_per_tok=2, first_k_dense=1, dense_layers=(5,))
    assert [m for m, _ in c.layer_types] == ["gdn"] * 3 + ["gated_gqa"] + ["gdn"] * 3 + ["gated_gqa"]
    assert [f for _, f in c.layer_types] == ["dense", "moe", "moe", "moe", "moe", "dense", "moe", "moe"]
