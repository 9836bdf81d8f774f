"""The README's bench table: `relief bench` against mlx-lm, run twice to show the figures reproduce.

    python benchmarks/bench.py                        # mini preset -> benchmarks/results/bench-mini-cpu-*
    python benchmarks/bench.py --preset gpt-oss-20b   # a Mac with 24 GB or more: the real size, no download
    python benchmarks/bench.py --runs 1 -- --prompt-lengths 128 --gen-lengths 32   # after --: relief bench options

Each run is its own `python -m relief_mlx bench --compare mlx-lm` process (so `relief`'s BLAS preload
applies, and no run inherits another's allocator cache) writing `bench-PRESET-BACKEND-runK.json` and
`.png`. Then, for every timed figure, it checks that the runs agree within the min-max spread they
report, writes that to `bench-PRESET-BACKEND-agreement.json`, and writes the Markdown table of run 1
(the README's) to `bench-PRESET-BACKEND.md`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from relief_mlx.bench.report import agreement, markdown  # noqa: E402
from relief_mlx.io import write_json, write_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini", help="preset to synthesize in memory (default: mini)")
    parser.add_argument("--runs", type=int, default=2, help="independent runs (default: 2)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("extra", nargs="*", help="more `relief bench` options, after --")
    args = parser.parse_args()

    import mlx.core as mx

    from relief_mlx.doctor import backend

    stem = args.out_dir / f"bench-{args.preset}-{backend(mx)}"
    results = []
    for k in range(1, args.runs + 1):
        out = Path(f"{stem}-run{k}.json")
        command = [sys.executable, "-m", "relief_mlx", "bench", "--preset", args.preset, "--compare", "mlx-lm",
                   "--results", str(out), *args.extra]
        print(f"run {k}/{args.runs}: {' '.join(command[1:])}", file=sys.stderr)
        subprocess.run(command, check=True, cwd=ROOT)
        results.append(json.loads(out.read_text()))

    write_text(f"{stem}.md", markdown(results[0]) + "\n")
    if len(results) > 1:
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
        print(f"{sum(f['agree'] for f in figures)} of {len(figures)} figures agree within the min-max they report")
    print(f"table -> {stem}.md")


if __name__ == "__main__":
    main()
