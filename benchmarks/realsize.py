"""Every real-width figure of the README's "gpt-oss-20b's real widths" section, in one go.

    python benchmarks/realsize.py                   # everything (about 3 h on a quiet 2-core CPU)
    python benchmarks/realsize.py --skip speed-2l-shared --trials 3
    python benchmarks/realsize.py --fit-only        # refit the JSON already in --out-dir

Each run is its own `relief bench` process (OpenBLAS preloaded, a fresh allocator), writing
`realsize-BACKEND-RUN.json` into --out-dir:

  speed-2l         gpt-oss-20b-2l, dense float32 experts, relief vs mlx-lm: prefill
                   128 tokens, decode 32, the seed replica's LoRA step (r8 q/v, 1 x 512, checkpointing)
  speed-2l-shared  the same with every layer holding layer 0's experts: shows sharing times like
                   distinct experts (so 6l-shared stands for 6 real layers)
  speed-6l-shared  gpt-oss-20b-6l, experts shared (6 distinct float32 layers would need 24 GB)
  mxfp4-2l/-6l/-24l  generation as a CPU user runs the published checkpoint (MXFP4 experts, the rest
                   in relief's CPU default float32), relief vs mlx-lm: prefill 128, decode 32; at 24
                   layers (16.2 GiB) the whole gpt-oss-20b, which checks the extrapolation
  memory-2l/-6l    bfloat16, relief's LoRA step memory part by part; experts dense and shared (MLX's
                   CPU MXFP4 matmul in bf16 takes ~80 s a projection: hours a step); the expert
                   activations have the shapes of the GPU's gather path, and the 24-layer weights
                   are counted exactly with MXFP4 experts (12.8 GiB)
  head             in this process: the work no layer does, alone (each runner's loss head; the
                   lm_head and argmax of one token)

Then, per runner and figure, time(L) = head + L x per_layer: per_layer from the 2l and 6l
medians, checked by computing (time(L) - head) / L at 2 and 6 layers from each run's min-max
(the two must overlap), and extrapolated to 24 layers; relief's step memory at 24 layers from
the 2l/6l breakdown (weights and LoRA state exactly, activations linearly in L). Results:
`realsize-BACKEND.json` and the README table `realsize-BACKEND.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relief_mlx.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from relief_mlx.io import write_json, write_text  # noqa: E402

GIB = 2**30
TARGET_GIB = 14.5
DENSE = ["--dtype", "float32", "--experts", "float32"]
SPEED = ["--compare", "mlx-lm", "--prompt-lengths", "128", "--gen-lengths", "32"]
PUBLISHED = ["--dtype", "float32", "--experts", "mxfp4", "--no-training", *SPEED]
MEMORY = ["--dtype", "bfloat16", "--experts", "bfloat16", "--shared-experts",
          "--prompt-lengths", "16", "--gen-lengths", "1", "--trials", "1"]
RUNS = {
    "speed-2l": ["--preset", "gpt-oss-20b-2l", *DENSE, *SPEED],
    "speed-2l-shared": ["--preset", "gpt-oss-20b-2l", *DENSE, "--shared-experts", *SPEED],
    "speed-6l-shared": ["--preset", "gpt-oss-20b-6l", *DENSE, "--shared-experts", *SPEED],
    "mxfp4-2l": ["--preset", "gpt-oss-20b-2l", *PUBLISHED],
    "mxfp4-6l": ["--preset", "gpt-oss-20b-6l", *PUBLISHED],
    "mxfp4-24l": ["--preset", "gpt-oss-20b", *PUBLISHED],
    "memory-2l": ["--preset", "gpt-oss-20b-2l", *MEMORY],
    "memory-6l": ["--preset", "gpt-oss-20b-6l", *MEMORY],
}


def bench(name: str, out: Path, trials: int) -> None:
    extra = [] if name.startswith("memory") else ["--trials", str(trials)]
    command = [sys.executable, "-m", "relief_mlx", "bench", *RUNS[name], *extra, "--out", str(out)]
    print(f"{name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    print(f"{name}: {(time.perf_counter() - start) / 60:.1f} min", file=sys.stderr, flush=True)


def _timed(fn, trials: int) -> dict:
    mx.eval(fn())
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def heads(tokens: int, trials: int) -> dict:
    """Seconds of the work outside the layers, float32 at the real widths: each runner's loss head
    (value and gradient on `tokens` trained positions) and one token's lm_head and argmax."""
    from relief_mlx.checkpoint.presets import hf_config
    from relief_mlx.train.loss import chunked_cross_entropy

    config = hf_config("gpt-oss-20b")
    d, v = config["hidden_size"], config["vocab_size"]
    head = nn.Linear(d, v, bias=False)
    h = mx.random.normal((tokens, d))
    targets = mx.random.randint(0, v, (tokens,))
    mx.eval(head.parameters(), h, targets)
    relief = mx.value_and_grad(lambda h: chunked_cross_entropy(head, h, targets, mx.ones(tokens), 128))
    mlx_lm = mx.value_and_grad(lambda h: nn.losses.cross_entropy(head(h), targets).mean())
    one = h[:1][None]  # (1, 1, D)
    token = _timed(lambda: mx.argmax(head(one)[:, -1], axis=-1), 5 * trials)
    return {"train": {"relief": _timed(lambda: relief(h), trials), "mlx-lm": _timed(lambda: mlx_lm(h), trials)},
            "token": {"relief": token, "mlx-lm": token}}


