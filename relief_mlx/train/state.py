"""What a run writes, atomically, and how `--resume` reads it back.

    RUN/adapter_config.json, adapters.safetensors   the last adapter (mlx-lm's format)
    RUN/best/                                      the adapter with the best validation loss
    RUN/checkpoint/                                adapters.safetensors, optimizer.safetensors, state.json
    RUN/recipe.toml, metrics.jsonl, summary.json

The checkpoint folder is rebuilt under a temporary name and renamed over the old one only when
complete (`io.atomic_dir`), so a crash or a full disk while saving leaves the previous one whole.
The swap is two renames (checkpoint -> .checkpoint.old-PID, new -> checkpoint): a crash between
them leaves no `checkpoint/`, and `read_checkpoint` then takes the intact `.checkpoint.old-*`.
`state.json` holds the step, the epoch, the position in that epoch's micro-batch order (and the
order itself), early-stopping counters, and what the run was trained on: a resume from another
model, recipe or dataset is refused (the length of the run and its validation settings may change:
`--resume RUN --set train.iterations=N` extends a finished run). Random numbers (dropout) are reseeded from (seed, step,
micro-batch) at every micro-step, so the RNG state is the step itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from ..errors import ReliefError
from ..io import atomic_dir, atomic_path
from ..model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

CHECKPOINT, BEST = "checkpoint", "best"
OPTIMIZER, STATE = "optimizer.safetensors", "state.json"
RECIPE, METRICS, SUMMARY = "recipe.toml", "metrics.jsonl", "summary.json"
FORMAT = "relief-mlx-train/1"
# Recipe keys a resume may change: how long the run goes on and how it is validated.
RESUMABLE = {"train": ("epochs", "iterations"), "validation": ("every", "max_batches", "patience")}


@dataclass
class RunState:
    """The loop's position and counters: everything besides weights that a resume needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of `order`
    batch: int = 0  # micro-batches of `order` consumed
    order: list[list[int]] = field(default_factory=list)  # micro-batches of `epoch` (example indices)
    best_loss: float | None = None
    best_step: int = 0
    evals_since_best: int = 0
    bad_steps: int = 0  # consecutive skipped steps (NaN/inf)
    skipped_steps: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    elapsed_s: float = 0.0
    losses: list[list[float]] = field(default_factory=list)  # [step, train loss]
    val_losses: list[list[float]] = field(default_factory=list)  # [step, validation loss]


def save_arrays(path: Path, arrays: dict[str, mx.array]) -> None:
    """safetensors through a file object: MLX appends `.safetensors` to a path without it."""
    with open(path, "wb") as f:
        mx.save_safetensors(f, arrays)


def load_arrays(path: Path) -> dict[str, mx.array]:
    return mx.load(str(path), format="safetensors")


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter(folder: Path, model: nn.Module) -> None:
    """The adapter weights beside `adapter_config.json` (written once when the run starts)."""
    with atomic_path(folder / ADAPTER_WEIGHTS) as tmp:
        save_arrays(tmp, adapter_weights(model))


def save_best(run: Path, model: nn.Module, config: dict) -> None:
    with atomic_dir(run / BEST, overwrite=True) as tmp:
        save_arrays(tmp / ADAPTER_WEIGHTS, adapter_weights(model))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def save_checkpoint(run: Path, model: nn.Module, optimizer: optim.Optimizer, run_state: RunState,
                    identity: dict) -> None:
    """Replace RUN/checkpoint atomically; on failure the previous checkpoint stays as it was."""
    try:
        with atomic_dir(run / CHECKPOINT, overwrite=True) as tmp:
            save_arrays(tmp / ADAPTER_WEIGHTS, adapter_weights(model))
            save_arrays(tmp / OPTIMIZER, dict(tree_flatten(optimizer.state)))
            (tmp / STATE).write_text(json.dumps({"format": FORMAT, "identity": identity,
                                                 "progress": asdict(run_state)}) + "\n")
    except OSError as e:
        kept = _checkpoint_step(_checkpoint_folder(run))
        intact = f"the checkpoint of step {kept} is intact" if kept is not None else "no checkpoint was written yet"
        raise ReliefError(
            f"could not write {run / CHECKPOINT} at step {run_state.step}: {e.strerror or e}; "
            f"{intact}: free disk space and continue with `relief train --resume {run}`"
        ) from e
    for stale in run.glob(f".{CHECKPOINT}.old-*"):  # left by a crash between the swap's renames
        shutil.rmtree(stale, ignore_errors=True)


