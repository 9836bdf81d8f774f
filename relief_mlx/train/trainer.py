"""`relief train`: LoRA fine-tuning of gpt-oss from one Recipe, resumable and data-parallel.

`train()` reads top to bottom: set up (model, LoRA, data, optimizer, resume), then one loop
iteration per optimizer step: accumulate micro-batches, sum over ranks, skip a NaN/inf step,
clip, update, log, validate, checkpoint. The pieces it calls live beside it: `loss` (forward and
the masked, chunked loss head), `data` (batch order, trained positions), `targets` (LoRA),
`schedule`, `state` (what is written and resumed), `distributed`.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .. import hub
from ..data.harmony import HarmonyTokenizer
from ..errors import ReliefError
from ..io import write_json, write_text
from ..memory import forecast_run
from ..model.load import build_model, read_weights
from ..model.lora import ADAPTER_CONFIG
from ..model.moe import gather_only
from ..recipe import Recipe, load_recipe, to_toml
from . import distributed, state
from .data import MicroBatch, Splits, epoch_order, eval_order, load_splits, micro_batch
from .loss import checkpointed_loss_and_grad, cross_entropy_value, hidden_states, loss_sum, plain_loss_sum
from .pack import PackedBatch, pack_rows, packed_micro_batch
from .schedule import learning_rate
from .targets import apply_lora, count_trainable

Event = Callable[[str, dict], None]
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass(frozen=True)
class Result:
    """What a run ended with: its folder, why it stopped, and `summary.json`'s content."""

    run_dir: Path
    status: str  # "finished" | "early_stopped" | "interrupted"
    summary: dict


# ---------------------------------------------------------------- the loop


