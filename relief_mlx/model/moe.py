"""gpt-oss's mixture-of-experts block with the experts computed one expert at a time on the CPU.

mlx-lm's `SwitchGLU` multiplies every (token, chosen expert) pair through `gather_mm`. MLX's
CPU `gather_mm` (0.32) calls `cblas_sgemm` once per pair with one row, so a 512-token prefill
or training step reads each 33 MB float32 expert matrix from memory ~64 times per projection:
one layer's experts took 124 s where the same FLOPs as dense GEMMs take 8.5 s on the
2-core test machine (`benchmarks/profile.py`). It also runs only in float32.

Here, on the CPU, the (token, expert) pairs are sorted by expert once on the host (the routing
is evaluated: one sync per layer), each expert runs one GEMM over all of its tokens, and the
rows go back to token order. The arithmetic per row is the same as `gather_mm`'s (the outputs
are equal, tested), every step is differentiable (LoRA on the experts included), and bf16 dense
experts work too. Decode (fewer pairs than `GROUP_MIN_PAIRS`), MXFP4 experts (MLX's CPU
quantized matmul costs the same either way) and GPUs keep mlx-lm's `gather_mm` path, as does
anything inside `mx.compile` (which cannot sync with the host): see `gather_only`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import gpt_oss
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear
from mlx_lm.tuner.lora import LoRASwitchLinear

GROUP_MIN_PAIRS = 64
"""(token, expert) pairs from which the CPU groups by expert (mlx-lm sorts from 64 as well)."""

_GATHER_ONLY = False


@contextlib.contextmanager
def gather_only() -> Iterator[None]:
    """Run every MoE block through mlx-lm's `gather_mm` path while inside (for `mx.compile`)."""
    global _GATHER_ONLY
    previous, _GATHER_ONLY = _GATHER_ONLY, True
    try:
        yield
    finally:
        _GATHER_ONLY = previous


def groups_by_expert(glu: SwitchGLU, pairs: int) -> bool:
    """Whether `glu` computes `pairs` (token, expert) products expert by expert here."""
    if _GATHER_ONLY or mx.default_device() != mx.cpu:
        return False
    projections = (glu.gate_proj, glu.up_proj, glu.down_proj)
    bases = [p.linear if isinstance(p, LoRASwitchLinear) else p for p in projections]
    if not all(type(b) is SwitchLinear for b in bases):  # MXFP4 / quantized experts
        return False
    # MLX's CPU gather_mm runs only in float32: other dtypes always group
    return pairs >= GROUP_MIN_PAIRS or bases[0].weight.dtype != mx.float32


def _expert(a: mx.array, e: int) -> mx.array:
    """a[e] as a view: MLX copies for an integer index (a 33 MB copy per expert matrix, which a
    gradient then keeps alive), not for a slice."""
    return a[e:e + 1].squeeze(0)


def _project(layer: nn.Module, x: mx.array, e: int) -> mx.array:
    """Expert `e` of a (LoRA-wrapped) `SwitchLinear` applied to rows x (n, in) -> (n, out)."""
    if isinstance(layer, LoRASwitchLinear):  # as LoRASwitchLinear.__call__, for one expert
        z = (layer.dropout(x) @ _expert(layer.lora_a, e).T) @ _expert(layer.lora_b, e).T  # (n, r) -> (n, out)
        return _project(layer.linear, x, e) + (layer.scale * z).astype(x.dtype)
    y = x @ _expert(layer["weight"], e).T
    return y + _expert(layer["bias"], e) if "bias" in layer else y


def grouped_glu(glu: SwitchGLU, x: mx.array, indices: mx.array) -> mx.array:
    """`glu(x, indices)` with one GEMM per expert: x (..., D), indices (..., k) -> (..., k, D)."""
    *lead, k = indices.shape
    chosen = np.array(indices.reshape(-1))  # (N*k,) on the host: the one sync
    order = np.argsort(chosen, kind="stable")  # pair positions in expert order
    counts = np.bincount(chosen, minlength=glu.gate_proj.num_experts)
    rows = x.reshape(-1, x.shape[-1])[mx.array(order // k)]  # (N*k, D): each pair's token
    outputs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            xe = rows[start:start + n]  # (n, D)
            h = glu.activation(_project(glu.up_proj, xe, e), _project(glu.gate_proj, xe, e))  # (n, I)
            outputs.append(_project(glu.down_proj, h, e))  # (n, D)
            start += n
    y = mx.concatenate(outputs)[mx.array(np.argsort(order))]  # (N*k, D) back in pair order
    return y.reshape(*lead, k, y.shape[-1])


class MLPBlock(gpt_oss.MLPBlock):
    """mlx-lm's gpt-oss MoE block (router, top-k, softmax, SwitchGLU experts, weighted sum),
    with the experts grouped by expert where `groups_by_expert` says so."""

    def __call__(self, x: mx.array) -> mx.array:
        if self.sharding_group is not None or not groups_by_expert(self.experts, x.size // x.shape[-1]
                                                                   * self.num_experts_per_tok):
            return super().__call__(x)
        g = self.router(x)
        experts, indices = gpt_oss.mlx_topk(g, k=self.num_experts_per_tok, axis=-1)
        expert_weights = mx.softmax(experts, axis=-1, precise=True)
        y = grouped_glu(self.experts, x, mx.stop_gradient(indices))  # (..., k, D)
        return (y * mx.expand_dims(expert_weights, axis=-1)).sum(axis=-2)
