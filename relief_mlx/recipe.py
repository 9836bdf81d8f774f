"""A training run in one object: frozen dataclasses, loaded from TOML, overridden with `--set`.

Precedence: `--set section.key=value` over the recipe file over the defaults below. TOML
sections and keys map 1:1 to the dataclasses and their fields; an unknown section or key, or a
value of the wrong type, is an error that names the key and the file. The resolved recipe is
written next to the run's outputs (`recipe.toml`) and reloads to the same object.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .choices import DTYPES, MASK_MODES, REASONING_EFFORTS
from .errors import ReliefError, shown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SCHEDULES = ("cosine", "linear", "constant")
MAX_RECIPE_BYTES = 1 << 20


def _check(ok: bool, key: str, value: Any, need: str) -> None:
    if not ok:
        raise ReliefError(f"{key} = {value!r:.80} is invalid: it must be {need}")


@dataclass(frozen=True)
class ModelSection:
    """The frozen base model."""

    path: str
    """Converted MLX checkpoint folder (`relief convert`) or a Hub id of one."""
    dtype: str = "auto"
    """Dtype of the frozen float weights: auto (float32 on CPU, bfloat16 on GPUs), float32, bfloat16, float16."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "model.path", self.path, "a converted checkpoint folder or Hub id")
        _check(self.dtype in ("auto", *DTYPES), "model.dtype", self.dtype, f"one of auto, {', '.join(DTYPES)}")


@dataclass(frozen=True)
class DataSection:
    """What is trained on, and how conversations become tokens."""

    path: str = "datasets/emergency_relief"
    """Folder with train.jsonl and valid.jsonl, a .jsonl file, or a Hub dataset id."""
    max_length: int = 512
    """Longest example in tokens; longer ones lose early turns, then prompt tokens, never the answer."""
    mask: str = "final"
    """Trained tokens: final (every assistant answer), last (the last one), final+analysis, all."""
    reasoning_effort: str = "low"
    """`Reasoning:` line of the rendered system message: low, medium or high."""
    current_date: str = "2025-08-05"
    """`Current date:` of the rendered system message, fixed so tokens reproduce."""
    skip_invalid: bool = False
    """Skip (and count) bad JSON lines instead of stopping at the first one."""

    def __post_init__(self) -> None:
        _check(self.max_length >= 16, "data.max_length", self.max_length, "at least 16")
        _check(self.mask in MASK_MODES, "data.mask", self.mask, f"one of {', '.join(MASK_MODES)}")
        _check(self.reasoning_effort in REASONING_EFFORTS, "data.reasoning_effort", self.reasoning_effort,
               f"one of {', '.join(REASONING_EFFORTS)}")


@dataclass(frozen=True)
class LoraSection:
    """Which layers get a low-rank update, and its size."""

    targets: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    """Module names in each layer (fnmatch): self_attn.q_proj, self_attn.*, mlp.experts.* (a LoRA per expert)."""
    layers: int = -1
    """How many of the last layers get LoRA; -1 means every layer."""
    rank: int = 8
    """Rank r of each update B @ A."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank, as in PEFT."""
    dropout: float = 0.0
    """Dropout on the LoRA input (0 disables it)."""

    def __post_init__(self) -> None:
        _check(len(self.targets) > 0, "lora.targets", list(self.targets), "a non-empty list of module patterns")
        _check(self.layers == -1 or self.layers >= 1, "lora.layers", self.layers, "-1 (all) or at least 1")
        _check(self.rank >= 1, "lora.rank", self.rank, "at least 1")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "positive")
        _check(0 <= self.dropout < 1, "lora.dropout", self.dropout, "in [0, 1)")


