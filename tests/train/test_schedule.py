"""Learning-rate schedules."""
import math

import pytest
import torch

from deepwish.config import TrainConfig
from deepwish.train.schedule import apply_lr, lr_factor


def factors(**kw):
    cfg = TrainConfig(**kw)
    return [lr_factor(s, cfg) for s in range(cfg.steps)]


def test_warmup_is_linear_and_reaches_one():
    f = factors(schedule="constant", steps=50, warmup_steps=10)
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f[10:] == [1.0] * 40


def test_cosine_peak_floor_and_monotone():
    f = factors(schedule="cosine", steps=100, warmup_steps=10, min_lr_frac=0.1)
    assert f[9] == 1.0 and f[10] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1)
    assert f[54] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert min(f) >= 0.01


def test_wsd_plateau_then_linear_decay():
    f = factors(schedule="wsd", steps=100, warmup_steps=5, decay_frac=0.2, min_lr_frac=0.0)
    assert f[5:80] == [1.0] * 75
    assert f[-1] == pytest.approx(0.0)
    d = [f[i] - f[i + 1] for i in range(80, 99)]
    assert all(x == pytest.approx(0.05) for x in d)
    assert f[80] == pytest.approx(0.95)


def test_apply_lr_and_bad_name():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([dict(params=[p], lr=1.0, base_lr=0.5)])
    cfg = TrainConfig(schedule="constant", steps=10, warmup_steps=4)
    assert apply_lr(opt, 1, cfg) == 0.5
    assert opt.param_groups[0]["lr"] == 0.25
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, TrainConfig(schedule="linear"))
