"""The masked, chunked loss head equals plain cross-entropy in value and gradient."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from relief_mlx.train.loss import (
    chunked_cross_entropy,
    cross_entropy_value,
    hidden_states,
    loss_sum,
    plain_loss_sum,
)

V, D = 5003, 64  # an odd vocabulary: chunks never divide anything evenly


@pytest.fixture
def head():
    mx.random.seed(0)
    layer = nn.Linear(D, V, bias=False)
    mx.eval(layer.parameters())
    return layer


def plain(head, h, targets, weights):
    return (nn.losses.cross_entropy(head(h), targets) * weights).sum()


@pytest.mark.parametrize("chunk", [1, 7, 32, 1000])
def test_chunked_equals_plain_in_value_and_gradient(head, chunk):
    k = 45
    h = mx.random.normal((k, D)) * 3
    targets = mx.random.randint(0, V, (k,))
    weights = (mx.random.uniform(shape=(k,)) > 0.3).astype(mx.float32)  # zero weight = padding
    value, grad = mx.value_and_grad(lambda h: plain(head, h, targets, weights))(h)
    c_value, c_grad = mx.value_and_grad(lambda h: chunked_cross_entropy(head, h, targets, weights, chunk))(h)
    assert c_value.item() == pytest.approx(value.item(), rel=1e-6)
    np.testing.assert_allclose(np.array(c_grad), np.array(grad), atol=2e-6)
    assert cross_entropy_value(head, h, targets, weights, chunk).item() == pytest.approx(value.item(), rel=1e-6)


def test_quantized_head_takes_the_checkpointed_path_and_agrees(head):
    """A quantized lm_head (mlx-community checkpoints) cannot use the fused gradient."""
    qhead = nn.QuantizedLinear.from_linear(head, group_size=64, bits=8)
    h = mx.random.normal((20, D))
    targets = mx.random.randint(0, V, (20,))
    weights = mx.ones((20,))
    value, grad = mx.value_and_grad(lambda h: plain(qhead, h, targets, weights))(h)
    c_value, c_grad = mx.value_and_grad(lambda h: chunked_cross_entropy(qhead, h, targets, weights, 8))(h)
    assert c_value.item() == pytest.approx(value.item(), rel=1e-5)
    np.testing.assert_allclose(np.array(c_grad), np.array(grad), atol=1e-5)


@pytest.fixture(scope="module")
def lora_mini(mini_mlx_f32):
    from train_helpers import build

    from relief_mlx.recipe import LoraSection
    from relief_mlx.train.targets import apply_lora

    model = build(mini_mlx_f32)
    mx.random.seed(1)
    apply_lora(model, LoraSection(targets=("self_attn.q_proj", "self_attn.v_proj"), rank=4))
    # non-zero B so that gradients reach both LoRA matrices
    for layer in model.layers:
        layer.self_attn.q_proj.lora_b = mx.random.normal(layer.self_attn.q_proj.lora_b.shape) * 0.1
    mx.eval(model.parameters())
    return model


def test_hidden_states_match_the_model_with_and_without_checkpointing(lora_mini):
    x = mx.array(np.random.default_rng(0).integers(0, 200_000, (2, 150)))  # > sliding window 128
    reference = lora_mini.model(x)
    np.testing.assert_array_equal(np.array(hidden_states(lora_mini, x)), np.array(reference))
    np.testing.assert_allclose(np.array(hidden_states(lora_mini, x, checkpoint=True)), np.array(reference), atol=1e-6)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_masked_model_loss_and_lora_gradients_equal_the_plain_loss(lora_mini, checkpoint):
    rng = np.random.default_rng(1)
    inputs = rng.integers(0, 200_000, (2, 40)).astype(np.int32)  # (B, T)
    targets_full = rng.integers(0, 200_000, (2, 40)).astype(np.int32)
    mask = rng.random((2, 40)) > 0.5
    rows, cols = np.nonzero(mask)
    positions = mx.array((rows * 40 + cols).astype(np.int32))
    targets = mx.array(targets_full[rows, cols])
    weights = mx.ones((len(rows),))

    plain_fn = nn.value_and_grad(lora_mini, lambda m: plain_loss_sum(
        m, mx.array(inputs), mx.array(targets_full), mx.array(mask.astype(np.float32)), checkpoint))
    masked_fn = nn.value_and_grad(lora_mini, lambda m: loss_sum(
        m, mx.array(inputs), positions, targets, weights, 16, checkpoint))
    value, grads = plain_fn(lora_mini)
    m_value, m_grads = masked_fn(lora_mini)
    assert m_value.item() == pytest.approx(value.item(), rel=1e-5)
    flat, m_flat = dict(_flatten(grads)), dict(_flatten(m_grads))
    assert set(flat) == set(m_flat) and any(np.abs(np.array(v)).max() > 0 for v in flat.values())
    for name, g in flat.items():  # float32 sums over 201,088 logits in another order: relative 1e-5
        g = np.array(g)
        np.testing.assert_allclose(np.array(m_flat[name]), g, rtol=1e-4, atol=1e-5 * np.abs(g).max(), err_msg=name)


def _flatten(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def test_chunked_head_peak_memory_stays_flat_while_plain_grows(head):
    """Regression: without mx.depends ordering every chunk's logits stayed alive at once."""
    big = nn.Linear(D, 100_000, bias=False)
    mx.eval(big.parameters())

    def peak(fn, k):
        h = mx.random.normal((k, D))
        targets, weights = mx.random.randint(0, 100_000, (k,)), mx.ones((k,))
        mx.eval(h, targets, weights)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(mx.value_and_grad(lambda h: fn(big, h, targets, weights))(h))
        return mx.get_peak_memory() - base

    chunked = lambda head, h, t, w: chunked_cross_entropy(head, h, t, w, 32)  # noqa: E731
    one_chunk = 32 * 100_000 * 4
    # A few (chunk, V) arrays at once (6.0 measured: one chunk's logits and exp, while the next
    # starts), whatever the number of chunks: 4, 16 or 32 of them.
    peaks = [peak(chunked, k) for k in (128, 512, 1024)]
    assert max(peaks) < 7 * one_chunk
    assert max(peaks) < 1.1 * min(peaks)
    assert peak(plain, 512) > 16 * one_chunk  # the plain head holds all 512 rows of logits


