"""`train --init-from`: a new run from existing weights (deepwish run, checkpoint or HF directory),
with a fresh optimizer, schedule and data position; a model section that does not describe the
weights is one error listing the fields; --resume on other data points to --init-from."""
import argparse

import pytest
import torch

from deepwish.config import ConfigError, load_config
from deepwish.train import loop
from deepwish.train.checkpoint import load_checkpoint
from deepwish.train.init_from import load_init_weights

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
        "model.d_ff=64", "train.seq_len=16", "train.batch_size=2", "train.eval_batches=1", "train.sample_tokens=0",
        "train.warmup_steps=1", "train.log_every=1", "train.steps=2", "train.save_every=2", "train.eval_every=2"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("src") / "run"
    loop.train(load_config("qwen3_tiny", TINY + [f"train.out_dir={out}", "train.ema_decay=0.5"]), progress_bar=False)
    return out


def test_init_from_a_run_takes_the_weights_and_starts_fresh(source, tmp_path, monkeypatch):
    want = load_checkpoint(source)["model"]
    seen = {}
    real = loop.build_optimizer

    def spy(model, tc, **kw):  # the model's weights when the (fresh) optimizer is built
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, tc, **kw)

    monkeypatch.setattr(loop, "build_optimizer", spy)
    s = loop.train(load_config("qwen3_tiny", TINY + [f"train.out_dir={tmp_path / 'new'}", "train.steps=3"]),
                   init_from=str(source), progress_bar=False)
    assert s["start_step"] == 0 and sorted(s["train_losses"]) == [1, 2, 3]
    assert all(torch.equal(seen[k], want[k]) for k in want)
    ema = load_init_weights(source, ema=True)
    assert any(not torch.equal(ema[k], want[k]) for k in want if want[k].is_floating_point())


def test_init_from_an_hf_dir_and_a_mismatched_model_is_one_error(source, tmp_path):
    from deepwish.cli import main
    hf = tmp_path / "hf"
    assert main(["convert", str(source), str(hf), "--dtype", "fp32"]) == 0
    loop.train(load_config("qwen3_tiny", TINY + [f"train.out_dir={tmp_path / 'a'}"]), init_from=str(hf),
               progress_bar=False)
    bad = load_config("qwen3_tiny", TINY + [f"train.out_dir={tmp_path / 'b'}", "model.d_ff=96",
                                            "model.n_layers=2"])
    with pytest.raises(ConfigError, match=r"differs from the weights' in n_layers \(1 in the weights vs 2 here\), "
                                          r"d_ff|d_ff .*n_layers") as e:
        loop.train(bad, init_from=str(source), progress_bar=False)
    assert "\n" not in str(e.value) and not (tmp_path / "b" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="holds no EMA"):
        load_init_weights(hf, ema=True)


def test_cli_init_from_without_preset_uses_the_source_config(source, tmp_path):
    p = argparse.ArgumentParser()
    loop.add_arguments(p)
    args = p.parse_args(["--init-from", str(source), "--out", str(tmp_path / "c"), "--set", "train.steps=1"])
    cfg = loop.config_from_args(args)
    assert cfg.model.d_model == 32 and cfg.train.out_dir == str(tmp_path / "c") and cfg.train.steps == 1
    with pytest.raises(ConfigError, match="give one of them"):
        loop.train(cfg, resume=str(source), init_from=str(source), progress_bar=False)


def test_resume_with_other_data_points_to_init_from(source, tmp_path):
    from deepwish.data.shards import write_shard
    docs = [[i % 50 + 1 for i in range(40)] + [0] for _ in range(20)]
    write_shard(tmp_path / "t.bin", docs, 2048, "fp")
    write_shard(tmp_path / "v.bin", docs[:4], 2048, "fp")
    cfg = load_config("qwen3_tiny", TINY + [f"train.out_dir={source}", "train.steps=3", "model.vocab_size=2048",
                                            f"data.train_bin={tmp_path / 't.bin'}", f"data.val_bin={tmp_path / 'v.bin'}"])
    with pytest.raises(ConfigError, match=r"data\.train_bin .*--init-from") as e:
        loop.train(cfg, resume=True, progress_bar=False)
    assert "\n" not in str(e.value)
