"""The training loss: a forward pass to hidden states, then a memory-lean cross-entropy head.

gpt-oss has 201,088 tokens: fp32 logits of one 512-token sequence take ~400 MB, their gradient
as much again, and on the `mini` model the lm_head matmul is most of the compute. So the head
runs only at trained positions (gathered on the host, `data.micro_batch`), `chunk` positions at
a time, each chunk checkpointed: its (chunk, V) logits exist only while that chunk's loss or
gradient is computed. The value and gradient equal plain cross-entropy (tests check both).

Losses are sums over trained tokens, not means: the trainer divides the gradient of the whole
accumulated batch by its trained-token count once (torchtune's normalization).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask

from .pack import masks


def _checkpointed(layer: nn.Module, x: mx.array, mask) -> mx.array:
    """`layer(x, mask)` with activations recomputed in the backward pass (as mlx-lm's
    `grad_checkpoint`, but for this call only, not for every instance of the class)."""

    def run(params, x):
        layer.update(params)
        return layer(x, mask)

    return mx.checkpoint(run)(layer.trainable_parameters(), x)


def _masks(x: mx.array, inner: nn.Module, segments: mx.array | None) -> tuple:
    """(full-attention mask, sliding-window mask): the model's own, or those of packed rows."""
    if segments is not None:
        return masks(segments, inner.window_size)
    return create_attention_mask(x, None), create_attention_mask(x, None, window_size=inner.window_size)


def hidden_states(model: nn.Module, inputs: mx.array, checkpoint: bool = False,
                  segments: mx.array | None = None) -> mx.array:
    """Final-norm hidden states of mlx-lm's gpt-oss (`model.model(inputs)`), (B, T) -> (B, T, D).

    Written out so each layer can be checkpointed; the masks are the model's own, or those of
    packed rows when `segments` (B, T) says which conversation each position belongs to
    (`pack.masks`). Right padding needs no padding mask: a causal mask never lets a real token
    see a later pad.
    """
    inner = model.model
    x = inner.embed_tokens(inputs)
    full, sliding = _masks(x, inner, segments)
    for layer, kind in zip(inner.layers, inner.layer_types, strict=True):
        mask = full if kind == "full_attention" else sliding
        x = _checkpointed(layer, x, mask) if checkpoint else layer(x, mask)
    return inner.norm(x)


def _chunk_loss(head: nn.Module, h: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
    logits = head(h).astype(mx.float32)  # (C, V)
    picked = mx.take_along_axis(logits, mx.stop_gradient(targets)[:, None], axis=-1)[:, 0]  # (C,)
    return ((mx.logsumexp(logits, axis=-1) - picked) * weights).sum()


def _fused_chunk(weight: mx.array):
    """Loss of one chunk and its gradient with respect to h, computed together in the forward.

    The loss is a sum, so its gradient is known before the backward pass: d/dh =
    ((softmax - onehot) * w) @ W. Keeping only that (C, D) gradient means one pass of exp over
    the (C, V) logits (the costly part on CPUs) instead of three for a checkpointed chunk
    (forward, recompute, softmax in the backward), and no logits live past their chunk.
    """

    @mx.custom_function
    def fused(h, targets, weights):
        logits = h @ weight.T  # (C, V)
        if logits.dtype != mx.float32:
            logits = logits.astype(mx.float32)
        top = logits.max(axis=-1, keepdims=True)  # (C, 1)
        e = mx.exp(logits - top)  # (C, V): the one pass of exp
        total = e.sum(axis=-1, keepdims=True)  # (C, 1)
        lse = (top + mx.log(total))[:, 0]  # (C,)
        picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]  # (C,)
        loss = ((lse - picked) * weights).sum()
        # softmax @ W with the row scale applied after the matmul, on (C, D) instead of (C, V)
        grad_h = (e.astype(weight.dtype) @ weight) * (weights[:, None] / total) - weights[:, None] * weight[targets]
        return loss, grad_h.astype(h.dtype)  # (), (C, D)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        h, targets, weights = primals
        return cotangents[0] * outputs[1], mx.zeros_like(targets), mx.zeros_like(weights)

    return fused