@dataclass(frozen=True)
class TrainSection:
    """The optimization."""

    epochs: int = 1
    """Passes over the training split (used when iterations is 0)."""
    iterations: int = 0
    """Optimizer steps to run; when above 0 it replaces epochs and the data loops as needed."""
    batch_size: int = 1
    """Examples per micro-batch (examples of similar length share one, to pad little)."""
    grad_accumulation: int = 1
    """Micro-batches per optimizer step, over all machines together (a multiple of their number)."""
    learning_rate: float = 1e-4
    """Peak learning rate of AdamW."""
    schedule: str = "cosine"
    """After warmup: cosine (to min_learning_rate), linear (to 0, as transformers' Trainer) or constant."""
    warmup_steps: int = 0
    """Steps of linear warmup from learning_rate / warmup_steps to learning_rate."""
    min_learning_rate: float = 0.0
    """Where the cosine schedule ends."""
    weight_decay: float = 0.0
    """Decoupled AdamW weight decay (PyTorch's AdamW in transformers' Trainer: 0)."""
    betas: tuple[float, ...] = (0.9, 0.999)
    """AdamW's beta1 and beta2."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    grad_checkpoint: bool = False
    """Recompute each layer's activations in the backward pass: less memory, ~30% more time."""
    compile: bool = False
    """Compile the micro-step with mx.compile: one trace per padded shape (raise pad_multiple); no CPU gain measured."""
    loss_chunk: int = 128
    """Trained positions per lm_head chunk in the loss; 0 computes all logits (plain cross-entropy)."""
    pad_multiple: int = 1
    """Pad micro-batches to a multiple of this many tokens; raise it (e.g. 32) with compile, to retrace less."""
    seed: int = 0
    """Seeds LoRA initialization, dropout and the data order."""
    max_bad_steps: int = 3
    """Stop after this many consecutive steps with a NaN/inf loss or gradient (each one is skipped)."""
    pack: bool = False
    """Pack each step's conversations into rows of data.max_length tokens: the same update, fewer micro-batches."""
    memory_check: bool = True
    """Forecast the step's memory before loading the model and refuse a run the machine cannot hold."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", self.epochs, "at least 1")
        _check(self.iterations >= 0, "train.iterations", self.iterations, "0 (use epochs) or more")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "at least 1")
        _check(self.grad_accumulation >= 1, "train.grad_accumulation", self.grad_accumulation, "at least 1")
        _check(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "positive")
        _check(self.schedule in SCHEDULES, "train.schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "0 or more")
        _check(0 <= self.min_learning_rate <= self.learning_rate, "train.min_learning_rate",
               self.min_learning_rate, "between 0 and learning_rate")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "0 or more")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
               list(self.betas), "two numbers in [0, 1)")
        _check(self.eps > 0, "train.eps", self.eps, "positive")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "0 (off) or more")
        _check(self.loss_chunk >= 0, "train.loss_chunk", self.loss_chunk, "0 (all logits) or more")
        _check(self.pad_multiple >= 1, "train.pad_multiple", self.pad_multiple, "at least 1")
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", self.max_bad_steps, "at least 1")


@dataclass(frozen=True)
class ValidationSection:
    """Validation loss, early stopping and the best adapter."""

    every: int = 0
    """Validate every N optimizer steps; 0 at the end of each epoch; -1 never. Always at the end too, unless -1."""
    max_batches: int = 0
    """Validation micro-batches per evaluation; 0 uses the whole valid split."""
    patience: int = 0
    """Stop after this many validations without a new best loss; 0 never stops early."""

    def __post_init__(self) -> None:
        _check(self.every >= -1, "validation.every", self.every, "-1 (never), 0 (each epoch) or a step count")
        _check(self.max_batches >= 0, "validation.max_batches", self.max_batches, "0 (all) or more")
        _check(self.patience >= 0, "validation.patience", self.patience, "0 (off) or more")


@dataclass(frozen=True)
class OutputSection:
    """Where the run writes, and how often."""

    dir: str = "adapters/run"
    """Run folder: adapter, best/, checkpoint/, recipe.toml, metrics.jsonl, summary.json."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every N optimizer steps (and at the end, and on Ctrl-C); 0 only then."""
    report_every: int = 1
    """Report progress every N optimizer steps (metrics.jsonl gets every step)."""

    def __post_init__(self) -> None:
        _check(bool(self.dir), "output.dir", self.dir, "a folder path")
        _check(self.checkpoint_every >= 0, "output.checkpoint_every", self.checkpoint_every, "0 or more")
        _check(self.report_every >= 1, "output.report_every", self.report_every, "at least 1")


# --- eval (relief_mlx.eval) ---
@dataclass(frozen=True)
class EvalSection:
    """`relief eval` at the end of a run: the base model against the run's best adapter, into RUN/eval/."""

    enabled: bool = False
    """Evaluate when training ends (data.path's split below must carry key_facts)."""
    split: str = "test"
    """Split of data.path to answer and score."""
    limit: int = 0
    """Evaluate at most this many items, spread over the categories; 0 means all."""
    categories: tuple[str, ...] = ()
    """Only these categories; empty means all."""
    max_tokens: int = 1024
    """Most tokens per answer, reasoning included."""
    batch_size: int = 8
    """Answers decoded together (and examples per teacher-forced forward pass)."""
    seed: int = 0
    """Seed of the bootstrap resamples behind the confidence intervals."""

    def __post_init__(self) -> None:
        _check(bool(self.split), "eval.split", self.split, "a split name, e.g. test")
        _check(self.limit >= 0, "eval.limit", self.limit, "0 (all) or more")
        _check(self.max_tokens >= 1, "eval.max_tokens", self.max_tokens, "at least 1")
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "at least 1")
# --- end eval ---


