"""`deepwish bench speedrun`, `bench ablate` and `bench variants` end to end at toy size on the CPU: the
runs train on the same tokens, and the reported numbers are the ones in the runs' metrics."""
import json

import pytest
import torch

from deepwish.bench.ablate import deltas, summarise, table
from deepwish.bench.speedrun import reach
from deepwish.cli import main

TINY = ["--set", "model.n_layers=2", "--set", "train.batch_size=1", "--set", "train.seq_len=160",
        "--set", "train.eval_every=1", "--set", "train.eval_batches=1", "--set", "train.warmup_steps=1"]


def test_reach_and_deltas_by_hand():
    curve = {"steps": [1, 2, 3], "val_loss": [5.0, 4.0, 3.5], "tokens": [10, 20, 30], "seconds": [1.0, 2.0, 3.0]}
    assert reach(curve, 4.0) == {"step": 2, "tokens": 20, "seconds": 2.0, "val_loss": 4.0}
    assert reach(curve, 3.0) is None
    worse = dict(curve, val_loss=[5.5, 4.25, 3.75])
    assert deltas(curve, worse) == ([10, 20, 30], [0.5, 0.25, 0.25])
    s = summarise({"full": {0: curve, 1: dict(curve, val_loss=[5.0, 4.0, 3.6])},
                   "skips": {0: worse, 1: dict(curve, val_loss=[5.0, 4.0, 3.7])}}, ["skips"])
    assert s["off"]["skips"]["final_delta"] == pytest.approx([0.25, 0.1])
    assert s["off"]["skips"]["mean"] == pytest.approx(0.175) and s["full"]["spread"] == pytest.approx(0.1)
    alone = summarise({"full": {0: curve, 1: dict(curve, val_loss=[5.0, 4.0, 3.6])}}, [])  # --off none
    assert alone["off"] == {} and "seed spread 0.1000" in table(alone, "p")


