"""Scheduled shapes (train/schedule.py): window growth, sequence-length and batch-size stages,
each a pure function of the step, and a run resumed mid-schedule equal to an uninterrupted one."""
import pytest
import torch

from deepwish.config import ConfigError, TrainConfig, load_config, validate
from deepwish.train import loop
from deepwish.train.checkpoint import load_checkpoint
from deepwish.train.loss import step_objective
from deepwish.train.schedule import accum_at, lr_factor, seq_len_at, split_rows, window_blocks_at


def test_stages_and_window_cap():
    tc = TrainConfig(steps=12, seq_len=64, seq_len_schedule=(16, 32, 64), batch_schedule=(1, 2), grad_accum=3,
                     window_warmup_frac=0.5)
    assert [seq_len_at(s, tc) for s in range(12)] == [16] * 4 + [32] * 4 + [64] * 4
    assert [accum_at(s, tc) for s in range(12)] == [1] * 6 + [2] * 6
    assert seq_len_at(20, tc) == 64 and accum_at(20, tc) == 2  # extension steps keep the last stage
    tc = TrainConfig(steps=12, seq_len=1024, window_warmup_frac=0.5, window_start_blocks=2)  # 8 blocks per row
    assert [window_blocks_at(s, tc, 128) for s in range(8)] == [2, 3, 4, 5, 6, 7, 0, 0]  # 0: no cap
    plain = TrainConfig(steps=12, seq_len=64, grad_accum=3)
    assert {seq_len_at(s, plain) for s in range(12)} == {64} and {accum_at(s, plain) for s in range(12)} == {3}
    assert window_blocks_at(0, plain, 128) == 0
    obj = step_objective(TrainConfig(steps=10, seq_len=1024, window_warmup_frac=0.5, window_start_blocks=3), 2,
                         "torch", 1)
    assert obj.window_blocks == 3 + int(5 * 2 / 5)


def test_cooldown_schedule_is_wsd_to_zero():
    tc = TrainConfig(steps=10, schedule="wsd", warmup_steps=0, decay_frac=0.4, min_lr_frac=0.0)
    assert [round(lr_factor(s, tc), 6) for s in range(10)] == [1.0] * 6 + [0.75, 0.5, 0.25, 0.0]


def test_split_rows_keeps_every_token_in_order():
    ids = torch.arange(24).view(2, 12)
    a, t, d, p = split_rows((ids, ids + 1, None, ids * 0), 4)
    assert a.shape == (6, 4) and torch.equal(a.reshape(-1), ids.reshape(-1)) and d is None
    assert torch.equal(t, a + 1)


def test_bad_schedules_are_named():
    cfg = load_config("gpt_tiny", ["train.seq_len_schedule=[100]", "train.batch_schedule=[0]",
                                   "train.window_warmup_frac=2"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "seq_len_schedule" in msg and "batch_schedule" in msg and "window_warmup_frac" in msg


TINY = ["model.n_layers=2", "model.d_model=32", "model.head_dim=8",
        "model.d_ff=64", "model.window_pattern=SL", "model.window_short=1", "model.window_long=2",
        "model.value_embeds=1", "train.seq_len=256", "train.batch_size=1", "train.eval_batches=1",
        "train.sample_tokens=0", "train.log_every=1", "train.warmup_steps=1", "train.steps=6", "train.save_every=3",
        "train.eval_every=3", "train.seq_len_schedule=[64,128]", "train.batch_schedule=[1,2]",
        "train.window_warmup_frac=1.0"]


def test_resume_mid_schedule_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = lambda d: load_config("gpt_tiny", TINY + [f"train.out_dir={d}"])  # noqa: E731
    full = loop.train(cfg(tmp_path / "a"), progress_bar=False)
    real, calls = loop.lm_loss, []

    def crash_in_step_4(*a, **k):
        calls.append(a[1][0].shape)
        if len(calls) == 3 + 1:  # steps 0-2 take one micro-batch each; the first of step 3 fails
            raise KeyboardInterrupt("simulated preemption")
        return real(*a, **k)

    monkeypatch.setattr(loop, "lm_loss", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg(tmp_path / "b"), progress_bar=False)
    assert calls[:3] == [(4, 64)] * 3  # stage 1: rows of 256 split into 4 rows of 64
    monkeypatch.setattr(loop, "lm_loss", real)
    assert load_checkpoint(tmp_path / "b")["step"] == 3
    resumed = loop.train(cfg(tmp_path / "b"), resume=True, progress_bar=False)
    assert sorted(resumed["train_losses"]) == [4, 5, 6]
    for step, value in resumed["train_losses"].items():
        assert value == full["train_losses"][step], (step, value, full["train_losses"][step])
    assert resumed["final_val_loss"] == full["final_val_loss"]