def chunked_cross_entropy(head: nn.Module, h: mx.array, targets: mx.array, weights: mx.array,
                          chunk: int) -> mx.array:
    """Sum over positions of weight * cross-entropy(head(h), target), `chunk` rows at a time.

    h (K, D), targets (K,), weights (K,). Peak extra memory is a few (chunk, V) fp32 arrays.
    A dense lm_head (what `relief convert` writes) takes the fused path; a quantized one is
    checkpointed per chunk instead.
    """
    targets = mx.stop_gradient(targets)
    fused = _fused_chunk(head.weight) if isinstance(head, nn.Linear) and "bias" not in head else None
    slow = mx.checkpoint(lambda h, t, w: _chunk_loss(head, h, t, w))
    total, previous = mx.array(0.0, mx.float32), []
    for start in range(0, h.shape[0], chunk):
        end = start + chunk
        # Without this ordering MLX may run every chunk's forward side by side and keep all
        # their logits alive (824 MB instead of 412 MB for 512 positions in chunks of 64).
        h_chunk = mx.depends(h[start:end], previous) if previous else h[start:end]
        if fused is not None:
            loss, grad = fused(h_chunk, targets[start:end], weights[start:end])
            previous = [loss, grad]
        else:
            loss = slow(h_chunk, targets[start:end], weights[start:end])
            previous = [loss]
        total = total + loss
    return total


def cross_entropy_value(head: nn.Module, h: mx.array, targets: mx.array, weights: mx.array,
                        chunk: int) -> mx.array:
    """`chunked_cross_entropy` without the gradient work, for validation."""
    total = mx.array(0.0, mx.float32)
    for start in range(0, h.shape[0], chunk):
        end = start + chunk
        total = total + _chunk_loss(head, h[start:end], targets[start:end], weights[start:end])
    return total


def loss_sum(model: nn.Module, inputs: mx.array, positions: mx.array, targets: mx.array,
             weights: mx.array, chunk: int, checkpoint: bool, segments: mx.array | None = None) -> mx.array:
    """Summed cross-entropy of the trained positions of one micro-batch (see `data.MicroBatch`;
    `segments` for a packed row, see `pack.PackedBatch`)."""
    h = hidden_states(model, inputs, checkpoint, segments)  # (B, T, D)
    h = h.reshape(-1, h.shape[-1])[positions]  # (K, D)
    return chunked_cross_entropy(model.lm_head, h, targets, weights, chunk)


def plain_loss_sum(model: nn.Module, inputs: mx.array, targets_full: mx.array, mask_full: mx.array,
                   checkpoint: bool, segments: mx.array | None = None) -> mx.array:
    """The same sum with every logit materialized, as mlx-lm computes it (`train.loss_chunk = 0`)."""
    logits = model.lm_head(hidden_states(model, inputs, checkpoint, segments))  # (B, T, V)
    return (nn.losses.cross_entropy(logits.astype(mx.float32), targets_full) * mask_full).sum()


