"""`relief doctor`: what this machine gives MLX (backend, versions, memory, BLAS) and how fast."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .blas import blas_info, export_line, usable_cpus

# Shown when installed; the first four are dependencies, so "not installed" there is news.
_REQUIRED = ("mlx", "mlx-lm", "numpy", "huggingface-hub")
_OPTIONAL = ("mlx-cpu", "mlx-metal", "mlx-cuda-12", "mlx-cuda-13", "transformers")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "relief-mlx": __version__}
    for name in _REQUIRED + _OPTIONAL:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in _REQUIRED:
                out[name] = None
    return out


def _sysctl(key: str) -> str | None:
    done = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def cpu_model() -> str:
    if sys.platform == "darwin":
        return _sysctl("machdep.cpu.brand_string") or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("model name", "Model")):  # x86 / Arm boards
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory() -> dict[str, int | None]:
    """Total and available RAM in bytes (available: None where the OS has no such figure)."""
    if sys.platform == "darwin":
        total = _sysctl("hw.memsize")
        return {"total_bytes": int(total) if total else None, "available_bytes": None}
    fields = {}
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = int(value.split()[0]) * 1024  # kB
    return {"total_bytes": fields.get("MemTotal"), "available_bytes": fields.get("MemAvailable")}


def backend(mx: Any) -> str:
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def matmul_gflops(n: int = 1024, trials: int = 3) -> float:
    """Best of `trials` fp32 n x n matmuls on the default device, in GFLOP/s."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)  # warm-up: allocation, thread pools
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def diagnose(matmul_n: int = 1024) -> dict[str, Any]:
    """Everything `relief doctor` reports, as plain JSON-able values."""
    import huggingface_hub.constants as hf
    import mlx.core as mx

    info: dict[str, Any] = {
        "backend": backend(mx),
        "default_device": str(mx.default_device()),
        "versions": versions(),
        "platform": platform.platform(),
        "cpu": {"model": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable_cpus()},
        "memory": memory(),
        "device_info": dict(mx.device_info()),
    }
    if sys.platform == "linux":
        # `python_api`: what to export for MLX work done via `import relief_mlx`, which cannot
        # re-exec the way the `relief` command does.
        info["blas"] = {**blas_info(), "python_api": export_line()}
    info[f"matmul_fp32_{matmul_n}_gflops"] = round(matmul_gflops(matmul_n), 1)
    info["hf"] = {"cache": hf.HF_HUB_CACHE, "offline": hf.HF_HUB_OFFLINE}
    return info


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in d.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _show(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith(("_bytes", "memory_size", "working_set_size")) and isinstance(value, int):
        return f"{value / 2**30:.1f} GiB"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def format_table(info: dict[str, Any]) -> str:
    """One `key  value` line per leaf, keys dotted and padded so the values line up."""
    rows = _flatten(info)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {_show(k, v)}" for k, v in rows)
