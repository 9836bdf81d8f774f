"""LoRA training throughput and memory: `relief train` against `mlx_lm.lora` and transformers + PEFT.

    python benchmarks/train.py                                  # models/mini, models/mini-hf
    python benchmarks/train.py --model models/mini --hf-model models/mini-hf --steps 4 --ablations

Build the models first (about 10 s):
    relief synth --preset mini --out models/mini-hf
    relief convert models/mini-hf --out models/mini --experts float32 --dtype float32

Every trainer gets the same miniature model, the same examples (the first N conversations of the
train split, rendered and masked once by relief_mlx.data, so the token ids are identical), the
same LoRA (rank 8, alpha 16 on q_proj and v_proj of every layer: the seed run), batch 1, the
same gradient accumulation and max length, AdamW at 1e-4, clipping at 1.0. The trained tokens
are each conversation's last answer (mask "last"), the one region mlx-lm's prompt masking can
express. Each trainer runs in its own fresh process, one after the other; the first optimizer
step (allocation, JIT) is left out of the timing, and tokens/s counts every real input token.

- relief: `relief_mlx.train.train` with a recipe built from these settings.
- mlx-lm: `mlx_lm.tuner.trainer.train` (its Python API: the loop `mlx_lm.lora` runs), its own
  gpt-oss model class, `linear_to_lora_layers`, and the same tokens as (tokens, offset) pairs.
- peft: transformers' GptOssForCausalLM (float32, MXFP4 experts dequantized) with PEFT LoRA,
  a plain PyTorch loop (labels -100 outside the mask), when torch, transformers and peft import.
- --ablations adds relief runs that switch one thing back to find where the difference comes
  from: the full-logit loss (loss_chunk 0, as mlx-lm computes it) and mx.compile.

Every trainer runs --repeats times (3 or more), the trainers alternating round by round so that a
busy moment on a shared machine hits all of them; each figure is the median (min-max) of its
runs, and each "relief is" ratio the median (min-max) of the rounds' ratios (relief's run of
round r over the other's run of round r). Writes benchmarks/results/train-<backend>.json and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

LORA = {"targets": ["self_attn.q_proj", "self_attn.v_proj"], "rank": 8, "alpha": 16.0}
MIN_REPEATS = 3  # a README figure is the median of 3 runs or more, with its spread


# ---------------------------------------------------------------- the shared examples


def examples(spec: dict):
    """The benchmark's examples, tokenized once by relief_mlx.data: (records, tokenized examples)."""
    from relief_mlx.data.dataset import load_dataset, tokenize
    from relief_mlx.data.harmony import HarmonyTokenizer, RenderOptions
    from relief_mlx.recipe import DataSection

    d = DataSection(max_length=spec["max_length"], mask="last")
    records = load_dataset(spec["data"]).splits["train"][: spec["examples"]]
    tok = HarmonyTokenizer.from_dir(spec["model"])
    options = RenderOptions(reasoning_effort=d.reasoning_effort, current_date=d.current_date)
    tokenized = tokenize(records, d.max_length, options, d.mask, tok)
    if tokenized.dropped:
        raise SystemExit(f"{len(tokenized.dropped)} examples do not fit max_length {d.max_length}")
    return records, tokenized.examples


def measured(step_times: list[float], step_tokens: list[int], skip: int) -> dict:
    times, tokens = step_times[skip:], step_tokens[skip:]
    return {"measured_steps": len(times), "tokens": sum(tokens), "seconds": sum(times),
            "tokens_per_s": sum(tokens) / sum(times),
            "median_tokens_per_s": statistics.median(t / s for t, s in zip(tokens, times, strict=True)),
            "first_step_s": sum(step_times[:skip])}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


# ---------------------------------------------------------------- runners (one per process)


def run_relief(spec: dict) -> dict:
    import mlx.core as mx

    from relief_mlx.recipe import from_dict
    from relief_mlx.train import train

    records, _ = examples(spec)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        lines = [Path(r.file).read_text().splitlines()[r.line - 1] for r in records]
        (data / "train.jsonl").write_text("\n".join(lines) + "\n")
        recipe = from_dict({
            "model": {"path": spec["model"]},
            "data": {"path": str(data), "max_length": spec["max_length"], "mask": "last"},
            "lora": LORA,
            "train": {"epochs": 1, "batch_size": 1, "grad_accumulation": spec["accumulation"],
                      "learning_rate": 1e-4, "schedule": "constant", "max_grad_norm": 1.0,
                      "grad_checkpoint": spec["grad_checkpoint"], **spec.get("relief", {})},
            "validation": {"every": -1},
            "output": {"dir": str(Path(tmp) / "run"), "checkpoint_every": 0},
        }, "benchmark")
        steps: list[dict] = []
        train(recipe, on_event=lambda kind, e: steps.append(e) if kind == "step" else None)
    return {**measured([s["step_time_s"] for s in steps], [s["tokens"] for s in steps], 1),
            "peak_memory_gb": mx.get_peak_memory() / 1e9, "peak_rss_gb": peak_rss_gb(),
            "final_loss": steps[-1]["loss"]}


