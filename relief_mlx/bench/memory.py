"""What memory allows: the machine's read bandwidth, the bytes one decoded token reads, and
whether a model fits before anything is allocated.

Decoding one token reads every weight it touches once (attention, router, norms, lm_head, one
embedding row, the top-k experts of each layer) and the KV cache, so bytes per token divided by
the machine's read bandwidth is the fastest decode it allows; a decode figure is reported with
its share of that limit, and a share above 100% is a measurement error, never a result.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..checkpoint.inspect import MXFP4_BYTES
from ..checkpoint.limits import weight_bytes
from ..checkpoint.presets import count_parameters
from ..errors import ReliefError
from .stats import summarize

GB = 1e9
GIB = 2**30
MIB = 2**20


# ---------------------------------------------------------------- bandwidth
#
# Measured like STREAM: a plain read of float32 arrays several times larger than the last-level
# cache, by every usable core (numpy threads over disjoint slices: a sum and a max) and by MLX on
# its device (a sum, and the matrix-vector product decode runs), the best trial of each size. STREAM
# reports the best trial too: load from other processes only ever slows a read down, and a
# limit must be what the memory can deliver. The limit is the fastest read on the device MLX
# computes on: on a CPU backend the host's, on a GPU the GPU's own.

# Advertised unified-memory bandwidth of Apple silicon, GB/s: Apple's newsroom announcements and
# Mac tech specs pages (support.apple.com/specs), as tabulated in Wikipedia's "Apple M1" to
# "Apple M4" articles. A {CPU cores: GB/s} entry: the binned chip with fewer cores has fewer
# memory channels.
APPLE_GBPS: dict[str, float | dict[int, float]] = {
    "M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": {14: 300, 16: 400}, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": {14: 410, 16: 546},
}


def nominal_bandwidth(cpu_model: str, cores: int | None) -> float | None:
    """The advertised GB/s of a known Apple chip (`cpu_model` as macOS names it, "Apple M2 Max";
    `cores` tells the two M3 Max and M4 Max apart), else None."""
    value = APPLE_GBPS.get(cpu_model.strip().removeprefix("Apple "))
    if isinstance(value, dict):
        return value.get(cores) if cores is not None else None
    return value


def _size(text: str) -> int:
    """Bytes of a cache size as /sys writes it: "32768K", "1M", "512"."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def last_level_cache(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> tuple[int | None, str]:
    """(bytes, where from) of the CPU's largest data cache: Linux's /sys, else macOS's sysctl
    (Apple silicon reports its L2; its system-level cache is not published), else (None, "unknown")."""
    levels = {}
    for index in root.glob("index*"):
        try:
            if (index / "type").read_text().strip() != "Instruction":
                levels[int((index / "level").read_text())] = _size((index / "size").read_text())
        except (OSError, ValueError):
            continue
    if levels:
        return levels[max(levels)], f"L{max(levels)} of {root}"
    if sys.platform == "darwin":
        from ..doctor import _sysctl

        for key in ("hw.l3cachesize", "hw.perflevel0.l2cachesize", "hw.l2cachesize"):
            value = _sysctl(key)
            if value and value.isdigit() and int(value) > 0:
                return int(value), f"sysctl {key}"
    return None, "unknown"


