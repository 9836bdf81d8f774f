"""Routing telemetry: which experts each layer chose, for the prompt and the answer apart.

Opt-in and off the normal path: `RoutingProbe(model)` swaps each layer's `mlp` for a
`_ProbedMLP` that computes the routing exactly as mlx-lm's `MLPBlock` does (router -> top-k
logits -> softmax over the k -> weighted sum of the experts' outputs) and keeps the chosen
indices and weights; `probe.close()` puts the original blocks back. Without a probe the model
runs untouched. Records stay lazy until `collect()`, which reads every forward pass but the
latest, so the decode loop keeps computing token n+1 while token n's routing is counted. (Prefill
never computes the last layer's outputs for the prompt; a probe makes its router run for them.)

With `check=True`, `collect()` also asserts the routing invariants for every token (indices
in range, weights finite and summing to one) and raises `RoutingError` naming the layer and
the token where one fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.gpt_oss import mlx_topk

from ..errors import ReliefError

WEIGHT_SUM_TOLERANCE = 1e-2  # bf16 weights sum to 1 within ~4e-3; a real failure is far off


class RoutingError(ReliefError):
    """A routing invariant failed: the message names the layer and the token."""


class _ProbedMLP(nn.Module):
    """mlx-lm's gpt-oss `MLPBlock.__call__`, keeping what the router chose."""

    def __init__(self, inner: nn.Module, layer: int, probe: RoutingProbe):
        super().__init__()
        self.inner = inner
        self._layer = layer
        self._probe = probe

    def __call__(self, x: mx.array) -> mx.array:
        mlp = self.inner
        logits = mlp.router(x)  # (B, L, E)
        top, indices = mlx_topk(logits, k=mlp.num_experts_per_tok, axis=-1)  # (B, L, k)
        weights = mx.softmax(top, axis=-1, precise=True)
        self._probe._record(self._layer, x.shape[1], indices, weights)
        y = mlp.experts(x, indices) * mx.expand_dims(weights, axis=-1)  # (B, L, k, H)
        return y.sum(axis=-2)


@dataclass
class _Record:
    forward: int
    layer: int
    start: int  # position of the first token in this call
    indices: mx.array  # (B, L, k)
    weights: mx.array  # (B, L, k)


@dataclass
class LayerRouting:
    """Routing of one layer over one phase (prompt or answer)."""

    counts: np.ndarray
    """(num_experts,) how many times each expert was chosen."""
    tokens: int
    weight_entropy_sum: float = 0.0

    @property
    def usage_entropy(self) -> float:
        """Entropy (bits) of how the choices spread over experts; log2(E) when perfectly even."""
        total = self.counts.sum()
        if total == 0:
            return 0.0
        p = self.counts[self.counts > 0] / total
        return float(-(p * np.log2(p)).sum())

    @property
    def imbalance(self) -> float:
        """Busiest expert's load over the mean load: 1.0 is perfectly balanced, E the worst."""
        mean = self.counts.mean()
        return float(self.counts.max() / mean) if mean > 0 else 0.0

    @property
    def mean_weight_entropy(self) -> float:
        """Mean entropy (bits) of a token's top-k weights; log2(k) when it splits evenly."""
        return self.weight_entropy_sum / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "counts": self.counts.tolist(),
                "usage_entropy_bits": round(self.usage_entropy, 4),
                "imbalance": round(self.imbalance, 4),
                "mean_weight_entropy_bits": round(self.mean_weight_entropy, 4)}


@dataclass
class RoutingReport:
    """Per-layer routing for the prompt and for the answer."""

    num_experts: int
    experts_per_token: int
    prompt: list[LayerRouting] = field(default_factory=list)
    answer: list[LayerRouting] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "experts_per_token": self.experts_per_token,
                "prompt": [r.to_dict() for r in self.prompt],
                "answer": [r.to_dict() for r in self.answer]}

    def table(self) -> str:
        """One row per layer and phase: tokens, usage entropy, imbalance, then how many times
        each expert (0, 1, ...) was chosen."""
        best = math.log2(self.num_experts)
        rows = [f"{'layer':>5} {'phase':<6} {'tokens':>6} {'entropy':>13} {'imbalance':>9}  choices per expert"]
        for phase, layers in (("prompt", self.prompt), ("answer", self.answer)):
            for i, r in enumerate(layers):
                counts = " ".join(str(int(c)) for c in r.counts)
                rows.append(f"{i:>5} {phase:<6} {r.tokens:>6} {r.usage_entropy:>5.2f}/{best:.2f} bit "
                            f"{r.imbalance:>9.2f}  {counts}")
        return "\n".join(rows)


