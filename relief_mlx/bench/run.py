"""`relief bench`: one function that measures a model the way the README reports it.

`run_bench(config)` reads top to bottom: check that the model fits (before allocating anything),
describe the machine, measure its memory bandwidth, build the model, time generation, put every
decode figure next to the bandwidth limit (a share above 100% is recorded as a measurement error),
time a LoRA step, compare with mlx-lm. It returns plain JSON-able values; `report` turns them
into a table, a JSON file and a chart.
"""

from __future__ import annotations

import os
import platform
import shlex
import time
from dataclasses import asdict, dataclass, fields

import mlx.core as mx

from ..choices import DTYPES
from ..errors import ReliefError
from ..generate.loop import DEFAULT_PREFILL_CHUNK
from ..memory import train_forecast
from ..model.load import default_dtype
from . import memory, source
from .generation import Say, bench_generation
from .stats import paired_ratio
from .training import bench_training, memory_breakdown, train_shape

FORMAT = "relief-bench/1"
COMPARE = ("mlx-lm",)


@dataclass(frozen=True)
class BenchConfig:
    """One bench run; each field is a `relief bench` option."""

    model: str | None = None
    """Converted checkpoint folder or Hub id (exactly one of model and preset)."""
    preset: str | None = None
    """Preset whose shapes get random weights in memory (experts MXFP4): mini, gpt-oss-20b-2l, -6l, gpt-oss-20b."""
    experts: str | None = None
    """A preset's experts: mxfp4 (default, as published) or the dtype the model runs in (dequantized)."""
    shared_experts: bool = False
    """Every layer holds layer 0's dense experts: timing a deep float32 model in less memory."""
    dtype: str | None = None
    """Float weights: float32, bfloat16 or float16 (default: the backend's, float32 on the CPU)."""
    prompt_lengths: tuple[int, ...] = (128, 512, 2048)
    """Prompt lengths whose prefill is timed; decode follows the shortest."""
    gen_lengths: tuple[int, ...] = (128, 512)
    """Generated tokens whose decode is timed."""
    trials: int = 3
    """Timed trials of every figure (median and min-max reported)."""
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    """Prompt tokens per forward pass, for both loops."""
    training: bool = True
    """Also time a LoRA training step."""
    recipe: str | None = None
    """Recipe whose [lora] and [train] shape the training step; default: the seed replica's."""
    train_seq: int | None = None
    """Tokens per training sequence (default: the recipe's data.max_length, else 512)."""
    compare: tuple[str, ...] = ()
    """Also run these implementations on the same model: mlx-lm."""
    seed: int = 0
    """Seed of the random weights, prompts and LoRA initialization."""
    bandwidth_mib: int | None = None
    """Largest array the bandwidth probe reads, MiB (also half and a quarter of it); default:
    16x the last-level cache, at least 256 MiB (2 GiB on a GPU)."""

    def __post_init__(self) -> None:
        for name in ("prompt_lengths", "gen_lengths"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ReliefError(f"--{name.replace('_', '-')} {','.join(map(str, values))!r} is not valid; "
                                  "give whole numbers of 1 or more, comma-separated")
        for name in ("trials", "prefill_chunk", "bandwidth_mib"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ReliefError(f"--{name.replace('_', '-')} {getattr(self, name)} is not valid; use 1 or more")
        if self.train_seq is not None and self.train_seq < 16:
            raise ReliefError(f"--train-seq {self.train_seq} is too short; use 16 tokens or more")
        if self.dtype not in (None, *DTYPES):
            raise ReliefError(f"--dtype {self.dtype} is not valid; choose one of {', '.join(DTYPES)}")
        unknown = [c for c in self.compare if c not in COMPARE]
        if unknown:
            raise ReliefError(f"--compare {unknown[0]} is not supported; choose one of {', '.join(COMPARE)}")


    def command(self) -> str:
        """The `relief bench` command line that runs this configuration (options left at their
        defaults omitted)."""
        words = ["relief", "bench"]
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            option = "--" + f.name.replace("_", "-")
            if f.name == "training":
                words.append("--no-training")
            elif f.name == "compare":
                words += [w for c in value for w in (option, c)]
            elif isinstance(value, bool):
                words.append(option)
            else:
                words += [option, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
        return shlex.join(words)


def run_bench(config: BenchConfig, say: Say | None = None) -> dict:
    """Measure generation (and LoRA training) speed and memory of one model; see module doc."""
    say = say or (lambda message: None)
    src = source.describe(config.model, config.preset, config.experts, config.dtype, config.shared_experts)
    dtype = getattr(mx, config.dtype) if config.dtype else default_dtype()
    dtype_bytes = dtype.size
    shape = train_shape(config.recipe, config.train_seq) if config.training else None

    # -- refuse before allocating anything
    context = max(max(config.prompt_lengths), min(config.prompt_lengths) + max(config.gen_lengths) + 1)
    work = memory.Workload(context, config.prefill_chunk, shape.tokens if shape else 0)
    needed = memory.needed_bytes(src.config, dtype_bytes, src.mxfp4, work)
    if src.shared_experts:  # one layer's expert arrays serve every layer
        c = src.config
        spared = (c["num_hidden_layers"] - 1) * c["num_local_experts"] * memory.expert_bytes(c, dtype_bytes, False)
        needed = needed | {"weights": needed["weights"] - spared, "total": needed["total"] - spared}
    available = memory.available_memory()
    memory.check_fits(src.label, needed, available)

    # -- the machine and its memory bandwidth
    from ..doctor import diagnose

    say("machine: versions, BLAS, matmul")
    machine = diagnose()
    load_before = _load_average()
    say("memory bandwidth")
    bandwidth = memory.measure_bandwidth(config.bandwidth_mib and config.bandwidth_mib * memory.MIB)

    # -- the model
    say(f"model: building {src.label}")
    mx.reset_peak_memory()
    tic = time.perf_counter()
    model = source.build(src, dtype, config.seed)
    model_info = {
        "source": src.label, "dtype": str(dtype).removeprefix("mlx.core."),
        "experts": "mxfp4" if src.mxfp4 else "dense",
        "architecture": {k: src.config.get(k) for k in (
            "num_hidden_layers", "hidden_size", "intermediate_size", "num_local_experts",
            "num_experts_per_tok", "num_attention_heads", "num_key_value_heads", "head_dim",
            "sliding_window", "vocab_size")},
        "weights_bytes": mx.get_active_memory(),
        "build_peak_bytes": mx.get_peak_memory(),
        "build_s": time.perf_counter() - tic,
    }

    # -- mlx-lm runs its own model on the same weight arrays
    models = {"relief": model} | {name: source.mlx_lm_model(model, src.config) for name in config.compare}

    # -- generation, each decode figure against the bandwidth limit
    generation = bench_generation(models, config.prompt_lengths, config.gen_lengths, config.trials,
                                  config.prefill_chunk, config.seed, say)
    for runner, rows in generation.items():
        for row in rows["decode"]:
            _add_roofline(row, src.config, dtype_bytes, src.mxfp4, bandwidth["limit_gbps"], runner)

    # -- training
    training = None
    if shape is not None:
        from ..train.targets import apply_lora

        for m in models.values():  # the same LoRA initialization on each
            mx.random.seed(config.seed)
            apply_lora(m, shape.lora)
        training = {"shape": shape.to_dict(),
                    "runners": bench_training(models, shape, config.trials, config.seed, say)}
        say("training: memory breakdown (body and loss head alone)")
        training["memory"] = {
            "forecast": train_forecast(src.config, dtype_bytes, src.mxfp4, shape.step_shape(model)),
            "measured": memory_breakdown(model, shape, config.seed) | {
                "weights": model_info["weights_bytes"],
                "peak": training["runners"]["relief"]["peak_memory_bytes"],
                "allocator_cache": training["runners"]["relief"]["cache_bytes"]},
        }

    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": config.command(),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "machine": machine | {"node": platform.node(), "load_average": {"before": load_before,
                                                                         "after": _load_average()}},
        "memory_check": {"needed_bytes": needed, "available_bytes": available[0], "available_source": available[1]},
        "model": model_info,
        "bandwidth": bandwidth,
        "generation": {"prefill_chunk": config.prefill_chunk, "runners": generation},
        "training": training,
        "ratios": _ratios(generation, training) if config.compare else None,
    }


