"""Generation speed: relief-mlx's loop against mlx-lm's `stream_generate`, same model, one process.

    python benchmarks/generate.py        # mini, gpt-oss-20b-2l -> benchmarks/results/generate-cpu.json
    python benchmarks/generate.py --presets mini --trials 5 --prompt-tokens 1024 --new-tokens 256

Each preset is built in memory with random weights through the loader's `build_model` (the
dtypes `relief_mlx.load` gives: float32 on CPU, MXFP4 experts; gpt-oss-20b-2l takes ~6 GB).
Each trial runs every loop greedily from the same random prompt on the same model object, in
rotating order and from an empty buffer cache, so noise on a shared machine hits all alike;
the table shows medians over trials and, as ratios, the median and range of the per-trial
(paired) ratios, which drift in the machine's load cancels out of.

- prefill tokens/s: prompt tokens / time to the first generated token;
- decode tokens/s: (new tokens - 1) / time from the first token to the last;
- ours is measured with the Harmony stream parser fed every token (what `relief generate`
  does before printing), mlx-lm through `stream_generate` (which detokenizes every token),
  and, to tell the loop from the text handling, through its bare `generate_step` too;
- bandwidth limit: bytes one decode step must read (lm_head, attention, norms, router, the k
  chosen experts, one embedding row, the KV cache at the mean context) over the read bandwidth
  of a 1 GiB MLX reduction measured here; "% of limit" is decode tokens/s over that limit.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from relief_mlx import blas  # noqa: E402  (no mlx import before the BLAS re-exec)

DEFAULTS = {  # preset -> (prompt tokens, new tokens): longer than the 128-token window
    "mini": (512, 128),
    "gpt-oss-20b-2l": (256, 32),
}


def build_in_memory(preset: str, seed: int = 0) -> Any:
    """A random-weight model of `preset` in memory, through the loader's `build_model`.

    Dense weights are U(-a, a) with variance 1/fan_in (synth's scale), in bf16 as a converted
    checkpoint stores them; experts are MXFP4 with random 4-bit codes and a shared exponent
    that gives the same scale. Drawing the codes directly takes seconds where quantizing dense
    experts takes minutes on CPU (and `mx.quantize` of all 32 experts of the 20b shapes at once
    needs ~34 GB, which is why `relief synth gpt-oss-20b-2l` fails on a 24 GB host).
    """
    import math

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from relief_mlx.checkpoint.mxfp4 import QUANTIZATION
    from relief_mlx.checkpoint.presets import hf_config
    from relief_mlx.model.gpt_oss import Model, ModelArgs
    from relief_mlx.model.load import build_model

    config = {**hf_config(preset), "quantization": QUANTIZATION}
    shapes = [(name, p.shape) for name, p in tree_flatten(Model(ModelArgs.from_dict(config)).parameters())]
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    weights: dict[str, mx.array] = {}
    for (name, shape), key in zip(shapes, keys, strict=True):
        def uniform(std: float, shape: tuple[int, ...] = shape, key: mx.array = key) -> mx.array:
            return mx.random.uniform(-std * 3**0.5, std * 3**0.5, shape, key=key)

        if ".mlp.experts." in name and name.endswith(".weight"):
            experts, rows, fan_in = shape  # dense (E, out, in); MXFP4 packs 8 codes per uint32
            weights[name] = mx.random.randint(0, 2**32 - 1, (experts, rows, fan_in // 8), dtype=mx.uint32, key=key)
            # FP4 codes have RMS ~2.93; 2**(s - 127) brings them to 1/sqrt(fan_in)
            exponent = 127 + round(math.log2(fan_in**-0.5 / 2.93))
            weights[name.replace(".weight", ".scales")] = mx.full((experts, rows, fan_in // 32), exponent, mx.uint8)
        elif name.endswith("bias"):
            weights[name] = uniform(0.02).astype(mx.bfloat16)
        elif "norm" in name:
            weights[name] = (1 + uniform(0.05)).astype(mx.bfloat16)
        elif name.endswith("sinks"):
            weights[name] = uniform(1.0).astype(mx.bfloat16)
        else:
            weights[name] = uniform(shape[-1] ** -0.5).astype(mx.bfloat16)
        mx.eval(weights[name])
    model = build_model(config, weights)
    del weights
    mx.eval(model.parameters())
    return model


def load_tokenizer() -> Any:
    """mlx-lm's TokenizerWrapper of gpt-oss's o200k_harmony (built offline), as `relief_mlx.load` makes."""
    import tempfile

    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    from relief_mlx.checkpoint.presets import EOS_ID
    from relief_mlx.checkpoint.tokenizer import write_tokenizer_files

    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer_files(Path(folder))
        return mlx_lm_load_tokenizer(Path(folder), eos_token_ids=[EOS_ID])


def read_bandwidth_gbs(trials: int = 3) -> dict[str, float]:
    """Read bandwidth (GB/s, median of `trials`) of two 1 GiB float32 reductions on the default
    device: MLX's own sum, and a matrix-vector product (BLAS on CPU, the way lm_head reads)."""
    import mlx.core as mx

    a = mx.ones((1 << 28,), dtype=mx.float32)
    m, v = a.reshape(-1, 4096), mx.ones((4096,), dtype=mx.float32)
    out = {}
    for name, op in (("sum", lambda: a.sum()), ("matvec", lambda: m @ v)):
        mx.eval(op())
        times = []
        for _ in range(trials):
            start = time.perf_counter()
            mx.eval(op())
            times.append(time.perf_counter() - start)
        out[name] = a.nbytes / statistics.median(times) / 1e9
    return out


def decode_bytes(model: Any, context: int) -> dict[str, int]:
    """Bytes one decode step reads, by part, at `context` tokens in the cache."""
    from mlx.utils import tree_flatten

    args = model.args
    k, experts = args.num_experts_per_tok, args.num_local_experts
    parts = {"lm_head": 0, "attention+norms+router": 0, "experts (k of E)": 0, "embedding row": 0}
    for name, p in tree_flatten(model.parameters()):
        if name.startswith("model.embed_tokens"):
            parts["embedding row"] += p.nbytes // p.shape[0]
        elif name.startswith("lm_head"):
            parts["lm_head"] += p.nbytes
        elif ".mlp.experts." in name:
            parts["experts (k of E)"] += p.nbytes * k // experts
        else:
            parts["attention+norms+router"] += p.nbytes
    itemsize = model.lm_head.weight.dtype.size
    per_token = 2 * args.num_key_value_heads * args.head_dim * itemsize  # keys + values
    windows = [context if t == "full_attention" else min(context, args.sliding_window)
               for t in model.model.layer_types]
    parts["kv cache"] = per_token * sum(windows)
    parts["total"] = sum(parts.values())
    return parts


def run_ours(model: Any, harmony: Any, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    from relief_mlx.generate.harmony_stream import HarmonyStream
    from relief_mlx.generate.loop import generate_tokens

    stream, tokens = HarmonyStream(harmony.decode), []
    start = time.perf_counter()
    for step in generate_tokens(model, prompt, max_tokens=n):
        if step.n == 1:
            first = time.perf_counter()
        stream.feed(step.token)
        tokens.append(step.token)
    return first - start, time.perf_counter() - first, tokens


def run_mlx_lm(model: Any, tokenizer: Any, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    from mlx_lm.generate import stream_generate

    tokens = []
    start = time.perf_counter()
    for response in stream_generate(model, tokenizer, prompt, max_tokens=n):
        if not tokens:
            first = time.perf_counter()
        tokens.append(response.token)
    return first - start, time.perf_counter() - first, tokens


def run_mlx_lm_step(model: Any, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """mlx-lm's bare token generator (no detokenizing, no stop check): its loop alone."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    tokens = []
    start = time.perf_counter()
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        if not tokens:
            first = time.perf_counter()
        tokens.append(token)
    return first - start, time.perf_counter() - first, tokens


def bench_preset(preset: str, tokenizer: Any, trials: int, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    import mlx.core as mx
    import numpy as np

    from relief_mlx.data.harmony import HarmonyTokenizer

    print(f"building {preset} in memory", flush=True)
    model = build_in_memory(preset)
    harmony = HarmonyTokenizer.from_any(tokenizer)
    never_stop = copy.copy(tokenizer)
    never_stop._eos_token_ids = set()  # both loops make exactly new_tokens tokens
    prompt = np.random.default_rng(0).integers(0, 199_998, prompt_tokens).tolist()
    runners = {"ours": lambda: run_ours(model, harmony, prompt, new_tokens),
               "mlx_lm": lambda: run_mlx_lm(model, never_stop, prompt, new_tokens),
               "mlx_lm_step": lambda: run_mlx_lm_step(model, prompt, new_tokens)}
    results: dict[str, dict[str, list[float]]] = {name: {"prefill_tps": [], "decode_tps": []} for name in runners}
    tokens: dict[str, list[int]] = {}
    run_ours(model, harmony, prompt[:64], 4)  # warm-up: allocator, thread pools
    run_mlx_lm(model, never_stop, prompt[:64], 4)
    bandwidths: list[dict[str, float]] = []
    mx.reset_peak_memory()
    for trial in range(trials):
        bandwidths.append(read_bandwidth_gbs())  # every trial: the machine's load drifts
        order = list(runners)[trial % 3:] + list(runners)[:trial % 3]  # each goes first in turn
        for name in order:
            mx.clear_cache()  # both start from an empty buffer cache (mlx-lm clears it as it runs)
            prefill_s, decode_s, tokens[name] = runners[name]()
            results[name]["prefill_tps"].append(prompt_tokens / prefill_s)
            results[name]["decode_tps"].append((new_tokens - 1) / decode_s)
            print(f"  {preset} trial {trial} {name:6s} prefill {prompt_tokens / prefill_s:8.1f} tok/s  "
                  f"decode {(new_tokens - 1) / decode_s:7.2f} tok/s", flush=True)
    medians = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    paired = {k: sorted(a / b for a, b in zip(results["ours"][k], results["mlx_lm"][k], strict=True))
              for k in ("prefill_tps", "decode_tps")}
    paired_step = sorted(a / b for a, b in zip(results["ours"]["decode_tps"], results["mlx_lm_step"]["decode_tps"],
                                               strict=True))
    bandwidth = statistics.median(max(b.values()) for b in bandwidths)
    bytes_read = decode_bytes(model, prompt_tokens + new_tokens // 2)
    limit = bandwidth * 1e9 / bytes_read["total"]
    return {
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "trials": trials,
        "dtype": str(model.lm_head.weight.dtype), "runs": results, "median": medians,
        "ratio": {k: medians["ours"][k] / medians["mlx_lm"][k] for k in paired},
        "paired_ratio": {k: {"median": statistics.median(v), "min": v[0], "max": v[-1]} for k, v in paired.items()},
        "decode_ratio_vs_generate_step": {"median": statistics.median(paired_step), "min": paired_step[0],
                                          "max": paired_step[-1]},
        "same_tokens": tokens["ours"] == tokens["mlx_lm"] == tokens["mlx_lm_step"],
        "decode_bytes_per_token": bytes_read,
        "read_bandwidth_gbs": {"per_trial": bandwidths, "median_of_best": bandwidth},
        "bandwidth_limit_tps": limit,
        "fraction_of_limit": {name: m["decode_tps"] / limit for name, m in medians.items()},
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }


def table(results: dict[str, Any]) -> str:
    """Markdown table; ratios are medians of per-trial (paired) ratios, with their range."""
    head = ("| preset | prompt/new | prefill tok/s ours | mlx-lm | ratio (range) | decode tok/s ours | mlx-lm "
            "| ratio (range) | mlx-lm generate_step | ratio (range) | bytes/token | limit tok/s | ours % of limit "
            "| mlx-lm % | same tokens |")
    rows = [head, "|" + "---|" * 15]
    for preset, r in results["presets"].items():
        m, frac, p = r["median"], r["fraction_of_limit"], r["paired_ratio"]
        rows.append(
            f"| {preset} | {r['prompt_tokens']}/{r['new_tokens']} | {m['ours']['prefill_tps']:.1f} "
            f"| {m['mlx_lm']['prefill_tps']:.1f} | {_span(p['prefill_tps'])} | {m['ours']['decode_tps']:.2f} "
            f"| {m['mlx_lm']['decode_tps']:.2f} | {_span(p['decode_tps'])} "
            f"| {m['mlx_lm_step']['decode_tps']:.2f} | {_span(r['decode_ratio_vs_generate_step'])} "
            f"| {r['decode_bytes_per_token']['total'] / 1e6:.0f} MB | {r['bandwidth_limit_tps']:.2f} "
            f"| {frac['ours']:.0%} | {frac['mlx_lm']:.0%} | {r['same_tokens']} |")
    return "\n".join(rows)


def _span(paired: dict[str, float]) -> str:
    return f"{paired['median']:.2f} ({paired['min']:.2f}-{paired['max']:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(DEFAULTS), choices=list(DEFAULTS))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, help="Override every preset's prompt length.")
    parser.add_argument("--new-tokens", type=int, help="Override every preset's generated tokens.")
    parser.add_argument("--out", type=Path, help="Default: benchmarks/results/generate-<backend>.json")
    args = parser.parse_args()

    import mlx.core as mx

    from relief_mlx import doctor
    from relief_mlx.io import write_json

    backend = doctor.backend(mx)
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "backend": backend, "cpu": doctor.cpu_model(), "usable_cores": blas.usable_cpus(),
        "platform": platform.platform(), "versions": doctor.versions(),
        "blas": blas.blas_info() if sys.platform == "linux" else None,
        "load_average_start": os.getloadavg(),
    }
    results["presets"] = {}
    tokenizer = load_tokenizer()
    for preset in args.presets:
        prompt_tokens, new_tokens = DEFAULTS[preset]
        results["presets"][preset] = bench_preset(
            preset, tokenizer, args.trials, args.prompt_tokens or prompt_tokens, args.new_tokens or new_tokens)
    results["load_average_end"] = os.getloadavg()
    out = args.out or ROOT / "benchmarks" / "results" / f"generate-{backend}.json"
    write_json(out, results)
    print(table(results))
    print(f"results -> {out}")


if __name__ == "__main__":
    blas.ensure_fast_blas()
    main()