def _figures(result: dict) -> dict[str, dict[str, dict]]:
    """{figure: {runner: seconds (median, min, max)}}: a LoRA step (when the run trained), a
    128-token prefill, a decoded token."""
    gen = result["generation"]["runners"]
    out: dict[str, dict[str, dict]] = {"train": {}, "prefill": {}, "decode": {}}
    if result.get("training"):
        for runner, r in result["training"]["runners"].items():
            out["train"][runner] = r["step_s"]
    else:
        del out["train"]
    for runner in gen:
        out["prefill"][runner] = gen[runner]["prefill"][0]["ttft_s"]
        speed = gen[runner]["decode"][0]["tokens_per_s"]
        out["decode"][runner] = {"median": 1 / speed["median"], "min": 1 / speed["max"], "max": 1 / speed["min"]}
    return out


def fit(two: dict, six: dict, head: dict, tokens: dict[str, int]) -> dict:
    """time(L) = head + L x per_layer for each figure and runner; the check and the 24-layer figures."""
    a, b = _figures(two), _figures(six)
    out = {}
    for figure in a:
        rows = {}
        for runner in a[figure]:
            t2, t6 = a[figure][runner], b[figure][runner]
            h = head["train" if figure == "train" else "token"][runner]["median"]
            per_layer = (t6["median"] - t2["median"]) / 4
            at2 = [(t2[k] - h) / 2 for k in ("min", "median", "max")]
            at6 = [(t6[k] - h) / 6 for k in ("min", "median", "max")]
            t24 = h + 24 * per_layer
            rows[runner] = {"head_s": h, "per_layer_s": per_layer, "fitted_head_s": t2["median"] - 2 * per_layer,
                            "per_layer_at_2l_s": at2, "per_layer_at_6l_s": at6,
                            "agree": at2[0] <= at6[2] and at6[0] <= at2[2], "time_24l_s": t24,
                            "tokens_per_s_24l": tokens[figure] / t24}
        rows["ratio"] = {"per_layer": rows["mlx-lm"]["per_layer_s"] / rows["relief"]["per_layer_s"],
                         "at_24l": rows["mlx-lm"]["time_24l_s"] / rows["relief"]["time_24l_s"],
                         "at_2l": a[figure]["mlx-lm"]["median"] / a[figure]["relief"]["median"]}
        out[figure] = rows
    return out