def train(recipe: Recipe, resume: str | Path | None = None, on_event: Event | None = None) -> Result:
    """Run `recipe` (or continue the run folder `resume` exactly where its checkpoint left off)."""
    group = distributed.world()
    rank, world = group.rank(), group.size()
    emit = on_event if on_event and rank == 0 else (lambda kind, data: None)
    tc, vc = recipe.train, recipe.validation
    run = Path(resume) if resume else Path(recipe.output.dir)
    if tc.grad_accumulation % world:
        raise ReliefError(f"train.grad_accumulation = {tc.grad_accumulation} is not a multiple of the "
                          f"{world} ranks; set it to a multiple of {world}")
    if not resume and rank == 0 and run.exists() and any(run.iterdir()):
        raise ReliefError(f"{run} already holds files; continue that run with --resume {run} "
                          "or choose another output.dir")

    # -- memory: the forecast, or a refusal before anything is loaded
    emit("forecast", forecast_run(recipe))

    # -- model, LoRA, data
    wall = time.perf_counter()
    model_dir, model, tokenizer = _load_model(recipe.model.path, DTYPES.get(recipe.model.dtype))
    identity = {"model": state.model_fingerprint(model_dir, model),
                "recipe": {k: v for k, v in recipe.to_dict().items() if k != "output"}}
    mx.random.seed(tc.seed)  # LoRA A initialization
    adapter_config = apply_lora(model, recipe.lora)
    adapter_config["base_model"] = recipe.model.path
    splits = load_splits(recipe.data, tokenizer, need_valid=vc.every >= 0)
    identity["data"] = splits.fingerprint
    lengths = [len(e.tokens) for e in splits.train]
    micro_per_epoch = math.ceil(len(splits.train) / tc.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tc.grad_accumulation)
    total_steps = tc.iterations or tc.epochs * steps_per_epoch

    # -- optimizer (PyTorch's AdamW: bias correction on), schedule over total_steps
    schedule = learning_rate(tc, total_steps)
    optimizer = optim.AdamW(learning_rate=schedule, betas=list(tc.betas),
                            eps=tc.eps, weight_decay=tc.weight_decay, bias_correction=True)
    optimizer.init(model.trainable_parameters())

    # -- resume, or start the run folder
    progress = state.Progress()
    if resume:
        progress = _resume(run, model, optimizer, identity, group)
    elif rank == 0:
        write_text(run / state.RECIPE, to_toml(recipe))
        write_json(run / ADAPTER_CONFIG, adapter_config)
    micro_step = make_micro_step(model, tc)
    emit("start", {"run": str(run), "steps": total_steps, "start_step": progress.step,
                   "trainable": count_trainable(model), "world": world, "data": splits.counts})
    mx.reset_peak_memory()
    session_start, session_tokens, session_time, status = progress.step, 0, 0.0, "finished"
    if vc.patience and progress.evals_since_best >= vc.patience:
        status = "early_stopped"  # resuming a run that had already stopped early

    # -- one iteration = one optimizer step
    with _stop_requested() as stop:
        while progress.step < total_steps and status == "finished":
            if progress.batch >= len(progress.order):  # next epoch: a fresh shuffled order
                progress.epoch += 1 if progress.order else 0
                progress.order = epoch_order(lengths, tc.batch_size, tc.seed, progress.epoch)
                progress.batch = 0
            tic = time.perf_counter()
            batches = progress.order[progress.batch : progress.batch + tc.grad_accumulation]

            # accumulate this rank's micro-batches: summed token losses and their gradients
            grads = tree_map(mx.zeros_like, model.trainable_parameters())
            counts = np.zeros(4, np.float32)  # loss sum, trained tokens, tokens, stop flag
            model.train()
            rows = pack_rows(batches, lengths, recipe.data.max_length) if tc.pack else batches
            build = packed_micro_batch if tc.pack else micro_batch
            for index in range(rank, len(rows), world):
                mb = build(splits.train, rows[index], recipe.data.max_length, tc.pad_multiple)
                mx.random.seed(_micro_seed(tc.seed, progress.step, index))  # dropout
                loss, grads = micro_step(grads, *_arrays(mb))
                mx.eval(loss, grads)
                counts += [loss.item(), mb.trained, mb.tokens, 0]
            counts[3] = float(stop.is_set())

            # sum over ranks; normalize by the trained tokens of the whole step
            grads, totals = distributed.sum_tree((grads, mx.array(counts)), group)
            loss_total, trained, tokens, stopping = totals.tolist()
            grads = tree_map(lambda g, n=trained: g / n, grads)
            step_loss, norm = loss_total / trained, grad_norm(grads)
            lr = schedule(optimizer.step).item()  # what this update uses

            # a NaN/inf loss or gradient never reaches the weights
            if not (math.isfinite(step_loss) and math.isfinite(norm)):
                progress.bad_steps += 1
                progress.skipped_steps += 1
                emit("skip", {"step": progress.step + 1, "loss": step_loss, "grad_norm": norm})
                if progress.bad_steps >= tc.max_bad_steps:
                    raise ReliefError(
                        f"{progress.bad_steps} steps in a row had a NaN/inf loss or gradient (last at step "
                        f"{progress.step + 1}); the last good checkpoint in {run / state.CHECKPOINT} is intact: "
                        "lower train.learning_rate or check the data, then resume with --resume"
                    )
            else:
                progress.bad_steps = 0
                update(model, optimizer, grads, norm, tc.max_grad_norm)

            # bookkeeping and metrics (rank 0 writes)
            progress.step += 1
            progress.batch += len(batches)
            elapsed = time.perf_counter() - tic
            progress.elapsed_s += elapsed
            progress.tokens += int(tokens)
            progress.trained_tokens += int(trained)
            progress.losses.append([progress.step, step_loss])
            session_tokens, session_time = session_tokens + tokens, session_time + elapsed
            record = {"step": progress.step, "epoch": progress.epoch, "loss": step_loss, "lr": lr,
                      "grad_norm": norm, "skipped": progress.bad_steps > 0, "tokens": int(tokens),
                      "trained_tokens": int(trained), "tokens_per_s": session_tokens / session_time,
                      "peak_memory_gb": mx.get_peak_memory() / 1e9, "step_time_s": elapsed}
            if rank == 0:
                state.append_metrics(run, record)
            if progress.step % recipe.output.report_every == 0 or progress.step == total_steps:
                eta = (total_steps - progress.step) * session_time / (progress.step - session_start)
                emit("step", record | {"total": total_steps, "eta_s": eta})

            # validation: every N steps, at each epoch's end (every = 0), and at the end
            epoch_end = progress.batch >= len(progress.order)
            due = (vc.every > 0 and progress.step % vc.every == 0) or (vc.every == 0 and epoch_end)
            if vc.every >= 0 and (due or progress.step == total_steps):
                val_loss = _validate(model, splits, recipe, group)
                improved = progress.best_loss is None or val_loss < progress.best_loss
                progress.val_losses.append([progress.step, val_loss])
                if improved:
                    progress.best_loss, progress.best_step, progress.evals_since_best = val_loss, progress.step, 0
                    if rank == 0:
                        state.save_best(run, model, adapter_config)
                else:
                    progress.evals_since_best += 1
                if rank == 0:
                    state.append_metrics(run, {"step": progress.step, "val_loss": val_loss, "best": improved})
                emit("validation", {"step": progress.step, "val_loss": val_loss, "best": improved,
                                    "best_loss": progress.best_loss})
                if vc.patience and progress.evals_since_best >= vc.patience:
                    status = "early_stopped"

            # checkpoint every N steps, at the end, when stopping early and when interrupted
            last = progress.step == total_steps or status == "early_stopped" or stopping
            every = recipe.output.checkpoint_every
            if rank == 0 and (last or every and progress.step % every == 0):
                state.save_checkpoint(run, model, optimizer, progress, identity)
                state.save_adapter(run, model)
                emit("checkpoint", {"step": progress.step, "path": str(run / state.CHECKPOINT)})
            if stopping and progress.step < total_steps:
                status = "interrupted"

    summary = _summary(progress, status, total_steps, splits, model, world, run, time.perf_counter() - wall)
    if rank == 0:
        write_json(run / state.SUMMARY, summary)
    emit("done", summary)
    return Result(run, status, summary)


