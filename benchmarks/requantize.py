"""The README's re-quantization figures: how much of a LoRA delta survives when the MXFP4 experts it
touches are re-quantized after merging (what mlx-lm's fuse does; `relief fuse --requantize`
measures it and refuses unless the loss is accepted), and what one bf16 rounding keeps.

    python benchmarks/requantize.py          # -> benchmarks/results/requantize.json

1. mini, a trained adapter: `recipes/mini.toml` (LoRA r16/alpha 32 on attention and every expert,
   30 steps on the bundled data) trained on the float32 conversion of a synthesized mini
   checkpoint, then merged into the MXFP4 conversion of the same checkpoint.
2. gpt-oss-20b's real expert shape: 4 of a layer's 32 experts, gate_proj 2880 x 2880, random
   MXFP4 weights as `relief synth` makes them, LoRA r16 scale 2 with B drawn so that the delta's
   norm is 0.1%, 1% and 10% of the weight's.

Every figure is `relief_mlx.export.fuse.merge`'s own: `delta_kept` = <stored delta, delta> /
||delta||^2 (the share of the delta that survives, along itself) and `delta_error` =
||stored delta - delta|| / ||delta||, over the touched modules.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from relief_mlx.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()  # re-executes once with OpenBLAS preloaded on a Linux CPU, as `relief` does

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from relief_mlx.checkpoint.convert import convert  # noqa: E402
from relief_mlx.checkpoint.mxfp4 import QUANTIZATION  # noqa: E402
from relief_mlx.checkpoint.synth import synth  # noqa: E402
from relief_mlx.export.fuse import Adapter, base_and_adapter, merge  # noqa: E402
from relief_mlx.io import write_json  # noqa: E402
from relief_mlx.recipe import load_recipe  # noqa: E402
from relief_mlx.train import train  # noqa: E402


def _summary(records) -> dict:
    return {"modules": len(records),
            "delta_over_weight_mean": float(np.mean([r.delta_size for r in records])),
            "delta_kept_mean": float(np.mean([r.delta_kept for r in records])),
            "delta_kept_min": float(min(r.delta_kept for r in records)),
            "delta_error_mean": float(np.mean([r.delta_error for r in records])),
            "delta_error_max": float(max(r.delta_error for r in records))}


def trained_mini(work: Path, iterations: int) -> dict:
    hf = synth("mini", work / "mini-hf")
    f32 = convert(hf, work / "mini-f32", experts="float32", dtype="float32")
    mxfp4 = convert(hf, work / "mini-mxfp4")
    run = work / "adapter"
    recipe = load_recipe(ROOT / "recipes" / "mini.toml", [
        f"model.path={f32}", f"output.dir={run}", f"data.path={ROOT / 'datasets' / 'emergency_relief'}",
        f"train.iterations={iterations}", "output.checkpoint_every=0"])
    train(recipe)
    _, config, weights, adapter = base_and_adapter(mxfp4, run)
    out = {}
    for mode in ("requantize", "dequantize"):
        _, records = merge(weights, adapter, config, mode)
        for kind in sorted({r.kind for r in records}):
            out[f"{mode}: {kind}"] = _summary([r for r in records if r.kind == kind])
    return out


def real_shape(ratios: tuple[float, ...], experts: int = 4, size: int = 2880, rank: int = 16,
               scale: float = 2.0) -> dict:
    mx.random.seed(0)
    module = "model.layers.0.mlp.experts.gate_proj"
    dense = mx.random.normal((experts, size, size)) / math.sqrt(size)  # synth's N(0, 1/fan_in)
    weight, scales = mx.quantize(dense, **QUANTIZATION)
    weights = {f"{module}.weight": weight, f"{module}.scales": scales,
               f"{module}.bias": mx.zeros((experts, size), dtype=mx.bfloat16)}
    config = {"quantization": dict(QUANTIZATION)}
    a = mx.random.uniform(-1 / math.sqrt(size), 1 / math.sqrt(size), (experts, rank, size))  # mlx-lm's init
    out = {}
    for ratio in ratios:
        b = mx.random.normal((experts, size, rank)) * ratio / (scale * math.sqrt(rank / 3))
        adapter = Adapter(Path("synthetic"), {}, scale, rank, {module: (a, b)})
        delta = adapter.delta(module)
        measured = float(mx.sqrt(mx.sum(delta * delta) / mx.sum(dense * dense)))
        entry = {"delta_over_weight": measured}
        for mode in ("requantize", "dequantize"):
            _, records = merge(weights, adapter, config, mode)
            entry[mode] = _summary(records)
            mx.clear_cache()  # each merge allocates a few float32 copies of the projection
        out[f"{ratio:g}"] = entry
        print(f"|delta|/|W| {measured:.4f}: relative error of the stored delta: re-quantized "
              f"{entry['requantize']['delta_error_mean']:.3f}, bf16 {entry['dequantize']['delta_error_mean']:.4f}",
              flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30, help="Training steps of the mini adapter.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "requantize.json")
    args = parser.parse_args()
    mx.set_cache_limit(1 << 30)
    real = real_shape((0.001, 0.01, 0.1))
    mx.clear_cache()
    with tempfile.TemporaryDirectory() as work:
        mini = trained_mini(Path(work), args.iterations)
    for name, figures in mini.items():
        print(f"mini, trained ({name}, |delta|/|W| {figures['delta_over_weight_mean']:.4f}): relative error of "
              f"the stored delta {figures['delta_error_mean']:.3f} (max {figures['delta_error_max']:.3f})")
    result = {"mini_trained": mini, "gpt_oss_20b_expert_shape": real}
    write_json(args.out, result)
    print(f"results -> {args.out}")


if __name__ == "__main__":
    main()