def test_speedrun_cli_same_tokens(tmp_path, capsys):
    from tests.data.test_text_tree import make_tree
    torch.set_num_threads(1)
    out, data = tmp_path / "sr", tmp_path / "corpus"
    assert main(["data", "build", "--tree", str(make_tree(tmp_path / "tree")), "--bpe-vocab", "300",
                 "--val-fraction", "0.2", "--out", str(data)]) == 0
    meta = json.loads((data / "meta.json").read_text())
    assert main(["bench", "speedrun", "--out", str(out), "--preset", "gpt_tiny", "--baseline", "gpt2_baseline_tiny",
                 "--steps", "3", "--data", str(data), *TINY]) == 0
    r = json.loads((out / "speedrun.json").read_text())
    m, b = r["model"]["curves"], r["baseline"]["curves"]
    assert m["steps"] == b["steps"] == [1, 2, 3] and m["tokens"] == b["tokens"]  # the same tokens
    assert m["tokens"][-1] == r["data"]["planned_tokens"] == 3 * 160
    assert r["data"]["fingerprint"] == meta["fingerprint"] and r["data"]["train_tokens"] == meta["train"]["tokens"]
    assert r["target"] == b["val_loss"][-1] == r["baseline"]["final_val_loss"]
    assert all(x > 0 for x in m["seconds"]) and m["seconds"] == sorted(m["seconds"])
    assert m["compile_seconds"] > 0 and b["compile_seconds"] > 0  # both took the warm-up, outside the clock
    cfg = json.loads((out / "gpt_tiny" / "config.json").read_text())
    assert cfg["data"]["train_bin"] == str((data / "train.bin").resolve()) and cfg["train"]["compile_warmup"]
    assert (out / "speedrun.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "gpt2_baseline_tiny" in printed and f"corpus fingerprint {meta['fingerprint']}" in printed
    assert main(["bench", "speedrun", "--out", str(out), "--data", str(tmp_path / "nothing")]) == 2


def test_ablate_cli_two_seeds(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "ab"
    assert main(["bench", "ablate", "--out", str(out), "--preset", "gpt_tiny", "--off", "value_embeds",
                 "--seeds", "2", "--steps", "2", *TINY]) == 0
    r = json.loads((out / "ablate.json").read_text())
    assert r["seeds"] == [0, 1] and len(r["off"]["value_embeds"]["final_delta"]) == 2
    full0 = [json.loads(x) for x in (out / "seed0" / "full" / "metrics.jsonl").read_text().splitlines()]
    off0 = [json.loads(x) for x in (out / "seed0" / "value_embeds" / "metrics.jsonl").read_text().splitlines()]
    last = lambda recs: [x["val_loss"] for x in recs if x["kind"] == "val"][-1]  # noqa: E731
    assert r["off"]["value_embeds"]["final_delta"][0] == pytest.approx(last(off0) - last(full0))
    assert (out / "ablate.png").stat().st_size > 1000
    assert main(["bench", "ablate", "--out", str(out), "--off", "nonsense"]) == 2
    assert "unknown technique(s) nonsense" in capsys.readouterr().err
    # a technique the preset does not use (gpt_tiny runs Muon without NorMuon) cannot be ablated
    assert main(["bench", "ablate", "--out", str(tmp_path / "idle"), "--preset", "gpt_tiny", "--off", "skips,normuon",
                 "--steps", "2", *TINY]) == 2
    assert "--off normuon: already off in gpt_tiny" in capsys.readouterr().err
    assert not (tmp_path / "idle").exists()
    # the same command again (a call cut short, taken up): finished runs are read back, a run without
    # its final record is resumed from its checkpoint, and the summary is the same
    metrics = out / "seed1" / "value_embeds" / "metrics.jsonl"
    kept = [x for x in metrics.read_text().splitlines() if json.loads(x)["kind"] != "final"]
    metrics.write_text("\n".join(kept) + "\n")
    capsys.readouterr()
    assert main(["bench", "ablate", "--out", str(out), "--preset", "gpt_tiny", "--off", "value_embeds",
                 "--seeds", "2", "--steps", "2", *TINY]) == 0
    assert capsys.readouterr().out.count("finished in an earlier call") == 3
    again = json.loads((out / "ablate.json").read_text())
    assert again["off"] == r["off"] and again["full"] == r["full"]
    import shutil
    shutil.rmtree(out / "seed1" / "value_embeds" / "checkpoints")
    (out / "seed1" / "value_embeds" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    assert main(["bench", "ablate", "--out", str(out), "--preset", "gpt_tiny", "--off", "value_embeds",
                 "--seeds", "2", "--steps", "2", *TINY]) == 2
    assert "unfinished run without a checkpoint" in capsys.readouterr().err
    assert main(["bench", "ablate", "--out", str(out), "--preset", "gpt_tiny", "--off", "value_embeds",
                 "--seeds", "2", "--steps", "3", *TINY]) == 2
    assert "holds a run with other settings (train.save_every, train.steps)" in capsys.readouterr().err
    # a later call of a split ablation takes the full model's runs from this one, when they match
    from deepwish.bench.ablate import reuse_full
    from deepwish.bench.speedrun import run_curves
    sets = [x for x in TINY if x != "--set"] + ["train.steps=2", "train.seed=1"]
    assert reuse_full(out, "gpt_tiny", sets, 1, {}) == run_curves(out / "seed1" / "full")
    # a run saved before a setting existed (absent from its config.json) matches at the default only
    saved = out / "seed1" / "full" / "config.json"
    cfg = json.loads(saved.read_text())
    assert cfg["model"].pop("embed_backend") == "auto"
    saved.write_text(json.dumps(cfg))
    assert reuse_full(out, "gpt_tiny", sets, 1, {}) == run_curves(out / "seed1" / "full")
    with pytest.raises(Exception, match="differs from this call's in model.embed_backend"):
        reuse_full(out, "gpt_tiny", sets + ["model.embed_backend=torch"], 1, {})
    assert main(["bench", "ablate", "--out", str(tmp_path / "ab2"), "--preset", "gpt_tiny", "--off", "skips",
                 "--seeds", "2", "--steps", "3", "--full-from", str(out), *TINY]) == 2
    assert "differs from this call's in train.eval_every" not in (err := capsys.readouterr().err) and "train.steps" in err
    assert not (tmp_path / "ab2" / "seed0").exists()  # nothing trained
    assert main(["bench", "ablate", "--out", str(tmp_path / "ab3"), "--off", "none", "--full-from", str(out)]) == 2
    assert "nothing to train" in capsys.readouterr().err
    # --runs-from: every run that finished there (the full model's, seed 0's value_embeds; seed 1's was
    # left unfinished above) is read back after the settings check, the rest trained in --out
    capsys.readouterr()
    assert main(["bench", "ablate", "--out", str(tmp_path / "ab4"), "--preset", "gpt_tiny", "--off", "value_embeds,skips",
                 "--seeds", "2", "--steps", "2", "--runs-from", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert printed.count("read back from") == 3 and "seed 0's value_embeds read back" in printed
    assert sorted(p.name for p in (tmp_path / "ab4").glob("seed*/*")) == ["skips", "skips", "value_embeds"]
    r4 = json.loads((tmp_path / "ab4" / "ablate.json").read_text())
    assert r4["off"]["value_embeds"]["final_delta"][0] == r["off"]["value_embeds"]["final_delta"][0]
    assert r4["runs_from"] == str(out) and len(r4["off"]["skips"]["final_delta"]) == 2
    assert main(["bench", "ablate", "--out", str(tmp_path / "ab5"), "--preset", "gpt_tiny", "--off", "value_embeds",
                 "--seeds", "1", "--steps", "3", "--runs-from", str(out), *TINY]) == 2
    assert "--runs-from" in (err := capsys.readouterr().err) and "seed 0's full run differs" in err and "train.steps" in err


def test_run_curves_count_tokens_and_training_time_between_records(tmp_path):
    from deepwish.bench.speedrun import run_curves
    recs = [{"kind": "train", "step": 2, "n_targets": 100, "tok_s": 100.0, "time": 12.0},
            {"kind": "val", "step": 2, "val_loss": 5.0, "time": 15.0},  # 3 s of evaluation
            {"kind": "train", "step": 4, "n_targets": 100, "tok_s": 100.0, "time": 17.0},
            {"kind": "val", "step": 4, "val_loss": 4.0, "time": 18.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    c = run_curves(tmp_path)
    assert c["tokens"] == [200, 400]  # a record every 2 steps
    assert c["seconds"] == pytest.approx([2.0, 4.0])  # started at 10 s; the evaluation does not count
    assert c["val_loss"] == [5.0, 4.0]


def test_run_curves_median_is_of_each_steps_own_rate(tmp_path):
    """Records with step_tok_s: the median is of those (a slow first step stays in the logger's
    windowed tok_s of every later record of a short run); older records without it: of tok_s."""
    from deepwish.bench.speedrun import run_curves
    recs = [{"kind": "train", "step": s, "n_targets": 100, "tok_s": 50.0 + s, "mfu": 0.1, "time": 10.0 + s,
             "step_tok_s": 1000.0 if s > 1 else 10.0, "step_mfu": 0.5 if s > 1 else 0.01} for s in range(1, 11)]
    recs.append({"kind": "val", "step": 10, "val_loss": 4.0, "time": 21.0})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    c = run_curves(tmp_path)
    assert c["tok_s"] == 1000.0 and c["mfu"] == 0.5
    for r in recs:
        r.pop("step_tok_s", None), r.pop("step_mfu", None)
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    assert run_curves(tmp_path)["tok_s"] == 56.0   # steps 2-10's windowed rates: 52..60, the median 56


def test_variants_cli_times_each_variant_on_the_real_trainer(tmp_path, capsys):
    from deepwish.bench.variants import parse_variant
    torch.set_num_threads(1)
    out = tmp_path / "var"
    assert main(["bench", "variants", "--out", str(out), "--preset", "gpt_tiny", "--steps", "2", *TINY,
                 "--variant", "b2: train.batch_size=2", "--variant", "bad: train.optimizer=sgd"]) == 1
    r = json.loads((out / "variants.json").read_text())
    base, b2, bad = r["rows"]
    assert [x["variant"] for x in r["rows"]] == ["base", "b2", "bad"] and base["sets"] == []
    for row, batch in ((base, 1), (b2, 2)):  # each row is its own run's metrics, with its own batch
        recs = [json.loads(x) for x in (out / row["variant"] / "metrics.jsonl").read_text().splitlines()]
        train = [x for x in recs if x["kind"] == "train"]
        assert row["error"] is None and train[-1]["n_targets"] == batch * 160
        # the median of the steps' own rates (run_curves), not of the logger's windowed rate
        assert row["tok_s"] in [x["step_tok_s"] for x in train] and row["step_ms"] == pytest.approx(1e3 * batch * 160 / row["tok_s"])
        assert row["final_val_loss"] > 0 and row["peak_mem_gib"] > 0
    assert "optimizer='sgd'" in bad["error"] and "tok_s" not in bad  # refused by name, nothing timed
    printed = capsys.readouterr().out
    assert "| b2 | train.batch_size=2 |" in printed and "| bad | train.optimizer=sgd | failed:" in printed
    assert (out / "variants.png").stat().st_size > 1000
    assert parse_variant("x-1: a.b=1 c.d='e f'") == ("x-1", ["a.b=1", "c.d=e f"])
    for bad_text in ("nocolon", "base: a.b=1", "x:", "x: notakey", "x y: a.b=1"):
        with pytest.raises(ValueError):
            parse_variant(bad_text)
