"""MLX CPU speed with the mlx-cpu wheel's reference BLAS against OpenBLAS preloaded.

    python benchmarks/blas.py              # -> benchmarks/results/blas-cpu.json, a markdown table
    python benchmarks/blas.py --rounds 1   # quicker look; the reference BLAS takes minutes
    python benchmarks/blas.py --blas /usr/lib64/libopenblasp.so.0

Each configuration runs the same workloads in its own subprocess, because the loader reads
LD_PRELOAD only at process start. Every worker reports which library actually provided
`cblas_sgemm` (relief_mlx.blas.blas_info), so a silently ignored preload shows in the results.
Configurations: the wheel's reference BLAS; OpenBLAS with the thread count `relief` sets (one
per usable core); OpenBLAS with 1 thread; OpenBLAS with 2 threads per core (oversubscribed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from relief_mlx import blas, doctor  # noqa: E402
from relief_mlx.io import write_json  # noqa: E402

# gpt-oss-20b shapes: hidden 2880, 64 query heads x 64 = 4096, 32 experts, top-4.
HIDDEN, PROJ, EXPERTS, TOP_K, MOE_TOKENS, TOKENS = 2880, 4096, 32, 4, 64, 512


def _workloads() -> dict[str, tuple[float, Callable[[], Any]]]:
    """name -> (FLOPs per call, a function returning the lazy result to evaluate)."""
    import mlx.core as mx

    mx.random.seed(0)
    out: dict[str, tuple[float, Callable[[], Any]]] = {}
    for n in (512, 1024, 2048):
        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        out[f"matmul fp32 {n}"] = (2 * n**3, lambda a=a, b=b: a @ b)
    a16, b16 = (mx.random.normal((1024, 1024)).astype(mx.bfloat16) for _ in range(2))
    # MLX multiplies half types with its own kernel, not BLAS: a control for machine noise.
    out["matmul bf16 1024 (no BLAS)"] = (2 * 1024**3, lambda: a16 @ b16)

    x = mx.random.normal((TOKENS, HIDDEN))
    w = mx.random.normal((HIDDEN, PROJ)) * HIDDEN**-0.5
    out[f"dense {TOKENS}x{HIDDEN} @ {HIDDEN}x{PROJ}"] = (2 * TOKENS * HIDDEN * PROJ, lambda: x @ w)

    # MoE as mlx-lm's SwitchGLU runs it: rows sorted by expert, one (1, D) row per (token, expert).
    rows = MOE_TOKENS * TOP_K
    experts = mx.random.normal((EXPERTS, HIDDEN, HIDDEN)) * HIDDEN**-0.5  # (E, out, in)
    idx = mx.sort(mx.random.randint(0, EXPERTS, (rows,))).astype(mx.uint32)
    xs = mx.random.normal((rows, 1, HIDDEN))
    moe_flops = 2 * rows * HIDDEN * HIDDEN
    name = f"moe gather_mm {MOE_TOKENS} tok x top-{TOP_K}/{EXPERTS}, {HIDDEN}"
    out[name] = (moe_flops, lambda: mx.gather_mm(
        xs, experts.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=True))

    # The same products as one matmul per expert over its contiguous rows (what a CPU kernel
    # that batched rows per expert would do).
    bounds = [0, *np.cumsum(np.bincount(np.array(idx), minlength=EXPERTS)).tolist()]
    flat = xs.reshape(rows, HIDDEN)

    def grouped() -> Any:
        spans = enumerate(zip(bounds[:-1], bounds[1:], strict=True))
        parts = [flat[s:e] @ experts[i].T for i, (s, e) in spans if e > s]
        return mx.concatenate(parts)[:, None, :]  # (rows, 1, HIDDEN) like gather_mm

    out[f"moe grouped per-expert matmul, {HIDDEN}"] = (moe_flops, grouped)
    ref, got = out[name][1](), grouped()
    assert mx.allclose(ref, got, atol=1e-3).item(), "grouped MoE disagrees with gather_mm"
    return out


def worker(trials: int) -> dict[str, Any]:
    """Seconds per call of every workload, `trials` times after one warm-up."""
    import mlx.core as mx

    seconds: dict[str, list[float]] = {}
    flops: dict[str, float] = {}
    for name, (flop, fn) in _workloads().items():
        mx.eval(fn())
        seconds[name] = []
        for _ in range(trials):
            start = time.perf_counter()
            mx.eval(fn())
            seconds[name].append(time.perf_counter() - start)
        flops[name] = flop
        print(f"  {name}: {flop / statistics.median(seconds[name]) / 1e9:.1f} GFLOP/s (median)",
              file=sys.stderr, flush=True)
    return {"blas": blas.blas_info(), "flops": flops, "seconds": seconds}


def _configs(lib: str, cpus: int) -> dict[str, dict[str, str]]:
    """Name -> the environment changes for that configuration."""
    return {
        "reference": {},
        "openblas": {"LD_PRELOAD": lib, "OPENBLAS_NUM_THREADS": str(cpus)},
        "openblas 1 thread": {"LD_PRELOAD": lib, "OPENBLAS_NUM_THREADS": "1"},
        f"openblas {2 * cpus} threads": {"LD_PRELOAD": lib, "OPENBLAS_NUM_THREADS": str(2 * cpus)},
    }


def _run(changes: dict[str, str], trials: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", blas.MARKER, *blas.THREAD_VARS)}
    done = subprocess.run([sys.executable, __file__, "--worker", "--trials", str(trials)],
                          env={**env, **changes}, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout)


def _summary(flops: float, seconds: list[float]) -> dict[str, Any]:
    gflops = [flops / s / 1e9 for s in seconds]
    return {
        "flops": flops,
        "seconds": [round(s, 5) for s in seconds],
        "gflops_median": round(statistics.median(gflops), 2),
        "gflops_min": round(min(gflops), 2),
        "gflops_max": round(max(gflops), 2),
    }


def measure(configs: dict[str, dict[str, str]], rounds: int, trials: int) -> dict[str, Any]:
    """Run every configuration once per round, interleaved, so that load from other processes
    drifting over the minutes of a run lands on all of them alike."""
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for r in range(rounds):
        for name, changes in configs.items():
            print(f"round {r + 1}/{rounds}, {name}:", file=sys.stderr, flush=True)
            raw[name].append(_run(changes, trials))
    runs = {}
    for name, parts in raw.items():
        results = {w: _summary(flop, [s for p in parts for s in p["seconds"][w]])
                   for w, flop in parts[0]["flops"].items()}
        runs[name] = {"env": configs[name], "blas": parts[0]["blas"], "results": results}
    return runs


def _cell(r: dict[str, Any]) -> str:
    return f"{r['gflops_median']:.1f} ({r['gflops_min']:.1f}-{r['gflops_max']:.1f})"


def table(runs: dict[str, dict[str, Any]]) -> str:
    """Markdown: median GFLOP/s (min-max) per workload and configuration, and the speed-up."""
    names = list(runs)
    head = ["workload", *names, "openblas / reference"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in runs["reference"]["results"]:
        cells = [_cell(runs[n]["results"][w]) for n in names]
        ratio = (runs["openblas"]["results"][w]["gflops_median"]
                 / runs["reference"]["results"][w]["gflops_median"])
        lines.append(f"| {w} | " + " | ".join(cells) + f" | {ratio:.1f}x |")
    used = ", ".join(f"{n}: {runs[n]['blas']['kind']}" for n in names)
    return ("GFLOP/s, median (min-max)\n\n" + "\n".join(lines)
            + f"\n\nBLAS providing cblas_sgemm: {used}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs of each configuration")
    p.add_argument("--trials", type=int, default=2, help="timed calls per workload per run")
    p.add_argument("--blas", help="library to preload (default: as `relief` finds it)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/blas-cpu.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.trials)))
        return
    lib = args.blas or blas.find_blas(os.environ, blas.candidate_paths())
    if lib is None:
        sys.exit("no OpenBLAS found: apt-get install libopenblas0-pthread, or pass --blas PATH")
    cpus = blas.usable_cpus()
    load_before = os.getloadavg()
    runs = measure(_configs(lib, cpus), args.rounds, args.trials)
    report = {
        "command": " ".join(["python", "benchmarks/blas.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": doctor.cpu_model(),
            "cores": os.cpu_count(),
            "usable_cores": cpus,
            "memory": doctor.memory(),
            "platform": platform.platform(),
            # Other processes on the machine skew timings: 1-minute load before and after.
            "load_average_1m": [load_before[0], os.getloadavg()[0]],
        },
        "versions": doctor.versions(),
        "preloaded": lib,
        "rounds": args.rounds,
        "trials_per_round": args.trials,
        "runs": runs,
    }
    write_json(args.out, report)
    print(table(runs))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
