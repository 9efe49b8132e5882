"""Everything a run needs is checked before its first step and every problem is named in one
error: the resolved configuration, the data against it (token ids, shard sizes), a resume against
its checkpoint; `--set` values are typed by their field; relative data paths are stored resolved."""
import json
import os

import numpy as np
import pytest

from deepwish.config import ConfigError, config_problems, load_config, validate
from deepwish.data.shards import ShardError, check_token_ids, open_shard, write_shard
from deepwish.train import loop
from deepwish.train.schedule import lr_factor

TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
        "model.d_ff=64", "model.vocab_size=64", "train.seq_len=16", "train.batch_size=2", "train.eval_batches=1",
        "train.sample_tokens=0", "train.warmup_steps=1", "train.log_every=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def shards(tmp_path, n_train=40, n_val=4, vocab=64, bad_id=None):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, vocab, 30)) + [0] for _ in range(n_train)]
    write_shard(tmp_path / "train.bin", docs, vocab, "fp")
    val = [list(rng.integers(1, vocab, 30)) + [0] for _ in range(n_val)]
    write_shard(tmp_path / "val.bin", val, vocab, "fp")
    if bad_id is not None:  # an id the header's vocabulary does not allow, as a foreign writer could leave
        shard = open_shard(tmp_path / "train.bin")
        offset = 128 + shard.header.dtype_code * 7
        with open(tmp_path / "train.bin", "r+b") as f:
            f.seek(offset)
            f.write(np.array([bad_id], dtype=shard.header.dtype).tobytes())
    return tmp_path / "train.bin", tmp_path / "val.bin"


def cfg_for(tmp_path, *extra, data=True):
    paths = []
    if data:
        tr, va = shards(tmp_path)
        paths = [f"data.train_bin={tr}", f"data.val_bin={va}"]
    return load_config("qwen3_tiny", TINY + paths + [f"train.out_dir={tmp_path / 'run'}", *extra])


def test_every_config_problem_is_listed_in_one_error(tmp_path):
    bad = ["train.eval_every=0", "train.save_every=0", "train.keep_checkpoints=0", "train.optimizer=sgd",
           "train.schedule=linear", "train.lr=-1", "train.muon_lr=nan", "train.ema_decay=1.5"]
    cfg = cfg_for(tmp_path, *bad)
    with pytest.raises(ConfigError) as e:
        loop.train(cfg, progress_bar=False)
    msg = str(e.value)
    assert "\n" not in msg and "8 problems" in msg
    for key in ("eval_every", "save_every", "keep_checkpoints", "optimizer", "schedule", "train.lr=",
                "muon_lr", "ema_decay"):
        assert key in msg, key
    assert not (tmp_path / "run").exists()  # nothing was written
    assert config_problems(cfg_for(tmp_path)) == [] and validate(cfg_for(tmp_path))


def test_data_is_checked_against_the_config_before_the_first_step(tmp_path):
    tr, va = shards(tmp_path, n_val=1)  # 31 tokens: one window of 17, a batch needs 2
    cfg = load_config("qwen3_tiny", TINY + [f"data.train_bin={tr}", f"data.val_bin={va}",
                                            f"train.out_dir={tmp_path / 'run'}", "train.save_every=0"])
    with pytest.raises(ConfigError) as e:
        loop.train(cfg, progress_bar=False)
    msg = str(e.value)
    assert "2 problems" in msg and "save_every" in msg and "data.val_bin" in msg and "evaluation batch" in msg
    assert not (tmp_path / "run").exists()