def run_mlx_lm(spec: dict) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    _, exs = examples(spec)
    dataset = [(e.tokens.tolist(), int(e.mask.argmax())) for e in exs]  # trained from offset to the end
    model, _ = load(spec["model"])
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": LORA["rank"], "scale": LORA["alpha"] / LORA["rank"],
                                                     "dropout": 0.0, "keys": LORA["targets"]})
    tokens, times, losses = [], [], []

    def batches(*args, **kwargs):
        for batch, lengths in trainer.iterate_batches(*args, **kwargs):
            tokens.append(int(lengths[:, 1].sum().item()))
            yield batch, lengths

    class Timing(trainer.TrainingCallback):
        def on_train_loss_report(self, info):
            times.append(1 / info["iterations_per_second"])
            losses.append(info["train_loss"])

    n = len(dataset) // spec["accumulation"] * spec["accumulation"]
    with tempfile.TemporaryDirectory() as tmp:
        args = trainer.TrainingArgs(
            batch_size=1, iters=n, steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9,
            max_seq_length=spec["max_length"], adapter_file=str(Path(tmp) / "adapters.safetensors"),
            grad_checkpoint=spec["grad_checkpoint"], grad_accumulation_steps=spec["accumulation"])
        opt = optim.AdamW(learning_rate=1e-4, weight_decay=0.0)
        mx.reset_peak_memory()
        trainer.train(model, opt, dataset, None, args, iterate_batches=batches, training_callback=Timing())
    step_times = [sum(times[i:i + spec["accumulation"]]) for i in range(0, n, spec["accumulation"])]
    step_tokens = [sum(tokens[i:i + spec["accumulation"]]) for i in range(0, n, spec["accumulation"])]
    return {**measured(step_times, step_tokens, 1), "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "peak_rss_gb": peak_rss_gb(), "final_loss": losses[-1]}


def run_peft(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Mxfp4Config

    _, exs = examples(spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["hf_model"], dtype=torch.float32,
                                                 quantization_config=Mxfp4Config(dequantize=True))
    if spec["grad_checkpoint"]:
        model.gradient_checkpointing_enable()
    model = get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=int(LORA["alpha"]), lora_dropout=0.0,
                                             target_modules=[t.split(".")[-1] for t in LORA["targets"]]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    a = spec["accumulation"]
    n = len(exs) // a * a
    step_times, step_tokens, loss = [], [], None
    for start in range(0, n, a):
        tic, count = time.perf_counter(), 0
        for e in exs[start:start + a]:
            ids = torch.tensor(e.tokens[None].astype("int64"))
            labels = ids.clone()
            labels[0, ~torch.tensor(e.mask)] = -100  # HF shifts labels itself: label i is token i
            loss = model(input_ids=ids, labels=labels).loss
            (loss / a).backward()
            count += len(e.tokens)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        step_times.append(time.perf_counter() - tic)
        step_tokens.append(count)
    return {**measured(step_times, step_tokens, 1), "peak_memory_gb": None, "peak_rss_gb": peak_rss_gb(),
            "final_loss": float(loss), "torch_threads": torch.get_num_threads()}


RUNNERS = {"relief": run_relief, "mlx_lm": run_mlx_lm, "peft": run_peft}
ABLATIONS = {
    "relief, full-logit loss (loss_chunk 0)": {"loss_chunk": 0},
    "relief, mx.compile (pad to 32)": {"compile": True, "pad_multiple": 32},
}


# ---------------------------------------------------------------- orchestration


def child(name: str, runner: str, spec: dict) -> dict:
    """Run one trainer in a fresh process; its last stdout line is the JSON result."""
    print(f"[{name}] running ...", file=sys.stderr, flush=True)
    tic = time.perf_counter()
    env = dict(os.environ)
    if runner == "peft":  # PyTorch brings its own BLAS; relief's OpenBLAS preload only oversubscribes it
        env.pop("LD_PRELOAD", None)
    done = subprocess.run([sys.executable, __file__, "--child", runner, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise SystemExit(f"[{name}] failed:\n" + "\n".join(tail))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - tic
    print(f"[{name}] {result['tokens_per_s']:.1f} tokens/s, peak RSS {result['peak_rss_gb']:.2f} GB",
          file=sys.stderr, flush=True)
    return result


def importable(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def combine(results: list[dict]) -> dict:
    """Repeats of one trainer: every figure as the median (min-max) of the runs, each run kept."""
    from relief_mlx.bench.stats import summarize

    figures = ("tokens_per_s", "peak_memory_gb", "peak_rss_gb", "final_loss", "first_step_s")
    out = {k: summarize([r[k] for r in results]) for k in figures if results[0][k] is not None}
    return out | {"runs": results}


def paired(ours: dict, theirs: dict, key: str) -> dict:
    """ours / theirs, round by round (round r of both ran back to back), as median (min-max)."""
    from relief_mlx.bench.stats import paired_ratio

    return paired_ratio(ours[key], theirs[key])


def _cell(s: dict | None, fmt: str) -> str:
    if s is None:
        return "n/a"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def table(runs: dict[str, dict], reference: str) -> str:
    n = len(runs[reference]["runs"])
    lines = ["| trainer | tokens/s | peak MLX memory (GB) | peak RSS (GB) | relief/this, tokens/s |",
             "|---|---:|---:|---:|---:|"]
    for name, r in runs.items():
        x = paired(runs[reference], r, "tokens_per_s")
        ratio = "" if name == reference else f"{x['median']:.2f}x ({x['min']:.2f}-{x['max']:.2f})"
        lines.append(f"| {name} | {_cell(r['tokens_per_s'], '.1f')} | {_cell(r.get('peak_memory_gb'), '.2f')} | "
                     f"{_cell(r['peak_rss_gb'], '.2f')} | {ratio} |")
    return "\n".join(lines + ["", f"median (min-max) of {n} runs per trainer, alternated round by round"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/mini", help="converted MLX mini (float32 experts on CPU)")
    parser.add_argument("--hf-model", default="models/mini-hf", help="the same model in the HF layout (for PEFT)")
    parser.add_argument("--data", default="datasets/emergency_relief")
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps (after 1 warm-up step)")
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS,
                        help=f"alternating rounds of every trainer (median and min-max; at least {MIN_REPEATS})")
    parser.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing in every trainer")
    parser.add_argument("--ablations", action="store_true", help="also run the relief ablations")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/train-<backend>.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(RUNNERS[args.child](json.loads(args.spec))))
        return
    if args.repeats < MIN_REPEATS:
        parser.error(f"--repeats {args.repeats}: a median needs {MIN_REPEATS} runs or more")

    from relief_mlx.blas import ensure_fast_blas

    ensure_fast_blas()  # children inherit the preload
    import mlx.core as mx

    backend = "cpu" if mx.default_device() == mx.cpu else "gpu"
    spec = {"model": args.model, "hf_model": args.hf_model, "data": args.data, "max_length": args.max_length,
            "accumulation": args.accumulation, "examples": (args.steps + 1) * args.accumulation,
            "grad_checkpoint": args.grad_checkpoint}
    plan = {"relief": ("relief", spec), "mlx-lm": ("mlx_lm", spec)}
    if importable("torch", "transformers", "peft") and Path(args.hf_model).is_dir():
        plan["transformers+peft"] = ("peft", spec)
    if args.ablations:
        plan |= {name: ("relief", {**spec, "relief": o}) for name, o in ABLATIONS.items()}
    results: dict[str, list[dict]] = {name: [] for name in plan}
    for round_ in range(args.repeats):  # alternate, so a busy moment on a shared machine hits everyone
        for name, (runner, s) in plan.items():
            results[name].append(child(f"{name} #{round_ + 1}", runner, s))
    runs = {name: combine(r) for name, r in results.items()}
    ours = runs["relief"]
    ratios = {f"relief / {name} tokens/s": paired(ours, r, "tokens_per_s")
              for name, r in runs.items() if name != "relief"}
    ratios["relief / mlx-lm peak MLX memory"] = paired(ours, runs["mlx-lm"], "peak_memory_gb")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "backend": backend, "device": str(mx.default_device()),
                    "LD_PRELOAD": os.environ.get("LD_PRELOAD"), "load_average_after": os.getloadavg()},
        "config": {**spec, "lora": LORA, "batch_size": 1, "optimizer": "AdamW lr 1e-4, clip 1.0", "mask": "last",
                   "repeats": args.repeats},
        "runs": runs,
        "ratios": ratios,
    }
    from relief_mlx.io import write_json

    out = args.out or ROOT / "benchmarks" / "results" / f"train-{backend}.json"
    write_json(out, result)
    print(table(runs, "relief"))
    print("\n".join(f"{k}: {_cell(v, '.2f')}" for k, v in ratios.items()))
    print(f"results -> {out}")


if __name__ == "__main__":
    main()
