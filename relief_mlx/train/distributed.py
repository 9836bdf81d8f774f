"""Data parallelism over `mx.distributed`, as `mlx.launch` starts it (ring over TCP, MPI, NCCL).

Every rank holds the whole model and trains its share of each step's micro-batches; gradients
(sums over trained tokens) and the step's token counts are summed across ranks, so N ranks
compute exactly what one rank accumulating all the micro-batches computes. Only rank 0 writes.
Without `mlx.launch`, `mx.distributed.init()` is a group of one and everything here is a no-op.
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
    """Sum a tree of same-dtype arrays over ranks in one all-reduce (LoRA gradients are small)."""
    if group.size() == 1:
        return tree
    flat = tree_flatten(tree)
    sizes = [v.size for _, v in flat]
    total = mx.distributed.all_sum(mx.concatenate([v.reshape(-1) for _, v in flat]), group=group)
    parts = mx.split(total, list(itertools.accumulate(sizes))[:-1])
    return tree_unflatten([(k, p.reshape(v.shape)) for (k, v), p in zip(flat, parts, strict=True)])


def broadcast_tree(tree: Any, group: mx.distributed.Group) -> Any:
    """Rank 0's values of a tree whose shapes every rank knows (others contribute zeros)."""
    if group.size() == 1:
        return tree
    rank = group.rank()
    return tree_map(lambda x: mx.distributed.all_sum(x if rank == 0 else mx.zeros_like(x), group=group), tree)


def broadcast_json(obj: Any, group: mx.distributed.Group) -> Any:
    """Rank 0's JSON-able object on every rank (checkpoint state on resume)."""
    if group.size() == 1:
        return obj
    data = json.dumps(obj).encode() if group.rank() == 0 else b""
    size = int(broadcast_tree(mx.array([len(data)], mx.int32), group).item())
    raw = mx.array(list(data.ljust(size, b" ")) if data else [0] * size, mx.uint8)
    return json.loads(bytes(broadcast_tree(raw, group).tolist()).decode())