def test_missing_shards_are_all_named_in_one_error(tmp_path):
    cfg = load_config("qwen3_tiny", TINY + [f"data.train_bin={tmp_path}/gone/train.bin",
                                            f"data.val_bin={tmp_path}/gone/val.bin", f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as e:
        loop.train(cfg, progress_bar=False)
    msg = str(e.value)
    assert "2 problems" in msg and f"data.train_bin: no shard at {tmp_path}/gone/train.bin" in msg
    assert f"data.val_bin: no shard at {tmp_path}/gone/val.bin" in msg


def test_token_ids_outside_the_model_vocabulary_name_the_shard(tmp_path):
    tr, va = shards(tmp_path, bad_id=100)
    with pytest.raises(ShardError, match=r"train\.bin: holds token id 100"):
        check_token_ids(open_shard(tr), 64)
    check_token_ids(open_shard(va), 64)
    cfg = load_config("qwen3_tiny", TINY + [f"data.train_bin={tr}", f"data.val_bin={va}",
                                            f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"data\.train_bin: .*train\.bin: holds token id 100.*vocab_size=64"):
        loop.train(cfg, progress_bar=False)


def test_resume_refuses_a_changed_batch_or_data_in_one_line(tmp_path):
    cfg = cfg_for(tmp_path, "train.steps=2")
    loop.train(cfg, progress_bar=False)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"global batch is 2 .* this run's 4") as e:
        loop.train(load_config("qwen3_tiny", [*_as_sets(cfg), "train.batch_size=4", "train.steps=3"]),
                   resume=str(run), progress_bar=False)
    assert "\n" not in str(e.value)
    other = tmp_path / "other"
    other.mkdir()
    tr2, va2 = shards(other, n_train=50)
    with pytest.raises(ConfigError, match=r"data\.train_bin .*changed.*--init-from"):
        loop.train(load_config("qwen3_tiny", [*_as_sets(cfg), f"data.train_bin={tr2}", "train.steps=3"]),
                   resume=str(run), progress_bar=False)


def _as_sets(cfg):
    from deepwish.config import to_dict
    d = to_dict(cfg)
    return [f"{s}.{k}={json.dumps(v) if isinstance(v, list) else v}" for s in ("model", "train", "data")
            for k, v in d[s].items()]


def test_set_values_are_typed_by_their_field():
    cfg = load_config("qwen3_tiny", ["train.sample_prompt=JULIET:", "train.device=cpu", "train.compile=off"])
    assert cfg.train.sample_prompt == "JULIET:" and cfg.train.compile == "off"
    assert load_config("qwen3_tiny", ["train.sample_prompt=no"]).train.sample_prompt == "no"
    assert load_config("qwen3_tiny", ["train.sample_prompt=[1, 2]"]).train.sample_prompt == "[1, 2]"
    assert load_config("qwen3_tiny", ["train.sample_prompt=3"]).train.sample_prompt == "3"
    assert load_config("qwen3_tiny", ["train.compile='on'"]).train.compile == "on"  # quoted, as YAML once needed
    assert load_config("qwen3_tiny", ['train.sample_prompt="A: B"']).train.sample_prompt == "A: B"
    c = load_config("qwen3_tiny", ["model.tie_embeddings=no", "train.steps=12", "train.lr=1e-3",
                                   "train.betas=[0.8, 0.9]", "model.dense_layers=[0, 2]"])
    assert c.model.tie_embeddings is False and c.train.steps == 12 and c.train.lr == 1e-3
    assert c.train.betas == (0.8, 0.9) and c.model.dense_layers == (0, 2)
    for bad, field in (("train.steps=1.5", "steps"), ("train.steps=true", "steps"), ("train.lr=fast", "lr"),
                       ("model.tie_embeddings=maybe", "tie_embeddings"), ("model.tie_embeddings=2", "tie_embeddings"),
                       ("train.steps=", "steps")):
        with pytest.raises(ConfigError, match=rf"{field}=.* is not a valid"):
            load_config("qwen3_tiny", [bad])


def test_cli_set_keeps_strings(tmp_path):
    import argparse
    p = argparse.ArgumentParser()
    loop.add_arguments(p)
    args = p.parse_args(["--preset", "qwen3_tiny", "--set", "train.sample_prompt=JULIET:", "--set",
                         "train.compile=off", "--set", "train.steps=3"])
    cfg = loop.config_from_args(args)
    assert (cfg.train.sample_prompt, cfg.train.compile, cfg.train.steps) == ("JULIET:", "off", 3)


def test_extend_steps_keeps_the_schedule_and_continues_at_the_final_rate(tmp_path):
    from deepwish.config import TrainConfig
    base = TrainConfig(steps=10, warmup_steps=2, schedule="cosine", min_lr_frac=0.1)
    ext = TrainConfig(steps=10, extend_steps=5, warmup_steps=2, schedule="cosine", min_lr_frac=0.1)
    assert [lr_factor(s, ext) for s in range(10)] == [lr_factor(s, base) for s in range(10)]
    assert [lr_factor(s, ext) for s in range(10, 15)] == pytest.approx([0.1] * 5)
    # a run planned with the extension == the run as first planned, then extended on resume
    common = ["train.steps=4", "train.save_every=2", "train.eval_every=2"]
    whole = loop.train(cfg_for(tmp_path, *common, "train.extend_steps=2"), progress_bar=False)
    again = tmp_path / "b"
    again.mkdir()
    cfg = cfg_for(again, *common)
    first = loop.train(cfg, progress_bar=False)
    more = loop.train(load_config("qwen3_tiny", [*_as_sets(cfg), "train.extend_steps=2"]), resume=True,
                      progress_bar=False)
    assert more["start_step"] == 4 and more["steps"] == 6
    assert {**first["train_losses"], **more["train_losses"]} == whole["train_losses"]
    recs = [json.loads(x) for x in (again / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr_factor"] for r in recs if r["kind"] == "train"}
    assert lrs[5] == lrs[6] == pytest.approx(0.1)


def test_relative_data_paths_are_stored_resolved_and_the_tokenizer_copied(tmp_path, monkeypatch):
    from deepwish.data.build import build_shards
    from deepwish.data.tokenizer import default_tokenizer
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"line {i} of some text here"}) + "\n"
                                              for i in range(200)))
    tok = default_tokenizer()
    build_shards([tmp_path / "a.jsonl"], tmp_path / "data", tok, val_fraction=0.2)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("qwen3_tiny", TINY + ["data.train_bin=data/train.bin", "data.val_bin=data/val.bin",
                                            "data.tokenizer=data/tokenizer", "model.vocab_size=2048",
                                            "train.out_dir=run", "train.steps=1"])
    loop.train(cfg, progress_bar=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert all(os.path.isabs(saved[k]) for k in ("train_bin", "val_bin", "tokenizer"))
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()


def test_config_file_without_preset_must_give_the_model_shape(tmp_path):
    import argparse
    p = argparse.ArgumentParser()
    loop.add_arguments(p)
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: without --preset .*missing: family, vocab_size"):
        loop.config_from_args(p.parse_args(["--config", str(f)]))
    assert loop.config_from_args(p.parse_args(["--preset", "qwen3_tiny", "--config", str(f)])).train.steps == 3
    f.write_text("model:\n  family: qwen3\n  vocab_size: 64\n  d_model: 32\n  n_layers: 1\n  n_heads: 2\n"
                 "  n_kv_heads: 1\n  head_dim: 16\n  d_ff: 64\n")
    assert loop.config_from_args(p.parse_args(["--config", str(f)])).model.d_model == 32


def test_a_run_with_relative_paths_resumes_and_generates_from_another_directory(tmp_path, monkeypatch):
    from deepwish.cli import main
    from deepwish.data.build import build_shards
    from deepwish.data.tokenizer import default_tokenizer
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"line {i} of some text here"}) + "\n"
                                              for i in range(200)))
    build_shards([tmp_path / "a.jsonl"], tmp_path / "data", default_tokenizer(), val_fraction=0.2)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "qwen3_tiny", "--out", "run", "--set", "data.train_bin=data/train.bin",
                 "--set", "data.val_bin=data/val.bin", "--set", "data.tokenizer=data/tokenizer",
                 *[x for kv in TINY for x in ("--set", kv)], "--set", "model.vocab_size=2048",
                 "--set", "train.steps=1"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (tmp_path / "data" / "tokenizer" / "tokenizer.json").unlink()  # only the run's own copy is left
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.extend_steps=1"]) == 0
    assert main(["generate", "--ckpt", str(tmp_path / "run"), "--prompt", "line", "--max-new-tokens", "2",
                 "--temperature", "0"]) == 0
