"""Compile warm-up (train/warmup.py): every scheduled shape is run once before the clock, and the
run that follows is exactly the run without it."""
import json

import torch

from deepwish.config import TrainConfig, load_config
from deepwish.train import loop
from deepwish.train.checkpoint import load_checkpoint
from deepwish.train.warmup import synthetic_batch, warmup_plan


def test_plan_lists_every_scheduled_shape_once():
    # seq_len 512 = 4 blocks; caps 1 + int(3·step/5) over the first half of 10 steps, then 0 (uncapped)
    tc = TrainConfig(steps=10, seq_len=512, window_warmup_frac=0.5)
    assert warmup_plan(tc, 0, 10) == [(0, 512, 1), (2, 512, 2), (4, 512, 3), (5, 512, 0)]
    staged = TrainConfig(steps=10, seq_len=512, window_warmup_frac=0.5, seq_len_schedule=(256, 512),
                         batch_schedule=(1, 3))
    assert warmup_plan(staged, 0, 10) == [(0, 256, 1), (2, 256, 2), (4, 256, 3), (5, 512, 0)]
    assert warmup_plan(staged, 3, 12) == [(3, 256, 2), (4, 256, 3), (5, 512, 0)]  # resumed at step 3
    assert warmup_plan(TrainConfig(steps=10, seq_len=512), 0, 10) == [(0, 512, 0)]
    # the speedrun preset: 16 shapes (caps 1..15 over 60% of 1750 steps, then uncapped)
    gpt = load_config("gpt_124m").train
    plan = warmup_plan(gpt, 0, gpt.steps)
    assert [c for _, _, c in plan] == list(range(1, 16)) + [0] and plan[-1][0] == 1050


def test_synthetic_batch_documents():
    ids, tgt, doc, pos = synthetic_batch(2, 6, 2)
    assert ids.shape == tgt.shape == doc.shape == pos.shape == (2, 6) and int(ids.abs().sum()) == 0
    assert doc[1].tolist() == [0, 0, 0, 1, 1, 1] and pos[0].tolist() == [0, 1, 2, 0, 1, 2]
    _, _, doc1, pos1 = synthetic_batch(1, 4, 1)
    assert doc1.tolist() == [[0, 0, 0, 0]] and pos1.tolist() == [[0, 1, 2, 3]]


TINY = ["model.n_layers=2", "model.d_model=32", "model.head_dim=8", "model.d_ff=64", "model.window_pattern=SL",
        "model.window_short=1", "model.window_long=2", "model.value_embeds=1", "train.seq_len=256",
        "train.batch_size=1", "train.eval_batches=1", "train.sample_tokens=0", "train.log_every=1",
        "train.warmup_steps=1", "train.steps=4", "train.save_every=4", "train.eval_every=4",
        "train.seq_len_schedule=[128,256]", "train.batch_schedule=[1,2]", "train.window_warmup_frac=0.5"]


def test_warmup_leaves_the_run_unchanged(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    shapes = []
    real = loop.lm_loss

    def spy(model, batch, tc, n_global, **k):
        shapes.append((tuple(batch[0].shape), batch[2] is not None and bool((batch[2] != 0).any()), k.get("step")))
        return real(model, batch, tc, n_global, **k)

    monkeypatch.setattr(loop, "lm_loss", spy)
    evals = []
    real_eval = loop.evaluation_forward

    def eval_spy(model, batch, *a):
        evals.append((tuple(batch[0].shape), batch[2] is not None and bool((batch[2] != 0).any()),
                      model.training, torch.is_grad_enabled()))
        return real_eval(model, batch, *a)

    monkeypatch.setattr(loop, "evaluation_forward", eval_spy)
    plain = loop.train(load_config("gpt_tiny", TINY + [f"train.out_dir={tmp_path / 'a'}"]), progress_bar=False)
    assert len(shapes) == 6  # steps 0-1 one micro-batch of 2 rows of 128, steps 2-3 two of 1 row of 256
    assert len(evals) == 1 and evals[0][2:] == (False, False)  # the final evaluation: one batch
    shapes.clear()
    evals.clear()
    warm = loop.train(load_config("gpt_tiny", TINY + [f"train.out_dir={tmp_path / 'b'}", "train.compile_warmup=true"]),
                      progress_bar=False)
    # the plan: (step 0, 128, cap 1), (step 2, 256, uncapped), each with one and two documents a row
    assert shapes[:4] == [((2, 128), False, 0), ((2, 128), True, 0), ((1, 256), False, 2), ((1, 256), True, 2)]
    assert len(shapes) == 4 + 6
    # then the evaluation's forward at the full length, eval mode, no gradients, both document-id forms
    assert evals[:2] == [((1, 256), False, False, False), ((1, 256), True, False, False)] and len(evals) == 2 + 1
    assert warm["train_losses"] == plain["train_losses"] and warm["final_val_loss"] == plain["final_val_loss"]
    ca, cb = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert ca["model"].keys() == cb["model"].keys()
    for k, v in ca["model"].items():  # the same weights, bit for bit
        assert torch.equal(v, cb["model"][k]), k
    recs = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    w = [r for r in recs if r["kind"] == "warmup"]
    assert len(w) == 1 and w[0]["passes"] == 4 and w[0]["eval_passes"] == 2 and w[0]["seconds"] > 0
    assert w[0]["optimizer_buckets"] == 0  # Muon's torch backend on the CPU: no kernels to warm
    assert [s["window_blocks"] for s in w[0]["shapes"]] == [1, 0]
    assert recs.index(w[0]) < min(i for i, r in enumerate(recs) if r["kind"] == "train")
