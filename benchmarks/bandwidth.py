"""The bandwidth limit `relief bench` reports, against a read measured apart from it.

    python benchmarks/bandwidth.py              # -> benchmarks/results/bandwidth-BACKEND.json
    python benchmarks/bandwidth.py --rounds 5 --mib 512

--rounds times (3 or more): a reference read written apart from the bench, STREAM-with-MPI style
(one process per usable core, each reading its own float32 array, a numpy sum and a numpy max,
after a shared barrier; a trial's rate is every byte read over the span from the first start to
the last end; a round keeps its best trial, as the probe does), then at once
`relief_mlx.bench.memory.measure_bandwidth()`, the limit `relief bench` prints, whose host reads
come first (so the two reads are seconds apart, not the ten seconds MLX's CPU reads take). Prints
the median (min-max) of both over the rounds and of their ratio round by round, and whether the
limit is within 20% of the reference. On a GPU backend the limit is the GPU's own, so the probe's
host read is what is compared (both are printed). On a busy machine both move by 2-3x from one
second to the next: take the figures from a quiet one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

GB = 1e9
TOLERANCE = 0.2


def _reader(nbytes: int, trials: int, barrier, queue) -> None:
    a = np.ones(nbytes // 4, np.float32)
    a.sum()  # page faults, caches
    spans = []
    for _ in range(trials):
        for read in (np.sum, np.max):  # as the probe, the two numpy reductions
            barrier.wait()
            start = time.perf_counter()  # CLOCK_MONOTONIC / mach time: one clock for every process
            read(a)
            spans.append((start, time.perf_counter()))
    queue.put(spans)


def reference_read(processes: int, nbytes: int, trials: int) -> list[float]:
    """GB/s of `trials` x 2 (a sum, a max) simultaneous reads by `processes` processes of `nbytes` each."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_reader, args=(nbytes, trials, barrier, queue)) for _ in range(processes)]
    for w in workers:
        w.start()
    spans = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    return [processes * nbytes / (max(s[t][1] for s in spans) - min(s[t][0] for s in spans)) / GB
            for t in range(len(spans[0]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds (at least 3)")
    parser.add_argument("--trials", type=int, default=5, help="reference reads per round (best kept, as the probe)")
    parser.add_argument("--mib", type=int, default=256, help="array each reference process reads (default 256)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error(f"--rounds {args.rounds}: a median needs 3 runs or more")

    import mlx.core as mx

    from relief_mlx.bench.memory import measure_bandwidth
    from relief_mlx.bench.stats import paired_ratio, summarize
    from relief_mlx.blas import usable_cpus
    from relief_mlx.doctor import backend, cpu_model, versions
    from relief_mlx.io import write_json

    processes = usable_cpus()
    probes, reference = [], []
    for r in range(args.rounds):
        reference.append(max(reference_read(processes, args.mib * 2**20, args.trials)))
        probes.append(measure_bandwidth())
        print(f"round {r + 1}: limit {probes[-1]['limit_gbps']:.1f} GB/s ({probes[-1]['limit_kernel']}), "
              f"host read {probes[-1]['host_gbps']:.1f}, reference {reference[-1]:.1f} GB/s", flush=True)

    gpu = probes[0]["device"] == "gpu"
    limit = summarize([p["limit_gbps"] for p in probes])
    host = summarize([p["host_gbps"] for p in probes])
    ref = summarize(reference)
    ratio = paired_ratio(host if gpu else limit, ref)
    within = abs(ratio["median"] - 1) <= TOLERANCE

    def cell(s: dict) -> str:
        return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"

    print(f"\n{cpu_model()}, {processes} usable cores, {backend(mx)} backend; GB/s, median (min-max) of {args.rounds} "
          f"rounds\n  bench limit          {cell(limit)}  ({probes[0]['limit_kernel']})\n"
          f"  bench host read      {cell(host)}\n  reference, {processes} processes {cell(ref)}\n"
          f"  {'host read' if gpu else 'limit'} / reference  {ratio['median']:.2f} ({ratio['min']:.2f}-"
          f"{ratio['max']:.2f}): {'within' if within else 'NOT within'} {TOLERANCE:.0%}")
    out = args.out or ROOT / "benchmarks" / "results" / f"bandwidth-{backend(mx)}.json"
    write_json(out, {"command": " ".join(["python", "benchmarks/bandwidth.py", *sys.argv[1:]]),
                     "cpu": cpu_model(), "backend": backend(mx), "versions": versions(), "processes": processes,
                     "reference_mib_per_process": args.mib, "limit_gbps": limit, "host_gbps": host,
                     "reference_gbps": ref, "ratio": ratio, "within_tolerance": within, "probes": probes})
    print(f"results -> {out}")


if __name__ == "__main__":
    main()