def _load_average() -> float | None:
    """The 1-minute load average: other work on the machine, which slows every figure."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _add_roofline(row: dict, config: dict, dtype_bytes: int, mxfp4: bool, limit_gbps: float, runner: str) -> None:
    """Bytes read per decoded token (averaged over the run) and their place under the bandwidth
    limit (`memory.decode_share`)."""
    parts = memory.mean_decode_bytes(config, dtype_bytes, mxfp4, row["prompt_tokens"], row["generated_tokens"])
    row["bytes_per_token"] = {k: round(v) for k, v in parts.items()}
    row |= memory.decode_share(row, limit_gbps, f"{runner} decode of {row['generated_tokens']} tokens")


def _ratios(generation: dict, training: dict | None) -> dict:
    """relief / mlx-lm: tokens/s trial by trial (above 1 is faster), peak memory (below 1 is leaner)."""
    ours, theirs = generation["relief"], generation["mlx-lm"]

    def pair(a: dict, b: dict, **key) -> dict:
        return key | {"tokens_per_s": paired_ratio(a["tokens_per_s"], b["tokens_per_s"]),
                      "peak_memory": a["peak_memory_bytes"] / b["peak_memory_bytes"]}

    out = {
        "prefill": [pair(a, b, prompt_tokens=a["prompt_tokens"])
                    for a, b in zip(ours["prefill"], theirs["prefill"], strict=True)],
        "decode": [pair(a, b, generated_tokens=a["generated_tokens"])
                   for a, b in zip(ours["decode"], theirs["decode"], strict=True)],
    }
    if training is not None:
        out["training"] = pair(training["runners"]["relief"], training["runners"]["mlx-lm"])
    return out