def memory_24(two: dict, six: dict) -> dict:
    """relief's seed-replica step memory at 24 layers, from the 2l and 6l breakdowns (bytes)."""
    from relief_mlx.checkpoint.convert import mlx_config
    from relief_mlx.checkpoint.presets import hf_config
    from relief_mlx.memory import weight_bytes

    m2, m6 = two["training"]["memory"]["measured"], six["training"]["memory"]["measured"]
    per_layer = {k: (m6[k] - m2[k]) / 4 for k in ("activations", "lora_state")}
    weights = weight_bytes(mlx_config(hf_config("gpt-oss-20b"), "mxfp4"), 2, True)
    parts = {
        "weights": weights,
        "lora_state": m2["lora_state"] + 22 * per_layer["lora_state"],
        "activations": m2["activations"] + 22 * per_layer["activations"],
        "loss_head": max(m2["loss_head"], m6["loss_head"]),
    }
    above = [r["training"]["memory"]["measured"]["peak"] - r["model"]["weights_bytes"] for r in (two, six)]
    return {
        "measured_2l": m2, "measured_6l": m6, "estimate_24l": parts,
        # the peak above the weights grows linearly in layers (each keeps its input; the rest is fixed)
        "peak_24l": weights + above[0] + 22 * (above[1] - above[0]) / 4,
        "forecast_24l": _forecast_24(),
        "target": TARGET_GIB * GIB,
    }


def _forecast_24() -> dict:
    from relief_mlx.bench.training import SEED_REPLICA_LORA, SEED_REPLICA_SEQ, SEED_REPLICA_TRAIN
    from relief_mlx.checkpoint.convert import mlx_config
    from relief_mlx.checkpoint.presets import hf_config
    from relief_mlx.memory import StepShape, train_forecast
    from relief_mlx.train.targets import trainable_parameters

    config = mlx_config(hf_config("gpt-oss-20b"), "mxfp4")
    seq = SEED_REPLICA_SEQ
    shape = StepShape(seq, seq, seq, trainable_parameters(config, SEED_REPLICA_LORA),
                      SEED_REPLICA_TRAIN.grad_checkpoint, SEED_REPLICA_TRAIN.loss_chunk)
    return train_forecast(config, 2, True, shape)


def measured_24(result: dict) -> dict:
    """The whole model's figures as measured: {figure: {runner: median tokens/s, "ratio": the
    bench's trial-by-trial relief/mlx-lm ratio (median, min, max)}}."""
    gen, ratios = result["generation"]["runners"], result["ratios"]
    out = {}
    for figure in ("prefill", "decode"):
        out[figure] = {runner: gen[runner][figure][0]["tokens_per_s"]["median"] for runner in gen}
        out[figure]["ratio"] = {k: ratios[figure][0]["tokens_per_s"][k] for k in ("median", "min", "max")}
    return out


def table(fitted: dict, measured: dict | None = None) -> list[str]:
    """One row per figure: per-layer costs, the 2l/6l check, 24 layers extrapolated (and measured)."""
    names = {"train": "LoRA step (seed replica, 512 tokens)", "prefill": "prefill 128 tokens (to first token)",
             "decode": "decode, per token (after 128)"}
    lines = ["| figure | relief per layer | mlx-lm per layer | per-layer ratio | 2 and 6 layers agree | "
             "relief at 24 layers | mlx-lm at 24 layers | ratio at 24 layers | ratio measured at 2 layers |"
             + (" measured at 24 layers: relief / mlx-lm, ratio trial by trial |" if measured else ""),
             "|---|---:|---:|---:|---|---:|---:|---:|---:|" + ("---:|" if measured else "")]
    for figure, rows in fitted.items():
        r, m, q = rows["relief"], rows["mlx-lm"], rows["ratio"]
        agree = "yes" if r["agree"] and m["agree"] else "NO"
        row = (f"| {names[figure]} | {r['per_layer_s']:.3g} s | {m['per_layer_s']:.3g} s | "
               f"{q['per_layer']:.2f}x | {agree} | {r['tokens_per_s_24l']:.3g} tok/s | "
               f"{m['tokens_per_s_24l']:.3g} tok/s | {q['at_24l']:.2f}x | {q['at_2l']:.2f}x |")
        if measured:
            got = measured[figure]
            q = got["ratio"]
            row += (f" {got['relief']:.3g} / {got['mlx-lm']:.3g} tok/s, **{q['median']:.2f}x** "
                    f"({q['min']:.2f}-{q['max']:.2f}) |")
        lines.append(row)
    return lines