# ---------------------------------------------------------------- pieces of the loop


def _load_model(path: str, dtype: mx.Dtype | None) -> tuple[Path, nn.Module, HarmonyTokenizer]:
    """`relief_mlx.load` without mlx-lm's tokenizer wrapper (the data pipeline reads
    tokenizer.json itself; building the wrapper too costs seconds per run)."""
    model_dir, _ = hub.resolve(path)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ReliefError(f"{model_dir} has no config.json; set model.path to a folder written by `relief convert`")
    try:
        model = build_model(json.loads(config_file.read_text()), read_weights(model_dir), dtype)
    except ReliefError as e:  # build_model passes MLX's multi-line message on: make it one line
        raise ReliefError(f"{model_dir}: " + " ".join(str(e).split())) from None
    mx.eval(model.parameters())
    return model_dir, model, HarmonyTokenizer.from_dir(model_dir)


def make_micro_step(model: nn.Module, tc) -> Callable:
    """(accumulated grads, batch arrays) -> (summed loss, grads + this batch's grads), compiled
    when `tc.compile`; the batch arrays are `train.data.micro_batch`'s, in `MicroBatch` order."""

    def loss_fn(model, inputs, positions, targets, weights, targets_full, mask_full, segments=None):
        if tc.loss_chunk:
            return loss_sum(model, inputs, positions, targets, weights, tc.loss_chunk, tc.grad_checkpoint, segments)
        return plain_loss_sum(model, inputs, targets_full, mask_full, tc.grad_checkpoint, segments)

    value_and_grad = nn.value_and_grad(model, loss_fn)
    layerwise = tc.grad_checkpoint and tc.loss_chunk and not tc.compile  # see loss.layerwise_value_and_grad

    def step(accumulated, *batch):
        if layerwise:  # batch: inputs, positions, targets, weights, targets_full, mask_full[, segments]
            segments = batch[6] if len(batch) > 6 else None
            loss, grads = checkpointed_loss_and_grad(model, *batch[:4], tc.loss_chunk, segments)
        else:
            loss, grads = value_and_grad(model, *batch)
        return loss, tree_map(mx.add, accumulated, grads)

    if not tc.compile:
        return step
    # The model's arrays and the random state are read (and rebound) inside: declare them.
    compiled_state = [model.state, mx.random.state]
    compiled = partial(mx.compile, inputs=compiled_state, outputs=compiled_state)(step)

    def traced(*args):
        with gather_only():  # a compiled step cannot sync with the host to group experts
            return compiled(*args)

    return traced


def _arrays(mb: MicroBatch) -> tuple[mx.array, ...]:
    packed = (mb.segments,) if isinstance(mb, PackedBatch) else ()
    return tuple(mx.array(a) for a in (mb.inputs, mb.positions, mb.targets, mb.weights,
                                       mb.targets_full, mb.mask_full, *packed))


