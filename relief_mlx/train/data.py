"""Training data for the loop: tokenized splits from `relief_mlx.data`, a resumable batch order,
and micro-batches laid out for the masked loss head.

Thin adapter over `relief_mlx.data.dataset` (reading, Harmony rendering, masks, length policy
and padding are all there). What it adds: the batch order of one epoch as a plain list of index
lists (so a checkpoint can store it and `--resume` can continue mid-epoch), and the trained
positions of a micro-batch gathered on the host (so the loss head never sees untrained ones).
The order is sorted-length batching (neighbours in length share a micro-batch, less padding;
then the micro-batches are shuffled), computed from (seed, epoch) alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..data.dataset import Example, load_dataset, pad_batch, tokenize
from ..data.harmony import RenderOptions
from ..errors import ReliefError
from ..recipe import DataSection


@dataclass(frozen=True)
class Splits:
    """Tokenized train and valid examples and what the length policy did to them."""

    train: list[Example]
    valid: list[Example]
    counts: dict[str, dict[str, int]]
    fingerprint: str  # sha256 of every token and mask: a resume must see the same data


def load_splits(data: DataSection, tokenizer, need_valid: bool) -> Splits:
    """Read `data.path`, render and mask with the recipe's options, apply the length policy."""
    dataset = load_dataset(data.path, skip_invalid=data.skip_invalid)
    if "train" not in dataset.splits:
        raise ReliefError(f"{data.path} has no train split; add train.jsonl (and valid.jsonl)")
    if need_valid and "valid" not in dataset.splits:
        raise ReliefError(
            f"{data.path} has no valid split; add valid.jsonl or set validation.every = -1 to train without validation"
        )
    options = RenderOptions.of(data)
    out, counts = {}, {}
    for split in ("train", "valid"):
        records = dataset.splits.get(split, [])
        tokenized = tokenize(records, data.max_length, options, data.mask, tokenizer)
        out[split], counts[split] = tokenized.examples, tokenized.counts()
    for split, fix in (("train", ""), ("valid", " or set validation.every = -1")):
        if not out[split] and (split == "train" or need_valid):
            raise ReliefError(f"{data.path}: no {split} example fits data.max_length = {data.max_length} "
                              f"({counts[split]['dropped']} dropped as too long); raise it{fix}")
    digest = hashlib.sha256()
    for e in out["train"] + out["valid"]:
        digest.update(e.tokens.tobytes() + np.packbits(e.mask).tobytes())
    return Splits(out["train"], out["valid"], counts, digest.hexdigest())


def epoch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches of one epoch as example indices: length-sorted neighbours, shuffled."""
    rng = np.random.default_rng([seed, epoch])
    lengths = np.asarray(lengths)
    perm = rng.permutation(len(lengths))  # varies ties between epochs
    order = perm[np.argsort(lengths[perm], kind="stable")]
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def eval_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Validation micro-batches, length-sorted and unshuffled (a fixed set every time)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class MicroBatch:
    """Model inputs and the trained positions, ready for `loss.loss_sum`."""

    inputs: np.ndarray  # (B, T-1) int32: tokens[:, :-1]
    positions: np.ndarray  # (K,) int32: flat index into (B*(T-1)) of each trained prediction
    targets: np.ndarray  # (K,) int32: the token each position must predict
    weights: np.ndarray  # (K,) float32: 1 for trained, 0 for the padding of K
    targets_full: np.ndarray  # (B, T-1) int32: tokens[:, 1:], for the plain loss
    mask_full: np.ndarray  # (B, T-1) float32: mask[:, 1:], for the plain loss
    tokens: int  # real (unpadded) tokens in the micro-batch
    trained: int  # trained tokens (the loss normalizer's share)


def micro_batch(examples: Sequence[Example], indices: Sequence[int], max_length: int,
                pad_multiple: int) -> MicroBatch:
    """Pad the examples at `indices` (`dataset.pad_batch`) and gather trained positions.

    K is rounded up to a multiple of 32 with zero-weight entries, so a compiled step sees few
    distinct shapes.
    """
    chosen = [examples[i] for i in indices]
    tokens, mask = pad_batch(chosen, pad_multiple)  # (B, T)
    if max(len(e.tokens) for e in chosen) > max_length:
        raise ValueError(f"an example is longer than max_length {max_length}: tokenize it first")  # a bug
    inputs, targets_full, trained = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]  # (B, T-1)
    rows, cols = np.nonzero(trained)
    positions = (rows * inputs.shape[1] + cols).astype(np.int32)
    k = len(positions)
    padded = -(-max(k, 1) // 32) * 32
    weights = np.zeros(padded, np.float32)
    weights[:k] = 1.0
    return MicroBatch(
        inputs=inputs,
        positions=np.pad(positions, (0, padded - k)),
        targets=np.pad(targets_full[rows, cols], (0, padded - k)).astype(np.int32),
        weights=weights,
        targets_full=targets_full,
        mask_full=trained.astype(np.float32),
        tokens=int(sum(len(e.tokens) for e in chosen)),
        trained=k,
    )