def markdown(fitted: dict, memory: dict | None, sharing: dict | None, published: dict | None = None,
             published_24: dict | None = None) -> str:
    lines = ["Dense float32 experts (shared by all layers):", "", *table(fitted)]
    if published:
        lines += ["", "The published format (MXFP4 experts, the rest float32, as `relief convert` writes "
                  "and relief loads on the CPU), generation only:", "", *table(published, published_24)]
    if sharing:
        lines += ["", "Shared experts time like distinct ones (2 layers, median s): "
                  + ", ".join(f"{f} {r}: {sharing[f][r][0]:.3g} vs {sharing[f][r][1]:.3g}"
                              for f in sharing for r in sharing[f])]
    if memory:
        e = memory["estimate_24l"]
        lines += ["", "| relief seed-replica step memory, GiB | 2 layers (measured) | 6 layers (measured) | "
                  "24 layers (estimate) | forecast (relief_mlx.memory) |", "|---|---:|---:|---:|---:|"]
        for part in ("weights", "activations", "loss_head", "lora_state"):
            m2 = memory["measured_2l"][part] if part != "weights" else None
            m6 = memory["measured_6l"][part] if part != "weights" else None
            cells = [f"{x / GIB:.2f}" if x is not None else "" for x in (m2, m6)]
            lines.append(f"| {part.replace('_', ' ')} | {cells[0]} | {cells[1]} | {e[part] / GIB:.2f} | "
                         f"{memory['forecast_24l'][part] / GIB:.2f} |")
        m2, m6, f24 = memory["measured_2l"]["peak"], memory["measured_6l"]["peak"], memory["forecast_24l"]["total"]
        lines.append(f"| peak | {m2 / GIB:.2f} | {m6 / GIB:.2f} | {memory['peak_24l'] / GIB:.2f} "
                     f"(target {TARGET_GIB}) | {f24 / GIB:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--trials", type=int, default=3, help="timed trials of every speed figure (default 3)")
    parser.add_argument("--skip", nargs="*", default=[], choices=[*RUNS, "head"],
                        help="runs to skip (reuse their JSON)")
    parser.add_argument("--fit-only", action="store_true", help="run nothing; fit the JSON in --out-dir")
    args = parser.parse_args()

    from relief_mlx.doctor import backend

    stem = args.out_dir / f"realsize-{backend(mx)}"
    files = {name: Path(f"{stem}-{name}.json") for name in RUNS}
    for name in RUNS:
        if not args.fit_only and name not in args.skip:
            bench(name, files[name], args.trials)
    head_file = Path(f"{stem}-head.json")
    if not args.fit_only and "head" not in args.skip:
        write_json(head_file, heads(512, args.trials))
    results = {name: json.loads(f.read_text()) for name, f in files.items() if f.is_file()}
    head = json.loads(head_file.read_text())
    tokens = {"train": 512, "prefill": 128, "decode": 1}
    two = "speed-2l" if "speed-2l" in results else "speed-2l-shared"  # distinct experts when measured
    if not {two, "speed-6l-shared"} <= set(results):
        print(f"nothing to fit yet: run speed-2l (or speed-2l-shared) and speed-6l-shared into {args.out_dir}")
        return
    fitted = fit(results[two], results["speed-6l-shared"], head, tokens)
    sharing = None
    if {"speed-2l", "speed-2l-shared"} <= set(results):
        a, b = _figures(results["speed-2l"]), _figures(results["speed-2l-shared"])
        sharing = {f: {r: [a[f][r]["median"], b[f][r]["median"]] for r in a[f]} for f in a}
    published = published_24 = None
    if {"mxfp4-2l", "mxfp4-6l"} <= set(results):
        published = fit(results["mxfp4-2l"], results["mxfp4-6l"], head, tokens)
        if "mxfp4-24l" in results:
            published_24 = measured_24(results["mxfp4-24l"])
    both = {"memory-2l", "memory-6l"} <= set(results)
    memory = memory_24(results["memory-2l"], results["memory-6l"]) if both else None
    write_json(f"{stem}.json", {"fit": fitted, "fitted_from": [two, "speed-6l-shared"], "head": head,
                                "published_fit": published, "published_measured_24l": published_24,
                                "sharing": sharing, "memory": memory,
                                "runs": {n: str(f.name) for n, f in files.items() if n in results}})
    write_text(f"{stem}.md", markdown(fitted, memory, sharing, published, published_24))
    print(Path(f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