def _micro_seed(seed: int, step: int, index: int) -> int:
    """Dropout seed of one micro-batch: the same on 1 or N ranks, and after a resume."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


def _validate(model: nn.Module, splits: Splits, recipe: Recipe, group) -> float:
    """Mean loss per trained token of the valid split (or its first max_batches micro-batches)."""
    vc, tc = recipe.validation, recipe.train
    batches = eval_order([len(e.tokens) for e in splits.valid], tc.batch_size)
    batches = batches[: vc.max_batches or None]
    model.eval()
    total, trained = 0.0, 0
    for indices in batches[group.rank() :: group.size()]:
        mb = micro_batch(splits.valid, indices, recipe.data.max_length, tc.pad_multiple)
        inputs, positions, targets, weights = (mx.array(a) for a in (mb.inputs, mb.positions, mb.targets, mb.weights))
        h = hidden_states(model, inputs).reshape(-1, model.args.hidden_size)[positions]  # (K, D)
        total += cross_entropy_value(model.lm_head, h, targets, weights, tc.loss_chunk or 128).item()
        trained += mb.trained
    total, trained = distributed.sum_tree(mx.array([total, trained], mx.float32), group).tolist()
    model.train()
    return total / trained


def _resume(run: Path, model: nn.Module, optimizer: optim.Optimizer, identity: dict, group) -> state.Progress:
    """Rank 0 reads RUN/checkpoint; every rank gets the same weights, optimizer state and position."""
    saved = None
    if group.rank() == 0:
        saved, adapters, optimizer_state = state.read_checkpoint(run)
        state.check_identity(run, saved["identity"], identity)
        state.restore(model, optimizer, adapters, optimizer_state, run)
        state.rewrite_metrics(run, saved["progress"]["step"])
    saved = distributed.broadcast_json(saved, group)
    if group.size() > 1:
        model.update(distributed.broadcast_tree(model.trainable_parameters(), group))
        optimizer.state = distributed.broadcast_tree(optimizer.state, group)
    mx.eval(model.trainable_parameters(), optimizer.state)
    return state.Progress(**saved["progress"])


@contextlib.contextmanager
def _stop_requested() -> Iterator[threading.Event]:
    """Ctrl-C or SIGTERM asks the loop to checkpoint and stop at the end of the step; a second
    Ctrl-C stops at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _summary(progress: state.Progress, status: str, total_steps: int, splits: Splits, model: nn.Module,
             world: int, run: Path, wall_s: float) -> dict:
    losses = progress.losses
    stride = max(len(losses) // 20, 1)
    return {
        "status": status,
        "steps": progress.step,
        "total_steps": total_steps,
        "epochs_done": progress.epoch + (progress.batch >= len(progress.order)),
        "train_loss_first": losses[0][1] if losses else None,
        "train_loss_last": losses[-1][1] if losses else None,
        "loss_curve": losses[::stride] + (losses[-1:] if losses and (len(losses) - 1) % stride else []),
        "val_losses": progress.val_losses,
        "best_val_loss": progress.best_loss,
        "best_step": progress.best_step,
        "skipped_steps": progress.skipped_steps,
        "train_time_s": progress.elapsed_s,
        "wall_time_s": wall_s,
        "tokens": progress.tokens,
        "trained_tokens": progress.trained_tokens,
        "tokens_per_s": progress.tokens / max(progress.elapsed_s, 1e-9),
        "trained_tokens_per_s": progress.trained_tokens / max(progress.elapsed_s, 1e-9),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "trainable_parameters": count_trainable(model),
        "world_size": world,
        "data": splits.counts,
        "adapter": str(run),
        "best_adapter": str(run / state.BEST) if progress.best_loss is not None else None,
    }


def resume_recipe(run: str | Path, recipe_file: str | Path | None = None, overrides: tuple[str, ...] = ()) -> Recipe:
    """The recipe to continue RUN with: its saved recipe.toml unless a recipe file is given
    (a different one is refused when the checkpoint is read); output.dir is RUN."""
    run = Path(run)
    saved = run / state.RECIPE
    if recipe_file is None and not saved.is_file():
        raise ReliefError(f"{run} has no {state.RECIPE}; pass the run folder `relief train` wrote")
    recipe = load_recipe(recipe_file or saved, overrides)
    return replace(recipe, output=replace(recipe.output, dir=str(run)))


def grad_norm(grads) -> float:
    """The global L2 norm of a gradient tree, accumulated in float32."""
    return mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads))).item()


def update(model: nn.Module, optimizer, grads, norm: float, max_grad_norm: float) -> None:
    """Clip `grads` (of global norm `norm`) to `max_grad_norm` as torch's clip_grad_norm_ does,
    apply one optimizer update and evaluate it."""
    if max_grad_norm and norm > max_grad_norm:
        grads = tree_map(lambda g, c=max_grad_norm / (norm + 1e-6): g * c, grads)
    optimizer.update(model, grads)
    mx.eval(model.trainable_parameters(), optimizer.state)
