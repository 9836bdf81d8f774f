"""Packing (`train.pack`): rows, masks, and the same loss, gradients and run as unpacked training."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from relief_mlx.data.dataset import Example
from relief_mlx.recipe import LoraSection
from relief_mlx.train.data import micro_batch
from relief_mlx.train.loss import loss_sum
from relief_mlx.train.pack import masks, pack_rows, packed_micro_batch
from relief_mlx.train.targets import apply_lora


def test_rows_first_fit_longest_first_and_never_overfull():
    lengths = [300, 200, 250, 100, 50]
    assert pack_rows([[0, 1], [2], [3, 4]], lengths, 512) == [[0, 1], [2, 3, 4]]
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, size=40).tolist()
    rows = pack_rows([[i] for i in range(40)], lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(40))
    assert max(sum(lengths[i] for i in r) for r in rows) <= 512
    assert len(rows) < 40


def test_masks_are_block_diagonal_causal_with_the_window():
    segments = np.array([[0, 0, 0, 0, 1, 1, 1, -1]])
    full, sliding = (np.array(m)[0, 0] for m in masks(mx.array(segments), window=2))
    for i in range(8):
        for j in range(8):
            same = segments[0, i] == segments[0, j] and j <= i
            assert full[i, j] == same, (i, j)
            assert sliding[i, j] == (same and i - j < 2), (i, j)


def _examples(lengths: list[int]) -> list[Example]:
    rng = np.random.default_rng(1)
    out = []
    for n in lengths:
        mask = rng.random(n) < 0.6
        mask[0] = False
        out.append(Example(rng.integers(0, 199_998, n).astype(np.int32), mask, None, n, "kept"))
    return out


@pytest.mark.parametrize("checkpoint", [False, True])
def test_packed_loss_and_lora_gradients_equal_unpacked(mini_model, checkpoint):
    """One row of three conversations, one longer than the 128-token window, against each alone:
    attention never crosses a conversation and positions act as if they restarted."""
    mx.random.seed(0)
    apply_lora(mini_model, LoraSection(targets=("self_attn.*", "mlp.experts.*"), rank=4))
    mini_model.update(tree_map(lambda p: p + 0.02, mini_model.trainable_parameters()))  # nonzero LoRA B
    examples = _examples([150, 60, 41])

    def grads_of(batch_arrays, segments=None):
        def loss(model):
            return loss_sum(model, *batch_arrays, chunk=32, checkpoint=checkpoint, segments=segments)
        return nn.value_and_grad(mini_model, loss)(mini_model)

    want_loss, want = 0.0, None
    for i in range(3):
        mb = micro_batch(examples, [i], 512, 1)
        value, grads = grads_of([mx.array(a) for a in (mb.inputs, mb.positions, mb.targets, mb.weights)])
        want_loss += value.item()
        want = grads if want is None else tree_map(mx.add, want, grads)
    packed = packed_micro_batch(examples, [0, 1, 2], 512, 1)
    assert packed.inputs.shape == (1, 250) and packed.trained == sum(e.mask[1:].sum() for e in examples)
    got_loss, got = grads_of([mx.array(a) for a in (packed.inputs, packed.positions, packed.targets,
                                                     packed.weights)], mx.array(packed.segments))
    np.testing.assert_allclose(got_loss.item(), want_loss, rtol=2e-6)
    # float32 rounding: the same row packed in another order differs from itself by up to 2e-5
    # of a tensor's largest gradient, the unpacked sum by up to 3e-5 (measured)
    want, got = dict(tree_flatten(want)), dict(tree_flatten(got))
    for name, g in want.items():
        np.testing.assert_allclose(np.array(got[name]), np.array(g), rtol=0, atol=1e-4 * np.abs(g).max())


def test_a_packed_run_makes_the_same_updates(make_recipe):
    """Two optimizer steps of 4 conversations (2 x 2), packed into 256-token rows or not."""
    from relief_mlx.train import trainer

    adapters = []
    for pack in ("false", "true"):
        recipe = make_recipe("train.iterations=2", "train.batch_size=2", "data.max_length=256",
                             f"train.pack={pack}", "train.max_grad_norm=0", name=f"pack-{pack}")
        result = trainer.train(recipe)
        adapters.append((mx.load(str(result.run_dir / "adapters.safetensors")), result.summary))
    (want, unpacked), (got, packed) = adapters
    assert packed["tokens"] == unpacked["tokens"] and packed["trained_tokens"] == unpacked["trained_tokens"]
    np.testing.assert_allclose(packed["train_loss_last"], unpacked["train_loss_last"], rtol=1e-5)
    for name, w in want.items():  # Adam turns float32 noise in a near-zero gradient into a visible step
        w, g = np.array(w), np.array(got[name])
        assert np.linalg.norm(g - w) <= 1e-3 * np.linalg.norm(w), name
