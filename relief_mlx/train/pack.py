"""Packing (`train.pack = true`): a step's conversations laid end to end in as few rows of at most
`data.max_length` tokens as they fit, each row one micro-batch.

An optimizer step takes the same examples packed or not (its grad_accumulation micro-batches of
batch_size); packing only regroups them (first fit, longest first), so the step's update is the
same: losses are sums over trained tokens and the trainer divides by the step's count once. A
position attends only to earlier positions of its own conversation, and within the sliding
window on sliding layers (`masks`: block-diagonal causal). Positions need no restart: RoPE
makes an attention score depend only on the distance between the two tokens and no score
crosses a conversation, so a conversation at offset s of a row computes what it computes alone
(the loss and LoRA gradients equal unpacked training's to float32 rounding: tested).

A row is the conversations' tokens concatenated. The last token of one conversation then also
predicts the first of the next: that position is never trained (its target is masked out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..data.dataset import Example
from .data import MicroBatch, micro_batch


def pack_rows(groups: Sequence[Sequence[int]], lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """The example indices of `groups` (one step's micro-batches) in rows of at most
    `max_length` tokens: first fit, longest first (ties in the given order)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted((i for g in groups for i in g), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            rows.append([i])
            room.append(max_length - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


@dataclass(frozen=True)
class PackedBatch(MicroBatch):
    """A `MicroBatch` of one packed row, and which conversation each input position belongs to."""

    segments: np.ndarray  # (1, T-1) int32: conversation of each input position, -1 on padding


def packed_micro_batch(examples: Sequence[Example], indices: Sequence[int], max_length: int,
                       pad_multiple: int) -> PackedBatch:
    """One row holding the examples at `indices`, in that order (see the module doc)."""
    chosen = [examples[i] for i in indices]
    tokens = np.concatenate([e.tokens for e in chosen])
    mask = np.concatenate([e.mask for e in chosen])
    starts = np.cumsum([0] + [len(e.tokens) for e in chosen[:-1]])
    mask[starts] = False  # a conversation's first token is never a target of the previous one
    segment_of = np.repeat(np.arange(len(chosen), dtype=np.int32), [len(e.tokens) for e in chosen])
    row = Example(tokens.astype(np.int32), mask, None, len(tokens), "packed")
    mb = micro_batch([row], [0], max_length, pad_multiple)
    segments = np.full(mb.inputs.shape, -1, np.int32)  # (1, T-1)
    segments[0, : len(tokens) - 1] = segment_of[:-1]
    return PackedBatch(**vars(mb), segments=segments)


def masks(segments: mx.array, window: int) -> tuple[mx.array, mx.array]:
    """Boolean attention masks (B, 1, T, T) of packed rows (B, T): (full layers, sliding layers).

    Query i sees key j when both are in one conversation and j <= i; on sliding layers also
    i - j < window (mlx-lm's `create_causal_mask` rule).
    """
    t = segments.shape[-1]
    i, j = mx.arange(t)[:, None], mx.arange(t)[None]  # (T, 1), (1, T)
    full = (segments[:, :, None] == segments[:, None, :]) & (j <= i)  # (B, T, T)
    sliding = full & (i < j + window)
    return full[:, None], sliding[:, None]
