"""deepseek_v3_medium: the parameter counts its comment states, counted by role on the meta device."""
import torch

from deepwish.config import PRESET_DIR, load_config
from deepwish.model import Transformer


def test_deepseek_v3_medium_counts_match_its_comment():
    cfg = load_config("deepseek_v3_medium").model
    assert cfg.n_layers == 24 and cfg.n_experts == 64
    assert sum(f == "moe" for _, f in cfg.layer_types) == 23
    with torch.device("meta"):  # shapes only: 2B parameters are never allocated
        model = Transformer(cfg)
    total, active = model.num_params(), model.num_params(active=True)
    assert total == 2_152_170_880 and active == 500_663_680
    assert model.num_params(mtp=True) == 88_538_240 and model.num_params(active=True, mtp=False) == 480_938_240
    # Counted by hand: routed experts are 3·d·I per expert; only 8 of 64 are active per token.
    routed = 24 * 64 * 3 * cfg.d_model * cfg.d_ff_expert  # 23 trunk MoE layers + the MTP block's
    assert total - active == routed - routed * 8 // 64
    comment = (PRESET_DIR / "deepseek_v3_medium.yaml").read_text().split("model:")[0]
    for text in ("2,152M", "88.5M", "500.7M", "480.9M", "41.9M"):
        assert text in comment
    assert abs(total / 1e9 - 2.0) < 0.2 and abs(active / 1e6 - 500) < 25  # "~2B total / ~500M active"
