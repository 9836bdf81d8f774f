"""Learning rate per optimizer step: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from ..recipe import TrainSection


def learning_rate(train: TrainSection, total_steps: int) -> Callable[[mx.array], mx.array]:
    """Schedule for `mlx.optimizers` (called with the 0-based step of the update it applies).

    Warmup: step s < warmup uses lr * (s + 1) / warmup (the first update is not wasted at 0).
    Then over the remaining steps: cosine from lr to min_learning_rate, linear from lr towards
    0 (transformers' default `get_linear_schedule_with_warmup`), or constant.
    """
    peak, low, warmup = train.learning_rate, train.min_learning_rate, train.warmup_steps
    decay = max(total_steps - warmup, 1)

    def schedule(step: mx.array) -> mx.array:
        s = step.astype(mx.float32)
        progress = mx.clip((s - warmup) / decay, 0.0, 1.0)
        if train.schedule == "cosine":
            after = low + (peak - low) * 0.5 * (1.0 + mx.cos(math.pi * progress))
        elif train.schedule == "linear":
            after = peak * (1.0 - progress)
        else:
            after = mx.array(peak, mx.float32)
        if warmup == 0:
            return after
        return mx.where(s < warmup, peak * (s + 1) / warmup, after)

    return schedule