def layerwise_value_and_grad(model: nn.Module, inputs: mx.array,
                             head: Callable[[mx.array], tuple[mx.array, mx.array]],
                             segments: mx.array | None = None) -> tuple[mx.array, dict]:
    """(loss, gradient of the model's trainable parameters), with every layer recomputed in the
    backward pass: gradient checkpointing written out, one layer at a time. `head` takes the
    final-norm hidden states (B, T, D) and returns (loss, its gradient with respect to them).

    The forward runs outside any gradient transform and keeps only each layer's input; the
    backward is one gradient transform per layer, last to first, each evaluated before the
    next. The values equal `nn.value_and_grad` of the whole model (tested). Why not one
    transform with `mx.checkpoint`: arrays computed inside a transform keep their buffers until
    it is evaluated as a whole, so a host read in the middle (the CPU's grouped MoE path reads
    its routing) kept every earlier layer's activations (2 real-width layers at 512 tokens:
    2.7 GB instead of 0.6), and the loss head's chunks all stayed alive. Each layer draws from a
    seed of its own, in the forward and again in its recomputation, so LoRA dropout masks
    agree. LoRA targets are layer modules: every trainable parameter must live in a layer.
    """
    inner = model.model
    params = model.trainable_parameters()
    if any(not name.startswith("model.layers.") for name, _ in tree_flatten(params)):
        raise ValueError("layerwise_value_and_grad needs every trainable parameter inside model.model.layers")
    x = inner.embed_tokens(inputs)
    full, sliding = _masks(x, inner, segments)
    layer_masks = [full if kind == "full_attention" else sliding for kind in inner.layer_types]
    seed = mx.random.randint(0, 2**31 - 1, ()).item()  # dropout: layer l draws from seed + l
    saved = []
    for i, (layer, mask) in enumerate(zip(inner.layers, layer_masks, strict=True)):
        saved.append(x)
        mx.random.seed(seed + i)
        x = layer(x, mask)
        mx.eval(x)
    hidden = inner.norm(x)
    mx.eval(hidden)
    loss, d_hidden = head(hidden)  # (), (B, T, D)
    _, (cotangent,) = mx.vjp(inner.norm, [x], [d_hidden])
    mx.eval(loss, cotangent)
    grads = [None] * len(inner.layers)
    for i in reversed(range(len(inner.layers))):
        layer, mask, x = inner.layers[i], layer_masks[i], saved[i]
        weights = layer.trainable_parameters()

        def pullback(weights, x, layer=layer, mask=mask, cotangent=cotangent):  # its gradient is the vjp
            layer.update(weights)
            return (layer(x, mask) * cotangent).sum()

        mx.random.seed(seed + i)
        trained = bool(tree_flatten(weights))  # LoRA may leave a layer out (lora.layers)
        if trained and i:
            grads[i], cotangent = mx.grad(pullback, argnums=(0, 1))(weights, x)
        elif trained:  # the embedding is frozen: no gradient into the first layer's input
            grads[i] = mx.grad(pullback)(weights, x)
        else:
            grads[i] = weights
            if not i:
                break  # nothing below needs a gradient
            cotangent = mx.grad(pullback, argnums=1)(weights, x)
        layer.update(weights)
        mx.eval(grads[i], cotangent)
    params["model"]["layers"] = grads
    return loss, params


def chunked_value_and_grad(head: nn.Module, h: mx.array, targets: mx.array, weights: mx.array,
                           chunk: int) -> tuple[mx.array, mx.array]:
    """`chunked_cross_entropy` and its gradient with respect to h (K, D), each chunk evaluated
    before the next (outside a whole-model transform only one chunk's logits are ever alive)."""
    total, grads = mx.array(0.0, mx.float32), []
    one = mx.value_and_grad(lambda h, t, w: chunked_cross_entropy(head, h, t, w, chunk))
    for start in range(0, h.shape[0], chunk):
        loss, grad = one(h[start:start + chunk], targets[start:start + chunk], weights[start:start + chunk])
        mx.eval(loss, grad)
        total, grads = total + loss, grads + [grad]
    return total, mx.concatenate(grads)


def checkpointed_loss_and_grad(model: nn.Module, inputs: mx.array, positions: mx.array, targets: mx.array,
                               weights: mx.array, chunk: int, segments: mx.array | None = None):
    """`loss_sum` with gradient checkpointing and its gradient, layer by layer
    (`layerwise_value_and_grad`): (summed loss, gradient tree of the trainable parameters)."""

    def head(hidden):  # (B, T, D) -> loss, d loss / d hidden
        rows = hidden.reshape(-1, hidden.shape[-1])  # (B*T, D)
        loss, grad = chunked_value_and_grad(model.lm_head, rows[positions], targets, weights, chunk)  # (K, D)
        return loss, mx.zeros_like(rows).at[positions].add(grad).reshape(hidden.shape)

    return layerwise_value_and_grad(model, inputs, head, segments)
