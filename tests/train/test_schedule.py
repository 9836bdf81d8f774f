"""Learning-rate schedules: warmup, then cosine, linear or constant."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from relief_mlx.recipe import TrainSection
from relief_mlx.train.schedule import learning_rate


def lrs(total, **kw):
    schedule = learning_rate(TrainSection(**kw), total)
    return [schedule(mx.array(s)).item() for s in range(total)]


def test_cosine_with_warmup():
    values = lrs(12, learning_rate=1e-3, warmup_steps=2, min_learning_rate=1e-4)
    assert values[:2] == pytest.approx([5e-4, 1e-3])
    assert values[2] == pytest.approx(1e-3)
    assert values[7] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert values == sorted(values[:2]) + sorted(values[2:], reverse=True)


def test_linear_is_transformers_default_decay():
    # transformers' get_linear_schedule_with_warmup(0 warmup): lr * (total - s) / total
    assert lrs(4, learning_rate=1e-4, schedule="linear") == pytest.approx([1e-4, 0.75e-4, 0.5e-4, 0.25e-4])


def test_constant():
    assert lrs(3, learning_rate=2e-4, schedule="constant", warmup_steps=1) == pytest.approx([2e-4] * 3)
