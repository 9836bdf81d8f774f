"""The README's batching figure: `generate_batch` (what `relief generate --prompts --batch-size B`
runs) against `generate_tokens` one prompt after another, same model, same prompts, greedy.

    python benchmarks/batch.py                      # mini preset -> benchmarks/results/batch-BACKEND.json
    python benchmarks/batch.py --preset gpt-oss-20b-2l --new-tokens 32

8 random prompts of 60-200 tokens, `--new-tokens` each (no stop token: every row runs to the end);
total generated tokens over wall time, prefill included: the median (min-max) of `--repeats` (3 or
more) alternated runs, and each speed-up the median (min-max) of the repeats' ratios to the
sequential run just before.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from relief_mlx.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()  # re-executes once with OpenBLAS preloaded on a Linux CPU, as `relief` does

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from relief_mlx.bench import source  # noqa: E402
from relief_mlx.bench.stats import paired_ratio, summarize  # noqa: E402
from relief_mlx.doctor import backend  # noqa: E402
from relief_mlx.generate.loop import generate_batch, generate_tokens  # noqa: E402
from relief_mlx.io import write_json  # noqa: E402
from relief_mlx.model.load import default_dtype  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs (median and min-max; at least 3)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error(f"--repeats {args.repeats}: a median needs 3 runs or more")
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    model = source.build(source.describe(None, args.preset), default_dtype())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 199_998, int(n)).tolist() for n in rng.integers(60, 200, args.prompts)]
    list(generate_tokens(model, prompts[0][:20], max_tokens=4))  # warm-up
    list(generate_batch(model, [p[:20] for p in prompts[:2]], max_tokens=4))

    def sequential() -> int:
        return sum(sum(1 for _ in generate_tokens(model, p, max_tokens=args.new_tokens)) for p in prompts)

    def batched(b: int) -> int:
        return sum(len(steps) for i in range(0, len(prompts), b)
                   for steps in generate_batch(model, prompts[i:i + b], max_tokens=args.new_tokens))

    runs: dict[str, list[float]] = {"sequential": [], **{f"batch {b}": [] for b in sizes}}
    for repeat in range(args.repeats):
        for name, fn in [("sequential", sequential), *[(f"batch {b}", lambda b=b: batched(b)) for b in sizes]]:
            tic = time.perf_counter()
            tokens = fn()
            runs[name].append(tokens / (time.perf_counter() - tic))
            print(f"repeat {repeat + 1}: {name:<10} {runs[name][-1]:7.1f} tokens/s ({tokens} tokens)", flush=True)
    speed = {name: summarize(v) for name, v in runs.items()}
    speedup = {name: paired_ratio(s, speed["sequential"]) for name, s in speed.items()}
    for name, s in speed.items():
        x = speedup[name]
        print(f"{name:<10} {s['median']:7.1f} ({s['min']:.1f}-{s['max']:.1f}) tokens/s  "
              f"{x['median']:.2f}x ({x['min']:.2f}-{x['max']:.2f}) sequential")
    out = args.out or ROOT / "benchmarks" / "results" / f"batch-{args.preset}-{backend(mx)}.json"
    write_json(out, {"preset": args.preset, "backend": backend(mx), "dtype": str(default_dtype()),
                     "prompt_lengths": [len(p) for p in prompts], "new_tokens": args.new_tokens,
                     "tokens_per_s": speed, "speedup": speedup})
    print(f"results -> {out}")


if __name__ == "__main__":
    main()