@dataclass(frozen=True)
class Recipe:
    """One complete run. Sections are TOML tables of the same names."""

    model: ModelSection
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    output: OutputSection = field(default_factory=OutputSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: {k: list(v) if isinstance(v, tuple) else v
                         for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
                for f in dataclasses.fields(self)}


SECTIONS: dict[str, type] = typing.get_type_hints(Recipe)


# ---------------------------------------------------------------- typing of values


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """`value` as the field's type, or an error naming the key; ints are accepted for floats."""
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if not isinstance(value, list | tuple):
            raise ReliefError(f"{key} must be a list of {item.__name__}, not {type(value).__name__} {value!r:.80}")
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 1e300 else math.inf
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise ReliefError(f"{key} must be a finite number, not {value!r}")
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ReliefError(f"{key} must be {kind.__name__}, not {type(value).__name__} {value!r:.80}")
    return value


def _section(name: str, table: Any, where: str) -> Any:
    cls = SECTIONS[name]
    if not isinstance(table, dict):
        raise ReliefError(f"{where}: [{name}] must be a table of keys, not {type(table).__name__}")
    types = _field_types(cls)
    unknown = sorted(set(table) - set(types))
    if unknown:
        raise ReliefError(f"{where}: unknown key {name}.{shown(unknown[0])}; known keys of [{name}]: "
                          f"{', '.join(types)}")
    values = {k: _coerce(v, types[k], f"{name}.{k}") for k, v in table.items()}
    return cls(**values)


def from_dict(tables: dict[str, Any], where: str = "recipe") -> Recipe:
    """A validated Recipe from nested tables (a parsed TOML file); errors name `where` and the key."""
    unknown = sorted(set(tables) - set(SECTIONS))
    if unknown:
        raise ReliefError(f"{where}: unknown section [{shown(unknown[0])}]; sections are {', '.join(SECTIONS)}")
    try:
        model = tables.get("model", {})
        if not isinstance(model, dict) or "path" not in model:
            raise ReliefError('model.path is missing; add [model] path = "models/..." or --set model.path=DIR')
        return Recipe(**{name: _section(name, tables[name], where) for name in SECTIONS if name in tables})
    except ReliefError as e:
        message = str(e)
        raise ReliefError(message if message.startswith(where) else f"{where}: {message}") from None


# ---------------------------------------------------------------- files and overrides


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); the value is read as TOML, else as a string."""
    target, sep, raw = text.partition("=")
    section, dot, key = target.strip().partition(".")
    if not sep or not dot or not key:
        raise ReliefError(f"--set {text!r} is not section.key=value; write e.g. --set train.learning_rate=2e-4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = raw.strip()  # a bare word or path: --set model.path=models/mini
    return section, key.strip(), value


def apply_overrides(tables: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    tables = {k: dict(v) if isinstance(v, dict) else v for k, v in tables.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        tables.setdefault(section, {})
        if isinstance(tables[section], dict):
            tables[section][key] = value
    return tables


def read_tables(path: str | Path) -> dict[str, Any]:
    """The tables of a recipe file; a name that is no file here may be a bundled recipe (`mini.toml`)."""
    from . import bundled

    path = bundled.resolve("recipes", path)
    if not path.is_file():
        raise ReliefError(f"recipe {path} does not exist; pass a TOML file or a bundled recipe "
                          f"({', '.join(bundled.names('recipes'))})")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ReliefError(f"{path} is {path.stat().st_size:,} bytes, too large for a recipe (at most "
                          f"{MAX_RECIPE_BYTES:,}); pass the recipe's TOML file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ReliefError(f"{path} is not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ReliefError(f"{path} is not valid TOML ({e}); fix that line") from None
    except RecursionError:
        raise ReliefError(f"{path} nests TOML tables or arrays too deeply to be a recipe; fix it") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply `--set` overrides, validate; errors name the key and the file."""
    where = str(path) + (" with --set" if overrides else "")
    return from_dict(apply_overrides(read_tables(path), list(overrides)), where)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON strings are TOML basic strings
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML; `load_recipe` reads it back to an equal Recipe."""
    lines = ["# Resolved recipe of this run (defaults, file and --set applied). Rerun: relief train THIS_FILE"]
    for name, table in recipe.to_dict().items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
