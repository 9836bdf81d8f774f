"""The trainer's batch order and micro-batches: every example once per epoch, neighbours in
length together, reproducible from (seed, epoch), trained positions gathered exactly."""

from __future__ import annotations

import numpy as np
import pytest

from relief_mlx.data.dataset import Example, Record
from relief_mlx.train.data import epoch_order, eval_order, micro_batch


def _examples(lengths: list[int]) -> list[Example]:
    record = Record("f.jsonl", 1, "train", "chat")
    return [Example(np.arange(n, dtype=np.int32) + 1000 * i, np.arange(n) % 2 == 1, record, n, "kept")
            for i, n in enumerate(lengths)]


def test_an_epoch_holds_every_example_once_with_neighbours_in_length_together():
    lengths = [5, 40, 7, 38, 6, 39, 41, 8]
    order = epoch_order(lengths, 2, seed=3, epoch=0)
    assert sorted(i for batch in order for i in batch) == list(range(8))
    for batch in order:  # the four short ones pair up, the four long ones pair up
        assert len({lengths[i] < 20 for i in batch}) == 1


def test_the_order_is_reproducible_and_reshuffled_per_epoch():
    lengths = list(range(2, 42))
    assert epoch_order(lengths, 4, 3, 0) == epoch_order(lengths, 4, 3, 0)
    first, second = epoch_order(lengths, 4, 3, 0), epoch_order(lengths, 4, 3, 1)
    assert first != second and sorted(map(sorted, first)) == sorted(map(sorted, second))


def test_validation_order_is_length_sorted_and_fixed():
    assert eval_order([9, 3, 7, 5, 1], 2) == [[4, 1], [3, 2], [0]]


def test_micro_batch_gathers_the_trained_positions():
    examples = _examples([5, 3])
    mb = micro_batch(examples, [0, 1], max_length=8, pad_multiple=1)
    assert mb.inputs.shape == (2, 4) and mb.tokens == 8
    # targets are tokens[:, 1:] where mask[:, 1:]: odd positions 1, 3 of row 0 and 1 of row 1
    assert mb.trained == 3 and mb.targets[:3].tolist() == [1, 3, 1001]
    assert mb.positions[:3].tolist() == [0, 2, 4 + 0]
    assert mb.weights.sum() == 3 and len(mb.weights) == 32  # padded to a multiple of 32
    with pytest.raises(ValueError, match="max_length 4"):
        micro_batch(examples, [0], max_length=4, pad_multiple=1)
