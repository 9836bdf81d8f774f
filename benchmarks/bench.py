"""The README's bench tables: `relief bench` against mlx-lm in 3 (or more) separate runs, pooled.

    python benchmarks/bench.py                        # mini preset -> benchmarks/results/bench-mini-cpu*
    python benchmarks/bench.py --preset gpt-oss-20b   # a Mac with 24 GB or more: the real size, no download
    python benchmarks/bench.py -- --prompt-lengths 128 --gen-lengths 32   # after --: relief bench options

Each run is its own `python -m relief_mlx bench --compare mlx-lm` process (so `relief`'s BLAS preload
applies, and no run inherits another's allocator cache) writing `bench-PRESET-BACKEND-runK.json` and
`.png` (`--tag T`: `bench-PRESET-T-BACKEND-*`). The runs are then pooled (`report.pool_runs`: every
figure is the median, min and max of the trials of all runs; the bandwidth limit the best run's)
into `bench-PRESET-BACKEND.json`, `.png` and `.md` (the README's table). It also checks, figure by
figure, whether run 1 agrees with each later run within the min-max spread they report
(`bench-PRESET-BACKEND-agreement.json`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from relief_mlx.bench.report import agreement, markdown, plot, pool_runs  # noqa: E402
from relief_mlx.io import write_json, write_text  # noqa: E402

MIN_RUNS = 3  # a README figure is the median of 3 runs or more, with its spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini", help="preset to synthesize in memory (default: mini)")
    parser.add_argument("--runs", type=int, default=MIN_RUNS, help=f"independent runs (at least {MIN_RUNS})")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tag", help="added to the file names, e.g. dense for `-- --experts bfloat16`")
    parser.add_argument("extra", nargs="*", help="more `relief bench` options, after --")
    args = parser.parse_args()
    if args.runs < MIN_RUNS:
        parser.error(f"--runs {args.runs}: a median needs {MIN_RUNS} runs or more")

    import mlx.core as mx

    from relief_mlx.doctor import backend

    stem = args.out_dir / "-".join(["bench", args.preset, *([args.tag] if args.tag else []), backend(mx)])
    results = []
    for k in range(1, args.runs + 1):
        out = Path(f"{stem}-run{k}.json")
        command = [sys.executable, "-m", "relief_mlx", "bench", "--preset", args.preset, "--compare", "mlx-lm",
                   "--out", str(out), *args.extra]
        print(f"run {k}/{args.runs}: {' '.join(command[1:])}", file=sys.stderr)
        subprocess.run(command, check=True, cwd=ROOT)
        results.append(json.loads(out.read_text()))

    pooled = pool_runs(results)
    write_json(f"{stem}.json", pooled)
    plot(pooled, f"{stem}.png")
    write_text(f"{stem}.md", markdown(pooled) + "\n")
    pairs = [agreement(results[0], r) for r in results[1:]]  # run 1 against each later run
    figures = []
    for i, row in enumerate(pairs[0]):
        medians = [row["a"]["median"]] + [p[i]["b"]["median"] for p in pairs]
        ranges = [[row["a"]["min"], row["a"]["max"]]] + [[p[i]["b"]["min"], p[i]["b"]["max"]] for p in pairs]
        figures.append({"figure": row["figure"], "medians": medians, "ranges": ranges,
                        "agree": all(p[i]["agree"] for p in pairs)})
        print(f"{'agree ' if figures[-1]['agree'] else 'DIFFER'}  {row['figure']:<32} "
              + "  ".join(f"{m:.4g} ({lo:.4g}-{hi:.4g})" for m, (lo, hi) in zip(medians, ranges, strict=True)))
    write_json(f"{stem}-agreement.json", {"runs": [f"{stem.name}-run{k}.json" for k in range(1, args.runs + 1)],
                                          "figures": figures})
    print(f"{sum(f['agree'] for f in figures)} of {len(figures)} figures of run 1 agree with every later run "
          "within the min-max they report")
    print(f"pooled -> {stem}.json, {stem}.png; table -> {stem}.md")


if __name__ == "__main__":
    main()
