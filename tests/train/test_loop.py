"""End-to-end trainer on a tiny Qwen3: learning, exact resume, refusal to overwrite, CLI config,
non-finite stop that keeps the last good checkpoint."""
import argparse
import json

import pytest
import torch

from deepwish.config import ConfigError, load_config
from deepwish.train import loop
from deepwish.train.checkpoint import list_checkpoints, load_checkpoint
from deepwish.train.nonfinite import NonFiniteError

TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
        "model.d_ff=64", "train.seq_len=32", "train.batch_size=4", "train.eval_batches=2", "train.sample_tokens=8",
        "train.log_every=2", "train.warmup_steps=2",
        "train.lr=0.02", "train.muon_lr=0.05"]


def tiny_cfg(out_dir, *extra):
    return load_config("qwen3_tiny", TINY + [f"train.out_dir={out_dir}", *extra])


def test_loss_decreases_and_run_writes_everything(tmp_path):
    s = loop.train(tiny_cfg(tmp_path / "run", "train.steps=16", "train.eval_every=8", "train.save_every=8",
                            "train.ema_decay=0.9"), progress_bar=False)
    losses = [s["train_losses"][k] for k in sorted(s["train_losses"])]
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert set(s["val_losses"]) == {8, 16}
    run = tmp_path / "run"
    assert (run / "plot.png").stat().st_size > 1000
    kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 8 and kinds.count("val") == 2 and kinds[-1] == "final"
    assert s["unigram_entropy"] > 0 and s["sample"].startswith("ROMEO:")
    c = load_checkpoint(run)
    assert c["step"] == 16 and c["ema"] is not None and c["config"]["model"]["d_model"] == 32


def test_interrupted_then_resumed_run_has_bitwise_equal_losses(tmp_path, monkeypatch):
    common = ["train.steps=7", "train.save_every=3", "train.eval_every=3", "train.grad_accum=2",
              "train.sample_tokens=0"]
    full = loop.train(tiny_cfg(tmp_path / "a", *common), progress_bar=False)

    real_lm_loss = loop.lm_loss
    calls = []

    def crash_in_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 2 * 4 + 1:  # first micro-batch of step 5: after the step-3 save
            raise KeyboardInterrupt("simulated preemption")
        return real_lm_loss(*a, **k)

    monkeypatch.setattr(loop, "lm_loss", crash_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        loop.train(tiny_cfg(tmp_path / "b", *common), progress_bar=False)
    monkeypatch.setattr(loop, "lm_loss", real_lm_loss)
    assert load_checkpoint(tmp_path / "b")["step"] == 6 - 3
    resumed = loop.train(tiny_cfg(tmp_path / "b", *common), resume=True, progress_bar=False)
    assert resumed["start_step"] == 3
    assert sorted(resumed["train_losses"]) == [4, 5, 6, 7]
    for step, value in resumed["train_losses"].items():
        assert value == full["train_losses"][step], (step, value, full["train_losses"][step])
    assert resumed["val_losses"][6] == full["val_losses"][6]
    assert resumed["final_val_loss"] == full["final_val_loss"]


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    loop.train(tiny_cfg(tmp_path, "train.steps=1", "train.sample_tokens=0"), progress_bar=False)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        loop.train(tiny_cfg(tmp_path, "train.steps=1"), progress_bar=False)


def test_nonfinite_step_raises_naming_a_module_and_keeps_last_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=6", "train.save_every=1", "train.optimizer=adamw", "train.lr=1e30",
                   "train.warmup_steps=1", "train.grad_clip=0", "train.schedule=constant")
    with pytest.raises(NonFiniteError, match=r"module '[\w.]+'") as err:
        loop.train(cfg, progress_bar=False)
    assert "last good checkpoint" in str(err.value)
    good = load_checkpoint(tmp_path)
    assert f"step {good['step'] + 1}:" in str(err.value)
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == f"step_{good['step']:08d}"


def test_cli_config_layering(tmp_path):
    p = argparse.ArgumentParser()
    loop.add_arguments(p)
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  steps: 7\n  sample_prompt: 'KING:'\nmodel:\n  n_layers: 3\n")
    args = p.parse_args(["--preset", "qwen3_tiny", "--config", str(extra), "--set", "train.steps=9",
                         "--out", str(tmp_path / "o")])
    cfg = loop.config_from_args(args)
    assert (cfg.train.steps, cfg.model.n_layers, cfg.train.sample_prompt) == (9, 3, "KING:")
    assert cfg.train.out_dir == str(tmp_path / "o")
    extra.write_text("train:\n  stepz: 7\n")
    with pytest.raises(ConfigError, match="stepz"):
        loop.config_from_args(p.parse_args(["--preset", "qwen3_tiny", "--config", str(extra)]))
    with pytest.raises(ConfigError, match="--preset"):
        loop.config_from_args(p.parse_args([]))
    assert p.parse_args(["--resume"]).resume is True
    assert p.parse_args(["--resume", "runs/x"]).resume == "runs/x"