def probe_sizes(largest: int | None, cache: int | None, gpu: bool) -> list[int]:
    """Bytes of the arrays the probe reads: a quarter, half and all of `largest`. By default the
    smallest is 4x the last-level cache and at least 64 MiB; on a GPU, whose caches the OS does
    not report (an H100/H200's L2 is 50-60 MB, an M-Ultra's system cache 96 MB), at least 512 MiB."""
    if largest is None:
        smallest = max(512 * MIB if gpu else 64 * MIB, 4 * (cache or 0))
        largest = 4 * smallest
    return [largest // 4, largest // 2, largest]


def _gbps(read: Callable[[], object], nbytes: int, trials: int) -> list[float]:
    """GB/s of `trials` timed calls of `read` (which reads `nbytes` and returns when done), after
    an untimed one (page faults, allocation, kernel compilation)."""
    read()
    out = []
    for _ in range(trials):
        start = time.perf_counter()
        read()
        out.append(nbytes / (time.perf_counter() - start) / GB)
    return out


HOST_READS = {"sum": np.sum, "max": np.max}
"""numpy reductions that read an array once: a sum, and a max (SIMD in numpy, faster than the
pairwise sum on some CPUs); the probe keeps the faster."""


def host_read(a: np.ndarray, pool: ThreadPoolExecutor, threads: int, trials: int) -> dict[str, list[float]]:
    """GB/s of each numpy reduction of `a`, `threads` threads each over its own contiguous slice
    (numpy releases the GIL in a reduction's inner loop, so the threads read in parallel)."""
    parts = np.array_split(a, threads)
    return {f"numpy {name}, {threads} threads": _gbps(lambda fn=fn: list(pool.map(fn, parts)), a.nbytes, trials)
            for name, fn in HOST_READS.items()}


def device_read(nbytes: int, trials: int) -> dict[str, list[float]]:
    """GB/s of MLX reading an `nbytes` float32 array on its default device: a full sum, and the
    matrix-vector product a decode step's projections run (x @ A reads A once)."""
    rows = 4096
    a = mx.ones((rows, max(1, nbytes // 4 // rows)))  # (R, C) float32
    x = mx.ones((1, rows))
    mx.eval(a, x)
    kernels = {"mlx sum": lambda: a.sum(), "mlx gemv": lambda: x @ a}
    return {name: _gbps(lambda fn=fn: mx.eval(fn()), a.nbytes, trials) for name, fn in kernels.items()}


def measure_bandwidth(largest: int | None = None, trials: int = 5) -> dict:
    """The machine's read bandwidth (see the comment above), every kernel's figures, and the
    advertised figure of a known Apple chip beside them.

    `largest`: bytes of the largest array read (default: `probe_sizes`). Each kernel reports
    the trials of its fastest size ("best" is the fastest trial); `limit_gbps` is the best of the
    kernels that run where MLX computes.
    """
    from ..blas import usable_cpus
    from ..doctor import backend, cpu_model

    gpu = backend(mx) != "cpu"
    cache, cache_source = last_level_cache()
    threads = usable_cpus()
    sizes = {"host": probe_sizes(largest, cache, gpu=False), "device": probe_sizes(largest, cache, gpu)}
    runs: dict[str, dict[int, list[float]]] = {}
    buffer = np.ones(sizes["host"][-1] // 4, np.float32)  # smaller sizes read a prefix of it
    with ThreadPoolExecutor(threads) as pool:
        for size in sizes["host"]:
            for name, gbps in host_read(buffer[: size // 4], pool, threads, trials).items():
                runs.setdefault(name, {})[size] = gbps
    del buffer
    host = list(runs)
    for size in sizes["device"]:
        for name, gbps in device_read(size, trials).items():
            runs.setdefault(name, {})[size] = gbps
    mx.clear_cache()
    kernels = {name: _fastest_size(by_size) for name, by_size in runs.items()}

    def best(names: list[str]) -> str:
        return max(names, key=lambda k: kernels[k]["best"])

    limit_kernel = best([k for k in kernels if not gpu or k not in host])
    chip = cpu_model()
    return {
        "device": "gpu" if gpu else "cpu", "threads": threads, "trials": trials, "sizes_bytes": sizes,
        "last_level_cache_bytes": cache, "last_level_cache_source": cache_source,
        "kernels_gbps": kernels, "host_gbps": kernels[best(host)]["best"], "host_kernel": best(host),
        "limit_gbps": kernels[limit_kernel]["best"], "limit_kernel": limit_kernel,
        "chip": chip, "nominal_gbps": nominal_bandwidth(chip, os.cpu_count()),
    }


def _fastest_size(by_size: dict[int, list[float]]) -> dict:
    """The trials of the size whose best trial is fastest: summarized, with that best and size."""
    size = max(by_size, key=lambda s: max(by_size[s]))
    return summarize(by_size[size]) | {"best": max(by_size[size]), "size_bytes": size}


class MeasurementError(ReliefError):
    """A figure the machine cannot produce: the measurement, not the code measured, is wrong."""


def bandwidth_share(tokens_per_s: float, bytes_per_token: float, limit_gbps: float, what: str = "decode") -> float:
    """The share of the bandwidth limit a decode at `tokens_per_s` reads; raises MeasurementError
    above 1 (no loop reads faster than memory: the limit or the byte count is wrong)."""
    read = tokens_per_s * bytes_per_token / GB
    share = read / limit_gbps
    if share > 1:
        raise MeasurementError(
            f"{what} at {tokens_per_s:.4g} tokens/s reads {read:.3g} GB/s ({bytes_per_token / 1e6:.4g} MB/token), "
            f"{share:.0%} of the measured bandwidth limit {limit_gbps:.3g} GB/s: no decode reads faster than "
            "memory, so the limit (or the bytes counted per token) is wrong; rerun on a quiet machine, with a "
            "larger --bandwidth-mib")
    return share


def decode_share(row: dict, limit_gbps: float, what: str) -> dict:
    """A decode row's (`tokens_per_s` summary, `bytes_per_token`) place under the limit: the
    speed the limit allows, and the share the median trial reads, or, when any trial reads more
    than the limit, `bandwidth_error` instead of a share."""
    total, speed = row["bytes_per_token"]["total"], row["tokens_per_s"]
    out = {"ceiling_tokens_per_s": limit_gbps * GB / total}
    try:
        bandwidth_share(speed["max"], total, limit_gbps, what)  # the fastest trial first
        return out | {"bandwidth_fraction": bandwidth_share(speed["median"], total, limit_gbps, what)}
    except MeasurementError as e:
        return out | {"bandwidth_fraction": None, "bandwidth_error": str(e)}


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
