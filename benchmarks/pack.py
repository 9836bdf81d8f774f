"""What `train.pack` buys: the same optimizer steps, packed into rows or one conversation per
micro-batch, timed side by side at the real widths.

    python benchmarks/pack.py                     # relief-default.toml's shape on gpt-oss-20b-2l
    python benchmarks/pack.py --recipe recipes/seed-replica.toml --steps 2

The model is `gpt-oss-20b-2l` synthesized in memory (float32, dense experts shared by its two
layers: 7.5 GB), with the recipe's LoRA; the data are the recipe's first `--steps` optimizer
steps of the bundled dataset (real conversations and masks). Each step runs unpacked and packed,
alternating which goes first; the trainer's own micro-step (`make_micro_step`) computes every
micro-batch. Prints and writes (benchmarks/results/pack-BACKEND.json) tokens/s of both and the
loss of each step both ways (equal up to float32 rounding).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relief_mlx.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from relief_mlx.io import write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "relief-default.toml"))
    parser.add_argument("--preset", default="gpt-oss-20b-2l")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from relief_mlx.bench import source
    from relief_mlx.data.harmony import default_tokenizer
    from relief_mlx.doctor import backend
    from relief_mlx.model.load import default_dtype
    from relief_mlx.recipe import load_recipe
    from relief_mlx.train.data import epoch_order, load_splits, micro_batch
    from relief_mlx.train.pack import pack_rows, packed_micro_batch
    from relief_mlx.train.targets import apply_lora
    from relief_mlx.train.trainer import _arrays, make_micro_step

    recipe = load_recipe(args.recipe)
    tc, length = recipe.train, recipe.data.max_length
    splits = load_splits(recipe.data, default_tokenizer(), need_valid=False)
    lengths = [len(e.tokens) for e in splits.train]
    order = epoch_order(lengths, tc.batch_size, tc.seed, 0)
    steps = [order[i * tc.grad_accumulation:(i + 1) * tc.grad_accumulation] for i in range(args.steps)]

    dtype = str(default_dtype()).removeprefix("mlx.core.")
    model = source.build(source.describe(None, args.preset, dtype, shared_experts=True), default_dtype())
    mx.random.seed(tc.seed)
    apply_lora(model, recipe.lora)
    model.train()
    micro_step = make_micro_step(model, tc)

    def run(groups, packed: bool) -> tuple[float, float, int]:
        """(seconds, summed loss, micro-batches) of one optimizer step's micro-batches."""
        rows = pack_rows(groups, lengths, length) if packed else groups
        build = packed_micro_batch if packed else micro_batch
        batches = [_arrays(build(splits.train, row, length, tc.pad_multiple)) for row in rows]
        grads = tree_map(mx.zeros_like, model.trainable_parameters())
        total = 0.0
        mx.synchronize()
        start = time.perf_counter()
        for arrays in batches:
            loss, grads = micro_step(grads, *arrays)
            mx.eval(loss, grads)
            total += loss.item()
        return time.perf_counter() - start, total, len(rows)

    run(steps[0][:1], False)  # warm-up
    rows = []
    for i, groups in enumerate(steps):
        tokens = sum(lengths[j] for g in groups for j in g)
        order_ = (False, True) if i % 2 == 0 else (True, False)
        times = {packed: run(groups, packed) for packed in order_}
        row = {"tokens": tokens} | {name: {"s": times[packed][0], "loss": times[packed][1],
                                           "micro_batches": times[packed][2]}
                                    for name, packed in (("unpacked", False), ("packed", True))}
        rows.append(row)
        u, p = row["unpacked"], row["packed"]
        print(f"step {i + 1}: {tokens} tokens; unpacked {u['micro_batches']} micro-batches {tokens / u['s']:.1f} "
              f"tok/s, packed {p['micro_batches']} rows {tokens / p['s']:.1f} tok/s; "
              f"loss {u['loss']:.4f} / {p['loss']:.4f}", flush=True)
    ratios = [r["unpacked"]["s"] / r["packed"]["s"] for r in rows]
    result = {"recipe": args.recipe, "preset": args.preset, "experts": f"{dtype}, shared by every layer", "steps": rows,
              "speedup": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}
    out = args.out or ROOT / "benchmarks" / "results" / f"pack-{backend(mx)}.json"
    write_json(out, result)
    print(f"packed / unpacked speed: {result['speedup']['median']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) -> {out}")


if __name__ == "__main__":
    main()