def test_moe_run_logs_expert_load_and_updates_router_bias(tmp_path, monkeypatch):
    calls = []
    from deepwish.model.transformer import Transformer
    real = Transformer.update_router_bias

    def spy(model, loads, rate):
        layers = sorted(loads)
        calls.append((layers, torch.stack([loads[k] for k in layers]).float(), rate))
        real(model, loads, rate)

    monkeypatch.setattr(Transformer, "update_router_bias", spy)
    cfg = load_config("qwen3_moe_tiny", TINY + [f"train.out_dir={tmp_path}", "train.steps=3", "train.sample_tokens=0",
                                               "model.n_experts=4", "model.n_experts_per_tok=2", "model.d_ff_expert=16",
                                               "model.router=sigmoid", "model.bias_update_rate=0.01",
                                               "model.router_aux_loss_coef=0.01"])
    s = loop.train(cfg, progress_bar=False)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert train_recs and all("aux/moe" in r and r["moe/max_load"] >= 1.0 >= r["moe/min_load"] for r in train_recs)
    moe = [r for r in recs if r["kind"] == "moe"]
    assert moe and len(moe[-1]["tokens_per_expert"]) == 1 and len(moe[-1]["tokens_per_expert"][0]) == 4
    # One bias step per optimizer step, from that step's loads (B*T*k assignments in all).
    assert len(calls) == 3 and all(c[0] == [0] and c[2] == 0.01 and c[1].sum() == 4 * 32 * 2 for c in calls)
    expect = sum(0.01 * torch.sign(c[1][0].mean() - c[1][0]) for c in calls)
    bias = load_checkpoint(tmp_path)["model"]["blocks.0.ffn.e_score_correction_bias"]
    torch.testing.assert_close(bias, expect)
    assert s["final_val_loss"] > 0


def test_the_loop_collects_garbage_on_its_schedule_and_restores_the_collector(tmp_path, monkeypatch):
    """train.gc_every: automatic collection off and the pre-loop heap frozen during the loop, one
    full collection every gc_every steps, the collector as it was afterwards (also when a step fails)."""
    import gc
    seen = []
    real_after = loop.HostGarbage.after

    def after(self, done):
        seen.append((done, gc.isenabled(), gc.get_freeze_count() > 0))
        collections = gc.get_stats()[2]["collections"]
        real_after(self, done)
        seen[-1] += (gc.get_stats()[2]["collections"] - collections,)  # full collections this step
    monkeypatch.setattr(loop.HostGarbage, "after", after)
    assert gc.isenabled()
    cfg = load_config("qwen3_tiny", TINY + [f"train.out_dir={tmp_path / 'a'}", "train.steps=5", "train.gc_every=2",
                                            "train.sample_tokens=0", "train.eval_every=5"])
    loop.train(cfg, progress_bar=False)
    assert seen == [(1, False, True, 0), (2, False, True, 1), (3, False, True, 0), (4, False, True, 1), (5, False, True, 0)]
    assert gc.isenabled() and gc.get_freeze_count() == 0
    # a failing step leaves the collector restored too; gc_every=0 leaves it alone
    seen.clear()
    monkeypatch.setattr(loop, "optimizer_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        loop.train(load_config(None, [f"train.out_dir={tmp_path / 'b'}"], base=cfg), progress_bar=False)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    monkeypatch.undo()
    assert loop.HostGarbage(0).every == 0 and gc.isenabled() and gc.get_freeze_count() == 0


def test_resume_with_nothing_left_to_train_says_so(tmp_path, capsys):
    loop.train(tiny_cfg(tmp_path / "run", "train.steps=4", "train.eval_every=4", "train.save_every=4",
                        "train.sample_tokens=0"), progress_bar=False)
    again = loop.train(tiny_cfg(tmp_path / "run", "train.steps=4", "train.eval_every=4", "train.save_every=4",
                                "train.sample_tokens=0", "train.extend_steps=0"), resume=True, progress_bar=False)
    assert again["train_losses"] == {}
    out = capsys.readouterr().out
    assert ("nothing to train: the run is at step 4 and takes 4 (train.steps 4 + train.extend_steps 0); raise "
            "train.extend_steps to go further") in out


def test_end_of_run_sample_runs_compiled_blocks_eagerly():
    """The run's closing sample does not go through torch.compile: blocks compiled with a backend that
    refuses every graph still sample (the trainer's compiled blocks would otherwise compile the
    prefill's and decode step's shapes for a few dozen tokens)."""
    from deepwish.model import Transformer

    class Codec:
        def encode(self, text):
            return [1, 2, 3]

        def decode(self, ids):
            return " ".join(map(str, ids))

    def refuse(gm, example_inputs):
        raise AssertionError("the sample compiled a graph")

    cfg = tiny_cfg("unused")
    model = Transformer(cfg.model)
    for block in model.blocks:
        block.compile(backend=refuse)
    with pytest.raises(Exception, match="compiled a graph"):   # the backend does refuse outside the sample
        model(torch.tensor([[1, 2, 3]]))
    text = loop.sample_text(model, Codec(), cfg.train, torch.device("cpu"))
    ids = text.split()
    assert ids[:3] == ["1", "2", "3"] and len(ids) == 3 + cfg.train.sample_tokens
