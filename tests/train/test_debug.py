"""`deepwish train --debug`: a preset's first check on synthetic tokens, no data needed."""
import json
import math

import pytest

from deepwish.cli import main
from deepwish.data.shards import open_shard
from deepwish.data.synthetic import synthetic_documents


def test_synthetic_documents_are_arithmetic_sequences():
    docs = synthetic_documents(100, vocab_size=50, doc_len=33, seed=0)
    assert sum(len(d) for d in docs) == 100 and [len(d) for d in docs] == [33, 33, 33, 1]
    for d in docs[:3]:
        steps = {int(x) for x in (d[1:] - d[:-1]) % 50}
        assert len(steps) == 1 and 1 <= steps.pop() <= 7


@pytest.mark.usefixtures("one_thread")
def test_train_debug_runs_on_synthetic_tokens_and_learns(tmp_path, capsys):
    out = tmp_path / "dbg"
    assert main(["train", "--preset", "qwen3_tiny", "--debug", "--out", str(out), "--set", "model.n_layers=1",
                 "--set", "train.batch_size=4", "--set", "train.seq_len=32"]) == 0
    assert "--debug: synthetic tokens (vocab 2048)" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["step"] == 20
    assert train[-1]["loss"] < math.log(2048) - 0.5  # the sequences are learnable
    assert open_shard(out / "synthetic" / "train.bin").header.vocab_size == 2048


def test_debug_refuses_data_settings(tmp_path, capsys):
    assert main(["train", "--preset", "qwen3_tiny", "--debug", "--out", str(tmp_path / "d"),
                 "--set", f"data.train_bin={tmp_path}/x.bin"]) == 2
    assert "synthetic tokens" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_debug_replaces_its_own_previous_check_but_not_a_run_named_by_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["--set", "model.n_layers=1", "--set", "train.batch_size=2", "--set", "train.seq_len=16",
             "--set", "train.steps=4", "--set", "train.save_every=4"]
    assert main(["train", "--preset", "qwen3_tiny", "--debug", *small]) == 0
    own = tmp_path / "runs" / "debug" / "qwen3_tiny"
    (own / "stray.txt").write_text("from the first check")
    assert main(["train", "--preset", "qwen3_tiny", "--debug", *small]) == 0  # after an edit: again
    assert "replaced the previous check in runs/debug/qwen3_tiny" in capsys.readouterr().out
    assert not (own / "stray.txt").exists() and (own / "checkpoints").is_dir()
    named = tmp_path / "mine"
    assert main(["train", "--preset", "qwen3_tiny", "--debug", "--out", str(named), *small]) == 0
    assert main(["train", "--preset", "qwen3_tiny", "--debug", "--out", str(named), *small]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    # named by the user, even where that is --debug's own directory: never replaced
    for naming in (["--out", "runs/debug/qwen3_tiny"], ["--set", "train.out_dir=./runs/debug/qwen3_tiny"]):
        assert main(["train", "--preset", "qwen3_tiny", "--debug", *naming, *small]) == 2
        assert "already holds checkpoints" in capsys.readouterr().err
