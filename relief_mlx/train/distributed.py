"""Data parallelism over `mx.distributed`, as `mlx.launch` starts it (ring over TCP, MPI, NCCL).

Every rank holds the whole model and trains its share of each step's micro-batches; gradients
(sums over trained tokens) and the step's token counts are summed across ranks, so N ranks
compute exactly what one rank accumulating all the micro-batches computes. Only rank 0 writes.
Without `mlx.launch`, `mx.distributed.init()` is a group of one and everything here is a no-op.

One mechanism serves both collectives: the arrays of a tree are paired across ranks by their
sorted key paths (never by each rank's own tree order: a rank that rebuilt a tree from a file
holds its keys in another order) and concatenated into one `all_sum` per dtype. A broadcast is
that sum with zeros from every rank but 0. `nn.average_gradients` is not used: it pairs arrays
in tree order and divides by N, which is neither a sum nor exact for integer state.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten


def world() -> mx.distributed.Group:
    return mx.distributed.init()


def sum_tree(tree: Any, group: mx.distributed.Group) -> Any:
    """The element-wise sum over ranks of a tree that has the same keys and shapes on every rank."""
    if group.size() == 1:
        return tree
    flat = tree_flatten(tree)
    values = dict(flat)
    summed: dict[str, mx.array] = {}
    for dtype in sorted({v.dtype for v in values.values()}, key=str):
        keys = sorted(k for k, v in values.items() if v.dtype == dtype)
        total = mx.distributed.all_sum(mx.concatenate([values[k].reshape(-1) for k in keys]), group=group)
        parts = mx.split(total, list(itertools.accumulate(values[k].size for k in keys))[:-1])
        summed |= {k: p.reshape(values[k].shape) for k, p in zip(keys, parts, strict=True)}
    return tree_unflatten([(k, summed[k]) for k, _ in flat])


def broadcast_tree(tree: Any, group: mx.distributed.Group) -> Any:
    """Rank 0's values of a tree whose keys and shapes every rank holds (others contribute zeros)."""
    if group.size() == 1:
        return tree
    return sum_tree(tree if group.rank() == 0 else tree_map(mx.zeros_like, tree), group)


def broadcast_json(obj: Any, group: mx.distributed.Group) -> Any:
    """Rank 0's JSON-able object on every rank (checkpoint state on resume)."""
    if group.size() == 1:
        return obj
    data = json.dumps(obj).encode() if group.rank() == 0 else b""
    size = int(broadcast_tree(mx.array([len(data)], mx.int32), group).item())
    raw = mx.array(list(data) if data else [0] * size, mx.uint8)
    return json.loads(bytes(broadcast_tree(raw, group).tolist()).decode())
