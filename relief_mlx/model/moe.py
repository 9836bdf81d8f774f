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

MXFP4 experts on the CPU take a second lever: MLX's quantized kernels run on one thread, so
`split_glu` gives each core's stream its share of a token's k experts (2 + 2 on two cores);
on the 2-core test machine the whole gpt-oss-20b decodes at 0.96 tokens/s with it, 1.51x
mlx-lm's 0.64, and prefills twice as fast (`benchmarks/realsize.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import gpt_oss
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear
from mlx_lm.tuner.lora import LoRASwitchLinear

from ..blas import usable_cpus

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


def _plan(indices: mx.array, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, counts): the (token, expert) pairs in expert order, and each expert's count."""
    chosen = np.array(indices.reshape(-1))  # (N*k,) on the host: the one sync
    return np.argsort(chosen, kind="stable"), np.bincount(chosen, minlength=num_experts)


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
    """a[e] as a view of a frozen array: MLX copies for an integer index (a 33 MB copy per
    expert matrix, which a gradient then keeps alive), not for a slice."""
    return a[e:e + 1].squeeze(0)


def _by_expert(a: mx.array, sizes: Sequence[int]) -> list[mx.array]:
    """A differentiated array cut along axis 0 into pieces of `sizes`: `mx.split`, whose gradient
    is one concatenation (a slice's gradient is a zero array of the whole input per piece: 32
    of them per projection)."""
    return mx.split(a, np.cumsum(sizes)[:-1].tolist()) if len(sizes) > 1 else [a]


def _projection(layer: nn.Module) -> Callable[[mx.array, int], mx.array]:
    """(rows x (n, in), expert e) -> (n, out): expert e of a (LoRA-wrapped) `SwitchLinear`."""
    if isinstance(layer, LoRASwitchLinear):  # as LoRASwitchLinear.__call__, for one expert
        base, ones = _projection(layer.linear), [1] * layer.num_experts
        a, b = _by_expert(layer.lora_a, ones), _by_expert(layer.lora_b, ones)  # (1, r, in), (1, out, r)

        def lora(x: mx.array, e: int) -> mx.array:
            z = (layer.dropout(x) @ a[e].squeeze(0).T) @ b[e].squeeze(0).T  # (n, r) -> (n, out)
            return base(x, e) + (layer.scale * z).astype(x.dtype)

        return lora
    weight, bias = layer["weight"], layer.get("bias")
    return lambda x, e: x @ _expert(weight, e).T + (_expert(bias, e) if bias is not None else 0)


def grouped_glu(glu: SwitchGLU, x: mx.array, indices: mx.array) -> mx.array:
    """`glu(x, indices)` with one GEMM per expert: x (..., D), indices (..., k) -> (..., k, D)."""
    *lead, k = indices.shape
    order, counts = _plan(indices, glu.gate_proj.num_experts)  # pair positions in expert order
    rows = x.reshape(-1, x.shape[-1])[mx.array(order // k)]  # (N*k, D): each pair's token
    up, gate, down = (_projection(p) for p in (glu.up_proj, glu.gate_proj, glu.down_proj))
    outputs = []
    for e, xe in enumerate(_by_expert(rows, counts)):  # xe (n_e, D)
        if xe.shape[0]:
            outputs.append(down(glu.activation(up(xe, e), gate(xe, e)), e))  # (n_e, I) -> (n_e, D)
    y = mx.concatenate(outputs)[mx.array(np.argsort(order))]  # (N*k, D) back in pair order
    return y.reshape(*lead, k, y.shape[-1])


def core_streams(glu: SwitchGLU) -> list[mx.Stream]:
    """The extra CPU streams that share `glu`'s work with the caller's, one per core beyond the
    first, or [] to keep one stream.

    MLX's CPU kernels other than BLAS (the quantized `gather_qmm` of MXFP4 experts among them)
    run on the one thread of their stream, so a token's k experts leave every core but one idle.
    Dense experts go through BLAS, which threads by itself (float32), or are grouped
    (`groups_by_expert`)."""
    if _GATHER_ONLY or mx.default_device() != mx.cpu:
        return []
    base = glu.gate_proj.linear if isinstance(glu.gate_proj, LoRASwitchLinear) else glu.gate_proj
    if type(base) is SwitchLinear:
        return []
    return _streams()


_STREAMS: list[mx.Stream] = []


def _streams() -> list[mx.Stream]:
    """One CPU stream per usable core beyond the first (created once, kept for the process)."""
    if not _STREAMS:
        _STREAMS.extend(mx.new_stream(mx.cpu) for _ in range(usable_cpus() - 1))
    return _STREAMS


def split_glu(glu: SwitchGLU, x: mx.array, indices: mx.array, streams: Sequence[mx.Stream]) -> mx.array:
    """`glu(x, indices)` with the k chosen experts split across the caller's stream and `streams`:
    each part is a whole SwitchGLU over its experts, so one fork and one join per block, and every
    row is computed by the same kernel as unsplit (equal outputs, tested)."""
    k = indices.shape[-1]
    bounds = np.linspace(0, k, min(k, len(streams) + 1) + 1).round().astype(int)
    parts = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        with mx.stream(streams[i - 1]) if i else contextlib.nullcontext():
            parts.append(glu(x, indices[..., a:b]))
    return mx.concatenate(parts, axis=-2)


class MLPBlock(gpt_oss.MLPBlock):
    """mlx-lm's gpt-oss MoE block (router, top-k, softmax, SwitchGLU experts, weighted sum),
    with the experts grouped by expert where `groups_by_expert` says so, and split across the
    CPU's cores where `core_streams` finds more than one."""

    def __call__(self, x: mx.array) -> mx.array:
        if self.sharding_group is not None:
            return super().__call__(x)
        g = self.router(x)
        experts, indices = gpt_oss.mlx_topk(g, k=self.num_experts_per_tok, axis=-1)
        expert_weights = mx.softmax(experts, axis=-1, precise=True)
        indices, pairs = mx.stop_gradient(indices), indices.size
        if groups_by_expert(self.experts, pairs):
            y = grouped_glu(self.experts, x, indices)  # (..., k, D)
        elif streams := core_streams(self.experts):
            y = split_glu(self.experts, x, indices, streams)
        else:
            y = self.experts(x, indices)
        return (y * mx.expand_dims(expert_weights, axis=-1)).sum(axis=-2)
