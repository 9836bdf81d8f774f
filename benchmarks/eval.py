"""The README's teacher-forced figure: `relief eval`'s loss pass (`eval.run.teacher_forced`) in
samples/s over the bundled dataset's test split, at several batch sizes, next to the original
pipeline's 0.008 samples/s.

    python benchmarks/eval.py                       # mini preset -> benchmarks/results/eval-mini-BACKEND.json
    python benchmarks/eval.py --preset gpt-oss-20b --batch-sizes 1,8   # on a machine that holds it

Random weights at the preset's shapes, synthesized in memory (as `relief bench` does); the real
conversations rendered and masked as training renders them (512-token limit). Each repeat runs
every batch size in turn (the order flips every repeat); the median (min-max) of `--repeats`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from relief_mlx.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()  # re-executes once with OpenBLAS preloaded on a Linux CPU, as `relief` does

import mlx.core as mx  # noqa: E402

from relief_mlx.bench import source  # noqa: E402
from relief_mlx.data.dataset import load_dataset, tokenize  # noqa: E402
from relief_mlx.data.harmony import RenderOptions, default_tokenizer  # noqa: E402
from relief_mlx.doctor import backend  # noqa: E402
from relief_mlx.eval.run import ORIGINAL_SAMPLES_PER_S, teacher_forced  # noqa: E402
from relief_mlx.io import write_json  # noqa: E402
from relief_mlx.model.load import default_dtype  # noqa: E402
from relief_mlx.recipe import DataSection  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    data = DataSection(path=str(ROOT / "datasets" / "emergency_relief"))
    records = load_dataset(data.path).splits[args.split]
    options = RenderOptions(reasoning_effort=data.reasoning_effort, current_date=data.current_date)
    examples = tokenize(records, data.max_length, options, data.mask, default_tokenizer()).examples
    model = source.build(source.describe(None, args.preset), default_dtype())
    teacher_forced(model, examples[:2], 2, data.max_length)  # warm-up

    runs: dict[str, list[float]] = {f"batch {b}": [] for b in sizes}
    for repeat in range(args.repeats):
        for b in sizes if repeat % 2 == 0 else sizes[::-1]:
            tic = time.perf_counter()
            teacher_forced(model, examples, b, data.max_length)
            runs[f"batch {b}"].append(len(examples) / (time.perf_counter() - tic))
            print(f"repeat {repeat + 1}: batch {b:<3} {runs[f'batch {b}'][-1]:7.2f} samples/s", flush=True)
    stats = {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in runs.items()}
    tokens = sum(len(e.tokens) for e in examples)
    for name, v in stats.items():
        print(f"{name:<9} median {v['median']:7.2f} ({v['min']:.2f}-{v['max']:.2f}) samples/s "
              f"({v['median'] * tokens / len(examples):,.0f} tokens/s), "
              f"{v['median'] / ORIGINAL_SAMPLES_PER_S:,.0f}x the original {ORIGINAL_SAMPLES_PER_S}")
    out = args.out or ROOT / "benchmarks" / "results" / f"eval-{args.preset}-{backend(mx)}.json"
    write_json(out, {"preset": args.preset, "backend": backend(mx), "dtype": str(default_dtype()),
                     "split": args.split, "examples": len(examples), "tokens": tokens,
                     "samples_per_s": runs, "stats": stats, "original_samples_per_s": ORIGINAL_SAMPLES_PER_S})
    print(f"results -> {out}")


if __name__ == "__main__":
    main()
