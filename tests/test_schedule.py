"""Learning-rate schedules: warmup, cosine, warm restarts, and extension of a run."""

from __future__ import annotations

import math

import pytest

from mmkit.train.schedule import learning_rate

BASE = dict(base_lr=1.0, total_steps=100, warmup_steps=10, steps_per_epoch=10, restart_epochs=2)


def test_linear_warmup_then_cosine_to_zero() -> None:
    lr = [learning_rate(s, schedule="cosine", **BASE) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert lr[10] == pytest.approx(1.0)
    assert lr[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:], strict=False))
    assert learning_rate(100, schedule="cosine", **BASE) == pytest.approx(0.0)


def test_warm_restarts_double_each_cycle() -> None:
    lr = [learning_rate(s, schedule="cosine-restarts", **BASE) for s in range(10, 80)]
    # cycles of 20, then 40 steps after warmup: restarts at steps 30 and 70
    assert lr[0] == pytest.approx(1.0) and lr[20] == pytest.approx(1.0) and lr[60] == pytest.approx(1.0)
    assert lr[19] < 0.01 and lr[59] < 0.01


def test_extending_recomputes_the_cosine_over_the_new_length() -> None:
    short = learning_rate(99, schedule="cosine", **BASE)
    longer = learning_rate(99, schedule="cosine", **{**BASE, "total_steps": 150})
    assert short < 0.01 < longer < 1.0


def test_constant() -> None:
    assert learning_rate(50, schedule="constant", **BASE) == 1.0
