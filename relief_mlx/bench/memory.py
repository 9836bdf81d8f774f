"""What memory allows: the machine's measured bandwidth, the bytes one decoded token reads, and
whether a model fits before anything is allocated.

Decoding one token reads every weight it touches once (attention, router, norms, lm_head, one
embedding row, the top-k experts of each layer) and the KV cache, so bytes per token divided by
the measured bandwidth is the fastest decode the machine allows; a decode figure is reported
with its fraction of that limit.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from ..checkpoint.inspect import MXFP4_BYTES, memory_table
from ..checkpoint.presets import count_parameters
from ..errors import ReliefError

GB = 1e9
GIB = 2**30


# ---------------------------------------------------------------- bandwidth


def _median_seconds(fn: Callable[[], mx.array], trials: int) -> list[float]:
    mx.eval(fn())  # warm-up: allocation, kernel compilation
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return times


def measure_bandwidth(nbytes: int = 256 * 2**20, trials: int = 10) -> dict:
    """Memory bandwidth MLX reaches on the default device, GB/s per kernel and the best median.

    Three kernels over an `nbytes` float32 array (larger than any cache): a full sum (reads it),
    a copy (reads and writes it) and a matrix-vector product (reads it through the same BLAS /
    GEMV kernel a decode step uses). The limit is the best kernel's median.
    """
    n = nbytes // 4
    rows = 4096
    a = mx.random.uniform(shape=(rows, n // rows))  # (R, C) float32
    x = mx.ones((1, rows))
    mx.eval(a, x)
    kernels = {
        "sum": (lambda: a.sum(), a.nbytes),
        "copy": (lambda: a + 0.0, 2 * a.nbytes),
        "gemv": (lambda: x @ a, a.nbytes),
    }
    out = {}
    for name, (fn, moved) in kernels.items():
        gbps = [moved / t / GB for t in _median_seconds(fn, trials)]
        out[name] = {"median": statistics.median(gbps), "min": min(gbps), "max": max(gbps)}
    best = max(out, key=lambda k: out[k]["median"])
    return {"array_bytes": n * 4, "trials": trials, "kernels_gbps": out,
            "limit_gbps": out[best]["median"], "limit_kernel": best}


# ---------------------------------------------------------------- bytes per decoded token


def expert_bytes(config: dict, dtype_bytes: int, mxfp4: bool) -> int:
    """Bytes of one expert of one layer: gate, up and down weights and their biases."""
    h, i = config["hidden_size"], config["intermediate_size"]
    weights = 3 * h * i
    biases = 2 * i + h
    if mxfp4:
        return round(weights * MXFP4_BYTES) + biases * dtype_bytes  # 4-bit values + a uint8 scale per 32
    return (weights + biases) * dtype_bytes


def kv_tokens(config: dict, context: int) -> list[int]:
    """Cached tokens each layer's attention reads at `context` tokens (the new one included):
    all of them on full-attention layers, at most the window on sliding ones."""
    window = config.get("sliding_window") or context
    kinds = config.get("layer_types") or ["full_attention"] * config["num_hidden_layers"]
    return [context if kind == "full_attention" else min(context, window) for kind in kinds]


def decode_bytes(config: dict, dtype_bytes: int, mxfp4: bool, context: int) -> dict[str, int]:
    """Bytes read to decode one token at `context` tokens, by component, and their total.

    Weights and KV cache are `dtype_bytes` per value (the model's float dtype); experts are
    MXFP4 (`mxfp4`) or dense in that dtype; only the top-k experts of each layer are read.
    """
    counts = count_parameters(config)
    n, h, k = config["num_hidden_layers"], config["hidden_size"], config["num_experts_per_tok"]
    kv_per_token = 2 * config["num_key_value_heads"] * config["head_dim"] * dtype_bytes  # keys + values
    parts = {
        "embedding_row": h * dtype_bytes,
        "attention": counts["attention"] * dtype_bytes,
        "norms": counts["norms"] * dtype_bytes,
        "router": counts["router"] * dtype_bytes,
        "experts": n * k * expert_bytes(config, dtype_bytes, mxfp4),
        "lm_head": counts["lm_head"] * dtype_bytes,
        "kv_cache": kv_per_token * sum(kv_tokens(config, context)),
    }
    parts["total"] = sum(parts.values())
    return parts


def mean_decode_bytes(config: dict, dtype_bytes: int, mxfp4: bool, prompt: int, generated: int) -> dict[str, float]:
    """`decode_bytes` averaged over the `generated` decode steps after a `prompt`-token prefill
    (which yields the first token): step j feeds token j and attends over prompt + j tokens."""
    steps = [decode_bytes(config, dtype_bytes, mxfp4, prompt + j) for j in range(1, generated + 1)]
    return {key: sum(s[key] for s in steps) / len(steps) for key in steps[0]}


# ---------------------------------------------------------------- will it fit


def weight_bytes(config: dict, dtype_bytes: int, mxfp4: bool) -> int:
    """Weights in memory, from `relief inspect`'s table for the storage the bench will use."""
    table = memory_table(count_parameters(config))
    if mxfp4:
        return table["mxfp4 experts + float32" if dtype_bytes == 4 else "mxfp4 experts + bf16 (published)"]
    return table["float32" if dtype_bytes == 4 else "bfloat16"]


@dataclass(frozen=True)
class Workload:
    """The largest things a bench run will hold besides the weights."""

    context: int
    """Longest context generated at (prompt + generated tokens)."""
    prefill_chunk: int
    """Prompt tokens per forward pass."""
    train_tokens: int
    """Tokens per training step (batch x sequence); 0 when training is skipped."""


def needed_bytes(config: dict, dtype_bytes: int, mxfp4: bool, work: Workload) -> dict[str, int]:
    """Memory a bench run needs: weights, KV cache, and activations estimated generously.

    Activations: a prefill chunk's hidden states, expert activations and float32 attention
    scores, or a training step's saved activations (about 16 hidden-sized and 8 expert-sized
    values per token and layer) plus five float32 vocabulary-sized values per token for the
    loss (measured: mlx-lm's full logits take 4.2, our chunked loss 2.9 on the mini preset),
    whichever is larger.
    """
    h, i, k = config["hidden_size"], config["intermediate_size"], config["num_experts_per_tok"]
    n, v, heads = config["num_hidden_layers"], config["vocab_size"], config["num_attention_heads"]
    kv = 2 * config["num_key_value_heads"] * config["head_dim"] * dtype_bytes * sum(kv_tokens(config, work.context))
    chunk = min(work.prefill_chunk, work.context)
    prefill = chunk * (12 * h + 6 * k * i) * dtype_bytes + chunk * heads * work.context * 4
    train = work.train_tokens * ((16 * h + 8 * k * i) * n * dtype_bytes + 5 * v * 4)
    parts = {
        "weights": weight_bytes(config, dtype_bytes, mxfp4),
        "kv_cache": kv,
        "activations": max(prefill, train),
    }
    parts["total"] = sum(parts.values())
    return parts


def available_memory() -> tuple[int | None, str]:
    """(bytes the bench may use, what that figure is): the GPU working-set limit on Apple
    silicon, the GPU's memory on CUDA, available RAM elsewhere (total RAM where the OS has no
    such figure)."""
    from ..doctor import backend, memory

    info = dict(mx.device_info())
    kind = backend(mx)
    if kind == "metal":
        limit = info.get("max_recommended_working_set_size")
        if limit is None and hasattr(mx.metal, "device_info"):
            limit = mx.metal.device_info().get("max_recommended_working_set_size")
        if limit:
            return int(limit), "Metal's recommended working set"
    if kind == "cuda":
        size = info.get("total_memory") or info.get("memory_size")
        if size:
            return int(size), "GPU memory"
    ram = memory()
    if ram["available_bytes"]:
        return ram["available_bytes"], "available RAM"
    if ram["total_bytes"]:
        return ram["total_bytes"], "total RAM"
    return None, "unknown"


def check_fits(what: str, needed: dict[str, int], available: tuple[int | None, str]) -> None:
    """Raise a one-line ReliefError when `needed['total']` exceeds the available memory."""
    limit, source = available
    if limit is None or needed["total"] <= limit:
        return
    raise ReliefError(
        f"{what} needs about {needed['total'] / GIB:.1f} GiB (weights {needed['weights'] / GIB:.1f} GiB + "
        f"KV cache and activations {(needed['total'] - needed['weights']) / GIB:.1f} GiB) but this machine has "
        f"{limit / GIB:.1f} GiB ({source}); try a smaller preset (gpt-oss-20b-2l has the real per-layer shapes), "
        "shorter --prompt-lengths, or --no-training"
    )
