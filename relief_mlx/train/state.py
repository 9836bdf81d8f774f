"""What a run writes, atomically, and how `--resume` reads it back.

    RUN/adapter_config.json, adapters.safetensors   the last adapter (mlx-lm's format)
    RUN/best/                                      the adapter with the best validation loss
    RUN/checkpoint/                                adapters.safetensors, optimizer.safetensors, state.json
    RUN/recipe.toml, metrics.jsonl, summary.json

The checkpoint folder is rebuilt under a temporary name and renamed over the old one only when
complete (`io.atomic_dir`), so a crash or a full disk while saving leaves the previous one whole.
Each checkpoint and best/ ends with a manifest (the sha256 of its files), so a torn or changed
file is found and named when it is read. The swap is two renames (checkpoint -> .checkpoint.old-*,
new -> checkpoint): a crash between them leaves no `checkpoint/`, and `recover` (at `--resume`)
puts the newest complete copy back in its place. metrics.jsonl grows one fsynced line per step
(`io.append_line`); a line torn by a crash is dropped when the run resumes.
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
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from ..checkpoint.safetensors_header import check
from ..errors import ReliefError, ReliefWarning, WriteError
from ..io import MANIFEST, append_line, atomic_dir, atomic_path, check_manifest, read_json, recover_dir, write_manifest
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
    with atomic_dir(run / BEST, overwrite=True, lock=False) as tmp:  # the run's lock covers it
        save_arrays(tmp / ADAPTER_WEIGHTS, adapter_weights(model))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        write_manifest(tmp, {"format": FORMAT})


def save_checkpoint(run: Path, model: nn.Module, optimizer: optim.Optimizer, run_state: RunState,
                    identity: dict) -> None:
    """Replace RUN/checkpoint atomically; on failure the previous checkpoint stays as it was."""
    try:
        with atomic_dir(run / CHECKPOINT, overwrite=True, lock=False) as tmp:  # the run's lock covers it
            save_arrays(tmp / ADAPTER_WEIGHTS, adapter_weights(model))
            save_arrays(tmp / OPTIMIZER, dict(tree_flatten(optimizer.state)))
            (tmp / STATE).write_text(json.dumps({"format": FORMAT, "identity": identity,
                                                 "progress": asdict(run_state)}) + "\n")
            write_manifest(tmp, {"format": FORMAT})
    except WriteError as e:
        raise ReliefError(f"could not write {run / CHECKPOINT} at step {run_state.step}: {e.reason}; "
                          f"{intact(run)} once there is space") from e


def is_run(run: Path) -> bool:
    """Whether the folder holds a relief run (so --overwrite may clear it)."""
    return any((run / name).exists() for name in (RECIPE, METRICS, CHECKPOINT))


def clear(run: Path) -> None:
    """Empty a run folder for `relief train --overwrite` (the caller holds its lock)."""
    for entry in run.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def checkpoint_step(run: Path) -> int | None:
    """The step of RUN's checkpoint, or None when it has none that can be read."""
    try:
        step = json.loads((run / CHECKPOINT / STATE).read_text())["progress"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def intact(run: Path) -> str:
    """What is left to continue from after a failure, and how: the end of a one-line error."""
    step = checkpoint_step(run)
    if step is None and not (run / RECIPE).is_file():
        return "nothing of the run was written yet: run the same command again"
    if step is None:
        return f"no checkpoint was written yet: start it again with `relief train --resume {run}` (from step 0)"
    return f"the checkpoint of step {step} is intact: continue with `relief train --resume {run}`"


def recover(run: Path) -> None:
    """After a crash, put the newest complete copy of checkpoint/ and best/ in place (a crash
    between the two renames of a swap leaves the new one as .NAME.partial-*, the old as
    .NAME.old-*); each repair is a ReliefWarning. Rank 0, holding the run's lock."""
    for name in (CHECKPOINT, BEST):
        if done := recover_dir(run / name):
            warnings.warn(done, ReliefWarning, stacklevel=2)


def read_checkpoint(run: Path) -> tuple[dict, dict[str, mx.array], dict[str, mx.array]] | None:
    """(state.json, adapter tensors, optimizer tensors) of RUN's checkpoint; None when the run has
    none yet (it stopped before its first). A torn or changed file is named."""
    folder = run / CHECKPOINT
    if not folder.exists():
        return None
    files = [folder / STATE, folder / ADAPTER_WEIGHTS, folder / OPTIMIZER]
    fix = f"no complete copy is left to resume from: start the run over with `relief train {run / RECIPE} --overwrite`"
    problem = check_manifest(folder) if (folder / MANIFEST).is_file() else None  # older runs have none
    missing = [f.name for f in files if not f.is_file()]
    if problem or missing:
        raise ReliefError(f"{problem or f'{folder} lacks ' + ', '.join(missing)}; {fix}")
    state = read_json(files[0], fix=fix)
    if state.get("format") != FORMAT:
        raise ReliefError(f"{files[0]} is not a relief-mlx training checkpoint (format {state.get('format')!r})")
    check_progress(state.get("progress"), files[0])
    return state, load_arrays(check(files[1])), load_arrays(check(files[2]))


def check_progress(progress: object, file: Path, examples: int | None = None) -> RunState:
    """The RunState that state.json's `progress` holds; refused in one line naming the field when a
    count is negative or not a whole number, a field is unknown, or the batch order names an
    example the training split (of `examples`) does not have."""
    names = {f.name for f in fields(RunState)}
    if not isinstance(progress, dict) or set(progress) - names:
        raise ReliefError(f"{file}: progress is not what relief-mlx writes; the checkpoint is damaged")
    for name, value in progress.items():
        if name in ("order", "losses", "val_losses"):
            ok = isinstance(value, list)
        elif name in ("best_loss", "elapsed_s"):
            ok = (value is None and name == "best_loss") or (isinstance(value, int | float)
                                                              and not isinstance(value, bool))
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not ok:
            raise ReliefError(f"{file}: progress.{name} = {value!r} is not valid; the checkpoint is damaged")
    for batch in progress.get("order", []):
        if not isinstance(batch, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i and
                                                  (examples is None or i < examples) for i in batch):
            raise ReliefError(f"{file}: progress.order names an example the training split does not have "
                              f"({batch!r:.60}); the checkpoint is damaged")
    return RunState(**progress)


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
    """Keep metrics.jsonl records up to the resumed step, so no step appears twice; a line a crash
    tore (or anything else that is not a record) is dropped."""
    file = run / METRICS
    if not file.is_file():
        return
    kept = []
    for line in file.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict) and isinstance(record.get("step", 0), int) and record.get("step", 0) <= last_step:
            kept.append(json.dumps(record) + "\n")
    with atomic_path(file) as tmp:
        tmp.write_text("".join(kept), encoding="utf-8")


def append_metrics(run: Path, record: dict[str, Any]) -> None:
    append_line(run / METRICS, json.dumps(record))