def _lora_everywhere(path, dropout: float = 0.0, layers: int = -1):
    """The mini model with LoRA on attention and on every expert (the grouped CPU path), B nonzero
    (on the last `layers` layers; -1: all)."""
    from mlx.utils import tree_map
    from train_helpers import build

    from relief_mlx.recipe import LoraSection
    from relief_mlx.train.targets import apply_lora

    model = build(path)
    mx.random.seed(2)
    apply_lora(model, LoraSection(targets=("self_attn.*", "mlp.experts.*"), rank=4, dropout=dropout, layers=layers))
    model.update(tree_map(lambda p: p + 0.03 * mx.random.normal(p.shape), model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("packed, layers", [(False, -1), (True, -1), (False, 2)])
def test_layerwise_checkpointing_equals_whole_model_gradients(mini_mlx_f32, packed, layers):
    """The layer-by-layer checkpointed step (loss.layerwise_value_and_grad) against
    nn.value_and_grad of the whole model, LoRA on attention and experts (the grouped CPU path),
    on every layer or on the last two only (the first layers then have nothing to train)."""
    from mlx.utils import tree_flatten

    from relief_mlx.train.loss import checkpointed_loss_and_grad

    model = _lora_everywhere(mini_mlx_f32, layers=layers)
    rng = np.random.default_rng(3)
    inputs = mx.array(rng.integers(0, 199_998, (1, 150)), dtype=mx.int32)
    positions = mx.array(np.sort(rng.choice(150, 64, replace=False)), dtype=mx.int32)
    targets = mx.array(rng.integers(0, 199_998, 64), dtype=mx.int32)
    weights = mx.ones(64)
    segments = mx.array((np.arange(150) >= 90)[None].astype(np.int32)) if packed else None
    want_loss, want = nn.value_and_grad(
        model, lambda m: loss_sum(m, inputs, positions, targets, weights, 32, False, segments))(model)
    got_loss, got = checkpointed_loss_and_grad(model, inputs, positions, targets, weights, 32, segments)
    np.testing.assert_allclose(got_loss.item(), want_loss.item(), rtol=1e-6)
    want, got = dict(tree_flatten(want)), dict(tree_flatten(got))
    assert want.keys() == got.keys() and any(".experts." in k for k in want)
    for name, g in want.items():
        np.testing.assert_allclose(np.array(got[name]), np.array(g), rtol=0, atol=1e-5 * np.abs(g).max(), err_msg=name)


def test_layerwise_dropout_masks_agree_between_forward_and_recomputation(mini_mlx_f32):
    """With LoRA dropout, the recomputed layers must draw the forward's masks: the gradient then
    matches a finite difference of the (identically seeded) loss."""
    from relief_mlx.train.loss import checkpointed_loss_and_grad

    model = _lora_everywhere(mini_mlx_f32, dropout=0.3)
    model.train()
    rng = np.random.default_rng(4)
    inputs = mx.array(rng.integers(0, 199_998, (1, 40)), dtype=mx.int32)
    positions, targets, weights = mx.arange(40), mx.array(rng.integers(0, 199_998, 40), dtype=mx.int32), mx.ones(40)

    def loss_and_grad():
        mx.random.seed(11)
        return checkpointed_loss_and_grad(model, inputs, positions, targets, weights, 16)

    _, grads = loss_and_grad()
    name = "model.layers.1.self_attn.q_proj.lora_b"
    module = model.model.layers[1].self_attn.q_proj
    base = module.lora_b
    eps = 1e-3  # larger steps can flip a token's top-4 experts: the loss jumps
    losses = []
    for sign in (1, -1):
        module.lora_b = base + sign * eps * mx.array(np.eye(*base.shape, dtype=np.float32))
        losses.append(loss_and_grad()[0].item())
    module.lora_b = base
    numeric = (losses[0] - losses[1]) / (2 * eps)
    analytic = float(np.trace(np.array(grads["model"]["layers"][1]["self_attn"]["q_proj"]["lora_b"])))  # along eye
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2, err_msg=name)


def test_chunk_by_chunk_head_holds_one_chunk(head):
    """Regression: inside one gradient transform every chunk's logits stayed alive until the end
    (12.3 bytes a logit for one chunk, 24.4 for two, measured at the real widths)."""
    from relief_mlx.train.loss import chunked_value_and_grad

    big = nn.Linear(D, 100_000, bias=False)
    mx.eval(big.parameters())
    h = mx.random.normal((512, D))
    targets, weights = mx.random.randint(0, 100_000, (512,)), mx.ones((512,))
    mx.eval(h, targets, weights)

    def peak(k):
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        loss, grad = chunked_value_and_grad(big, h[:k], targets[:k], weights[:k], 32)
        mx.eval(loss, grad)
        return mx.get_peak_memory() - base, loss, grad

    (one, _, _), (sixteen, loss, grad) = peak(32), peak(512)
    assert sixteen < 1.5 * one  # 16 chunks cost what one does
    want_loss, want_grad = mx.value_and_grad(lambda h: plain(big, h, targets, weights))(h)
    np.testing.assert_allclose(loss.item(), want_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(np.array(grad), np.array(want_grad), rtol=1e-4, atol=1e-6)