class RoutingProbe:
    """Record (and optionally check) every layer's expert routing while it is installed."""

    def __init__(self, model: nn.Module, check: bool = False):
        self.model = model
        self.check = check
        self.layers = model.model.layers
        first = self.layers[0].mlp
        self.num_experts = first.num_local_experts
        self.k = first.num_experts_per_tok
        self.prompt_tokens = 0
        self._forward = -1
        self._records: list[_Record] = []
        self._seen = [0] * len(self.layers)  # tokens routed so far, per layer
        self._report = self._empty_report()
        for i, layer in enumerate(self.layers):
            layer.mlp = _ProbedMLP(layer.mlp, i, self)

    def close(self) -> None:
        """Put the original MLP blocks back."""
        for layer in self.layers:
            if isinstance(layer.mlp, _ProbedMLP):
                layer.mlp = layer.mlp.inner

    def __enter__(self) -> RoutingProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, prompt_tokens: int) -> None:
        """Begin a new sequence of `prompt_tokens` prompt tokens (resets counts)."""
        self.prompt_tokens = prompt_tokens
        self._forward = -1
        self._records.clear()
        self._seen = [0] * len(self.layers)
        self._report = self._empty_report()

    def _empty_report(self) -> RoutingReport:
        def zeros() -> list[LayerRouting]:
            return [LayerRouting(np.zeros(self.num_experts, np.int64), 0) for _ in self.layers]

        return RoutingReport(self.num_experts, self.k, zeros(), zeros())

    def _record(self, layer: int, length: int, indices: mx.array, weights: mx.array) -> None:
        if layer == 0:
            self._forward += 1
        self._records.append(_Record(self._forward, layer, self._seen[layer], indices, weights))
        self._seen[layer] += length

    def collect(self, all_done: bool = False) -> None:
        """Count (and check) the records of finished forward passes; with `all_done`, of all."""
        last = self._forward if all_done else self._forward - 1
        ready = [r for r in self._records if r.forward <= last]
        self._records = [r for r in self._records if r.forward > last]
        for r in ready:
            indices = np.array(r.indices[0].astype(mx.int32))  # (L, k)
            weights = np.array(r.weights[0].astype(mx.float32))  # (L, k)
            if self.check:
                self._assert_valid(r, indices, weights)
            self._count(r, indices, weights)

    def report(self) -> RoutingReport:
        self.collect(all_done=True)
        return self._report

    def _count(self, r: _Record, indices: np.ndarray, weights: np.ndarray) -> None:
        positions = r.start + np.arange(len(indices))
        safe = np.nan_to_num(np.clip(weights, 1e-12, 1.0), nan=1.0)
        entropy = -(safe * np.log2(safe)).sum(axis=-1)  # (L,)
        for phase, rows in ((self._report.prompt, positions < self.prompt_tokens),
                            (self._report.answer, positions >= self.prompt_tokens)):
            if rows.any():
                target = phase[r.layer]
                np.add.at(target.counts, np.clip(indices[rows], 0, self.num_experts - 1).ravel(), 1)
                target.tokens += int(rows.sum())
                target.weight_entropy_sum += float(entropy[rows].sum())

    def _assert_valid(self, r: _Record, indices: np.ndarray, weights: np.ndarray) -> None:
        problems = [
            ((indices < 0) | (indices >= self.num_experts)).any(axis=-1),
            ~np.isfinite(weights).all(axis=-1),
            np.abs(weights.sum(axis=-1) - 1.0) > WEIGHT_SUM_TOLERANCE,
        ]
        what = ["expert index out of range", "router weights not finite", "router weights do not sum to 1"]
        for bad, name in zip(problems, what, strict=True):
            if bad.any():
                row = int(np.argmax(bad))
                raise RoutingError(f"routing check failed at layer {r.layer}, {self._where(r.start + row)}: "
                                   f"{name} (experts {indices[row].tolist()}, weights {weights[row].tolist()}); "
                                   "the checkpoint or adapter holds bad weights there, convert or train it again")

    def _where(self, position: int) -> str:
        if position < self.prompt_tokens:
            return f"prompt token {position}"
        return f"answer token {position - self.prompt_tokens} (position {position})"