def _checkpoint_step(folder: Path) -> int | None:
    try:
        return json.loads((folder / STATE).read_text())["progress"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _checkpoint_folder(run: Path) -> Path:
    """RUN/checkpoint, or when a crash fell between the two renames of its swap, the previous
    checkpoint the swap had moved aside (`.checkpoint.old-*`, all of it written and synced)."""
    folder = run / CHECKPOINT
    if folder.exists():
        return folder
    aside = [(_checkpoint_step(f), f) for f in run.glob(f".{CHECKPOINT}.old-*")]
    aside = [(step, f) for step, f in aside if step is not None]
    return max(aside)[1] if aside else folder


def read_checkpoint(run: Path) -> tuple[dict, dict[str, mx.array], dict[str, mx.array]]:
    """(state.json, adapter tensors, optimizer tensors) of RUN's checkpoint."""
    folder = _checkpoint_folder(run)
    files = [folder / STATE, folder / ADAPTER_WEIGHTS, folder / OPTIMIZER]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ReliefError(f"{run} has no complete checkpoint ({folder} lacks {', '.join(missing)}); "
                          "pass a run folder written by `relief train`")
    try:
        state = json.loads(files[0].read_text())
    except ValueError as e:
        raise ReliefError(f"{files[0]} is not valid JSON ({e}); the run folder is damaged") from e
    if state.get("format") != FORMAT:
        raise ReliefError(f"{files[0]} is not a relief-mlx training checkpoint (format {state.get('format')!r})")
    return state, load_arrays(files[1]), load_arrays(files[2])


def identity(model_fingerprint: str, recipe: dict, data_fingerprint: str) -> dict:
    """What a resume must find unchanged: the model, the recipe but for its output and eval sections
    and the `RESUMABLE` keys, and every token of the data."""
    fixed = {section: {k: v for k, v in table.items() if k not in RESUMABLE.get(section, ())}
             for section, table in recipe.items() if section not in ("output", "eval")}
    return {"model": model_fingerprint, "recipe": fixed, "data": data_fingerprint}


def check_identity(run: Path, saved: dict, current: dict) -> None:
    """Refuse to resume a run on another model, recipe or dataset, naming what differs. Recipe
    keys the current identity leaves out are not compared (older checkpoints saved them all)."""
    diff = [f"{s}.{k}" for s, table in current["recipe"].items() for k, v in table.items()
            if saved.get("recipe", {}).get(s, {}).get(k) != v]
    differs = {"model": saved.get("model") != current["model"],
               "recipe": bool(diff), "dataset": saved.get("data") != current["data"]}
    name = next((name for name, changed in differs.items() if changed), None)
    if name is not None:
        detail = f" ({', '.join(diff)} differ)" if name == "recipe" else ""
        raise ReliefError(f"{run} was trained with another {name}{detail}; resume it with the {name} it was "
                          "trained with, or start a new run with another output.dir")


def restore(model: nn.Module, optimizer: optim.Optimizer, adapters: dict[str, mx.array],
            optimizer_state: dict[str, mx.array], run: Path) -> None:
    """Load checkpointed adapter weights and optimizer state into an initialized model/optimizer.

    The state is written into the tree `optimizer.init` built, key by key, so its structure and
    order are the ones every other rank holds (the file's order is its header's, not the tree's).
    """
    for saved, current, what in ((adapters, adapter_weights(model), "adapters"),
                                 (optimizer_state, dict(tree_flatten(optimizer.state)), "optimizer state")):
        if set(saved) != set(current) or any(saved[k].shape != v.shape for k, v in current.items()):
            raise ReliefError(f"{run / CHECKPOINT} holds {what} for other LoRA targets or ranks; "
                              "resume it with the recipe it was trained with")
    model.load_weights(list(adapters.items()), strict=False)
    optimizer.state = tree_map_with_path(lambda key, _: optimizer_state[key], optimizer.state)


def model_fingerprint(path: Path, model: nn.Module) -> str:
    """sha256 of config.json, the weight names and shapes (call it before LoRA is applied) and
    the convert manifest's shard hashes. Dtypes are left out: a run may resume on another device."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for name, value in sorted(tree_flatten(model.parameters())):
        digest.update(f"{name}{tuple(value.shape)}".encode())
    manifest = path / "relief-manifest.json"
    if manifest.is_file():
        digest.update(json.dumps(json.loads(manifest.read_text()).get("outputs", {}), sort_keys=True).encode())
    return digest.hexdigest()


def rewrite_metrics(run: Path, last_step: int) -> None:
    """Keep metrics.jsonl lines up to the resumed step, so no step appears twice."""
    file = run / METRICS
    if not file.is_file():
        return
    lines = [line for line in file.read_text().splitlines()
             if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with atomic_path(file) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))


def append_metrics(run: Path, record: dict[str, Any]) -> None:
    with open(run / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
