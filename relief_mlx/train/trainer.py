"""`relief train`: LoRA fine-tuning of gpt-oss from one Recipe, resumable and data-parallel.

`train()` is the loop a reader follows, top to bottom: set up (model, LoRA, data, optimizer,
resume), then one iteration per optimizer step: accumulate the step's micro-batches over the
ranks, skip a NaN/inf step or clip and update, log, validate, checkpoint. Each phase is a named
function beside it. What it calls lives beside it too: `loss` (forward and the masked, chunked
loss head), `data` (batch order, micro-batches), `targets` (LoRA), `state` (what is written
and resumed), `distributed` (sums over ranks).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.generate import wired_limit

from .. import hub
from ..errors import ReliefError, ReliefWarning, WriteError
from ..io import folder_lock, write_json, write_text
from ..memory import forecast_run
from ..model.load import load
from ..model.lora import ADAPTER_CONFIG, base_fingerprint
from ..model.moe import gather_only
from ..recipe import Recipe, TrainSection, load_recipe, to_toml
from . import distributed, state
from .data import MicroBatch, Splits, epoch_order, eval_order, load_splits, micro_batch
from .loss import checkpointed_loss_and_grad, cross_entropy_value, hidden_states, loss_sum, plain_loss_sum
from .pack import PackedBatch, pack_rows, packed_micro_batch
from .targets import apply_lora, count_trainable

Event = Callable[[str, dict], None]
"""`on_event(kind, data)`: start, load, compile, step, skip, validation, checkpoint, done."""


@dataclass(frozen=True)
class Result:
    """What a run ended with: its folder, why it stopped, and `summary.json`'s content."""

    run_dir: Path
    status: str  # "finished" | "early_stopped" | "interrupted"
    summary: dict


# ---------------------------------------------------------------- the loop


def train(recipe: Recipe, resume: str | Path | None = None, on_event: Event | None = None,
          overwrite: bool = False) -> Result:
    """Run `recipe` (or continue the run folder `resume` exactly where its checkpoint left off;
    `overwrite` starts a used run folder over). Rank 0 holds the folder's lock (`io.folder_lock`)
    for the whole run, so a second run into it is refused; a failed write is one line saying what
    is left to continue from."""
    run = Path(resume) if resume else Path(recipe.output.dir)
    group = distributed.world()
    try:
        with folder_lock(run) if group.rank() == 0 else contextlib.nullcontext():
            return _train(recipe, resume, on_event, overwrite)
    except WriteError as e:
        raise ReliefError(f"could not write {e.path}: {e.reason}; {state.intact(run)} once there is space") from e
    except RuntimeError as e:
        if group.size() == 1 or not any(w in str(e).lower() for w in ("ring", "peer", "connection", "mpi", "nccl")):
            raise  # a bug, not a lost peer
        raise ReliefError(f"rank {group.rank()} of {group.size()} lost the others ({e}): a rank stopped or its "
                          f"machine went away; {state.intact(run)} on every rank") from e


def _train(recipe: Recipe, resume: str | Path | None, on_event: Event | None, overwrite: bool) -> Result:
    group = distributed.world()
    rank, world = group.rank(), group.size()
    emit = on_event if on_event and rank == 0 else (lambda kind, data: None)
    tc, vc = recipe.train, recipe.validation
    run = Path(resume) if resume else Path(recipe.output.dir)
    _check_start(recipe, run, resume, group, overwrite)

    # -- memory: the forecast, or a refusal before anything is loaded
    emit("forecast", forecast_run(recipe))

    # -- model, LoRA, data
    wall = time.perf_counter()
    emit("load", {"model": recipe.model.path})
    model_dir, _ = hub.resolve(recipe.model.path)
    dtype = None if recipe.model.dtype == "auto" else getattr(mx, recipe.model.dtype)
    model, tokenizer = load(model_dir, dtype=dtype, wrapper=False)
    model_fingerprint = state.model_fingerprint(model_dir, model)  # before LoRA
    mx.random.seed(tc.seed)  # LoRA A initialization
    adapter_config = apply_lora(model, recipe.lora) | {"base_model": recipe.model.path}
    if fingerprint := base_fingerprint(model_dir):  # an adapter knows the weights it was trained on
        adapter_config["base_fingerprint"] = fingerprint
    splits = load_splits(recipe.data, tokenizer, need_valid=vc.every >= 0)
    if tc.batch_size > len(splits.train):  # 10^5 put the whole bundled split in one micro-batch: 13.5 GB, a segfault
        raise ReliefError(f"train.batch_size = {tc.batch_size} is more than the {len(splits.train)} training examples; "
                          f"lower it to {len(splits.train)} or less")
    if recipe.eval.enabled and rank == 0:  # [eval] fails now, not after training
        from ..eval.run import check_before_training

        check_before_training(recipe, tokenizer)
    identity = state.identity(model_fingerprint, recipe.to_dict(), splits.fingerprint)
    lengths = [len(e.tokens) for e in splits.train]
    steps_per_epoch = math.ceil(math.ceil(len(splits.train) / tc.batch_size) / tc.grad_accumulation)
    total_steps = tc.iterations or tc.epochs * steps_per_epoch

    # -- optimizer (PyTorch's AdamW: bias correction on), schedule over total_steps
    schedule = learning_rate(tc, total_steps)
    optimizer = optim.AdamW(learning_rate=schedule, betas=list(tc.betas),
                            eps=tc.eps, weight_decay=tc.weight_decay, bias_correction=True)
    optimizer.init(model.trainable_parameters())

    # -- resume or start; the run folder keeps the recipe it runs (a resume may extend it)
    run_state = _resume(run, model, optimizer, identity, group, len(splits.train)) if resume else state.RunState()
    if rank == 0:
        write_text(run / state.RECIPE, to_toml(recipe))
        write_json(run / ADAPTER_CONFIG, adapter_config)
    micro_step = make_micro_step(model, tc)
    emit("start", {"run": str(run), "steps": total_steps, "start_step": run_state.step,
                   "trainable": count_trainable(model), "world": world, "data": splits.counts})
    if tc.compile:
        emit("compile", {"step": run_state.step + 1})
    mx.reset_peak_memory()
    session = {"start": run_state.step, "tokens": 0, "time": 0.0}
    status = "finished"
    if vc.patience and run_state.evals_since_best >= vc.patience:
        status = "early_stopped"  # resuming a run that had already stopped early

    # -- one iteration = one optimizer step
    with wired_limit(model), _stop_requested() as stop:
        while run_state.step < total_steps and status == "finished":
            tic = time.perf_counter()
            batches = _next_batches(run_state, lengths, tc)
            grads, loss, norm, counts, stopping = _accumulate(model, micro_step, batches, lengths, splits, recipe,
                                                              run_state.step, group, stop)
            lr = schedule(optimizer.step).item()  # what this update uses
            if math.isfinite(loss) and math.isfinite(norm):
                run_state.bad_steps = 0
                update(model, optimizer, grads, norm, tc.max_grad_norm)
            else:  # a NaN/inf loss or gradient never reaches the weights
                _skip(run_state, loss, norm, tc.max_bad_steps, run, emit)
            run_state.batch += len(batches)
            record = _log_step(run_state, session, loss, lr, norm, counts, time.perf_counter() - tic)
            if rank == 0:
                state.append_metrics(run, record)
            if run_state.step % recipe.output.report_every == 0 or run_state.step == total_steps:
                eta = (total_steps - run_state.step) * session["time"] / (run_state.step - session["start"])
                emit("step", record | {"total": total_steps, "eta_s": eta})

            # validation: every N steps, at each epoch's end (every = 0), and at the end
            epoch_end = run_state.batch >= len(run_state.order)
            due = (vc.every > 0 and run_state.step % vc.every == 0) or (vc.every == 0 and epoch_end)
            if vc.every >= 0 and (due or run_state.step == total_steps):
                if not _validate_and_keep_best(model, splits, recipe, group, run_state, run, adapter_config, emit):
                    status = "early_stopped"

            # checkpoint every N steps, at the end, when stopping early and when interrupted
            last = run_state.step == total_steps or status == "early_stopped" or stopping
            every = recipe.output.checkpoint_every
            if rank == 0 and (last or every and run_state.step % every == 0):
                _checkpoint(run, model, optimizer, run_state, identity, emit)
            if stopping and run_state.step < total_steps:
                status = "interrupted"

    summary = _summary(run_state, status, total_steps, splits, model, world, run, time.perf_counter() - wall)
    if rank == 0:
        write_json(run / state.SUMMARY, summary)
    if recipe.eval.enabled and rank == 0 and status != "interrupted":  # [eval]: the base vs this run's adapter
        from ..eval.run import after_training

        summary["eval"] = after_training(recipe, run, model, tokenizer, emit)
        write_json(run / state.SUMMARY, summary)
    emit("done", summary)
    return Result(run, status, summary)


# ---------------------------------------------------------------- phases of the loop


def _check_start(recipe: Recipe, run: Path, resume: str | Path | None, group, overwrite: bool) -> None:
    world, accumulation = group.size(), recipe.train.grad_accumulation
    if accumulation % world:
        raise ReliefError(f"train.grad_accumulation = {accumulation} is not a multiple of the "
                          f"{world} ranks; set it to a multiple of {world}")
    if not resume and group.rank() == 0 and run.exists() and any(run.iterdir()):
        if not state.is_run(run):
            raise ReliefError(f"{run} already holds files that are not a relief run; choose another output.dir")
        if not overwrite:
            step = state.checkpoint_step(run)
            has = f"checkpoint of step {step}" if step is not None else "no checkpoint yet"
            raise ReliefError(f"{run} already holds a run ({has}); continue it with `relief train --resume {run}`, "
                              "start it over with --overwrite, or choose another output.dir")
        state.clear(run)


def _next_batches(run_state: state.RunState, lengths: list[int], tc: TrainSection) -> list[list[int]]:
    """The micro-batches of the next optimizer step; a new epoch starts a fresh shuffled order."""
    if run_state.batch >= len(run_state.order):
        run_state.epoch += 1 if run_state.order else 0
        run_state.order = epoch_order(lengths, tc.batch_size, tc.seed, run_state.epoch)
        run_state.batch = 0
    return run_state.order[run_state.batch : run_state.batch + tc.grad_accumulation]


def _accumulate(model: nn.Module, micro_step: Callable, batches: list[list[int]], lengths: list[int],
                splits: Splits, recipe: Recipe, step: int, group, stop: threading.Event):
    """Run this rank's share of `batches` (packed into rows of max_length tokens with
    `train.pack`) and sum over ranks. Returns the gradient and the loss
    per trained token of the whole step, the gradient norm, (trained tokens, tokens), and whether
    any rank was asked to stop."""
    tc = recipe.train
    grads = tree_map(mx.zeros_like, model.trainable_parameters())
    counts = np.zeros(4, np.float32)  # loss sum, trained tokens, tokens, stop flag
    model.train()
    rows = pack_rows(batches, lengths, recipe.data.max_length) if tc.pack else batches
    build = packed_micro_batch if tc.pack else micro_batch
    for index in range(group.rank(), len(rows), group.size()):
        mb = build(splits.train, rows[index], recipe.data.max_length, tc.pad_multiple)
        mx.random.seed(_micro_seed(tc.seed, step, index))  # dropout
        loss, grads = micro_step(grads, *_arrays(mb))
        mx.eval(loss, grads)
        counts += [loss.item(), mb.trained, mb.tokens, 0]
    counts[3] = float(stop.is_set())
    grads, totals = distributed.sum_tree((grads, mx.array(counts)), group)
    loss_total, trained, tokens, stopping = totals.tolist()
    grads = tree_map(lambda g: g / trained, grads)
    return grads, loss_total / trained, grad_norm(grads), (int(trained), int(tokens)), stopping > 0


def _skip(run_state: state.RunState, loss: float, norm: float, max_bad_steps: int, run: Path, emit: Event) -> None:
    """Count a skipped step; stop the run after `max_bad_steps` of them in a row."""
    run_state.bad_steps += 1
    run_state.skipped_steps += 1
    emit("skip", {"step": run_state.step + 1, "loss": loss, "grad_norm": norm})
    if run_state.bad_steps >= max_bad_steps:
        kept = state.checkpoint_step(run)
        left = (f"the checkpoint of step {kept} in {run / state.CHECKPOINT} is intact" if kept is not None
                else "no checkpoint was written yet")
        raise ReliefError(f"{run_state.bad_steps} steps in a row had a NaN/inf loss or gradient (last at step "
                          f"{run_state.step + 1}); {left}: lower train.learning_rate or check the data and start over "
                          f"with --overwrite, or continue with `relief train --resume {run}` if the cause has passed")


def _log_step(run_state: state.RunState, session: dict, loss: float, lr: float, norm: float,
              counts: tuple[int, int], elapsed: float) -> dict:
    """Count the finished step into the run and this session; its metrics.jsonl record."""
    trained, tokens = counts
    run_state.step += 1
    run_state.elapsed_s += elapsed
    run_state.tokens += tokens
    run_state.trained_tokens += trained
    run_state.losses.append([run_state.step, loss])
    session["tokens"] += tokens
    session["time"] += elapsed
    return {"step": run_state.step, "epoch": run_state.epoch, "loss": loss, "lr": lr, "grad_norm": norm,
            "skipped": run_state.bad_steps > 0, "tokens": tokens, "trained_tokens": trained,
            "tokens_per_s": session["tokens"] / session["time"], "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "step_time_s": elapsed}


def _validate_and_keep_best(model: nn.Module, splits: Splits, recipe: Recipe, group, run_state: state.RunState,
                            run: Path, adapter_config: dict, emit: Event) -> bool:
    """Validate, keep a new best adapter in best/; False once `patience` validations brought none."""
    val_loss = _validate(model, splits, recipe, group)
    improved = run_state.best_loss is None or val_loss < run_state.best_loss
    run_state.val_losses.append([run_state.step, val_loss])
    if improved:
        run_state.best_loss, run_state.best_step, run_state.evals_since_best = val_loss, run_state.step, 0
    else:
        run_state.evals_since_best += 1
    if group.rank() == 0:
        if improved:
            state.save_best(run, model, adapter_config)
        state.append_metrics(run, {"step": run_state.step, "val_loss": val_loss, "best": improved})
    emit("validation", {"step": run_state.step, "val_loss": val_loss, "best": improved,
                        "best_loss": run_state.best_loss})
    patience = recipe.validation.patience
    return not (patience and run_state.evals_since_best >= patience)


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


def _checkpoint(run: Path, model: nn.Module, optimizer: optim.Optimizer, run_state: state.RunState,
                identity: dict, emit: Event) -> None:
    state.save_checkpoint(run, model, optimizer, run_state, identity)
    state.save_adapter(run, model)
    emit("checkpoint", {"step": run_state.step, "path": str(run / state.CHECKPOINT)})


def _resume(run: Path, model: nn.Module, optimizer: optim.Optimizer, identity: dict, group,
            examples: int) -> state.RunState:
    """Rank 0 reads RUN's checkpoint (after putting back a copy a crash left aside); every rank
    gets the same weights, optimizer state and position. A run with no checkpoint yet starts over."""
    saved = None
    if group.rank() == 0:
        state.recover(run)
        checkpoint = state.read_checkpoint(run)
        if checkpoint is None:
            warnings.warn(f"{run} has no checkpoint yet (it stopped before its first): starting it from step 0",
                          ReliefWarning, stacklevel=2)
        else:
            saved, adapters, optimizer_state = checkpoint
            state.check_identity(run, saved["identity"], identity)
            state.restore(model, optimizer, adapters, optimizer_state, run)
            state.save_adapter(run, model)  # a crash may have come between the checkpoint and this copy
        state.rewrite_metrics(run, saved["progress"]["step"] if saved else 0)
    saved = distributed.broadcast_json(saved, group)
    if saved is None:
        return state.RunState()
    model.update(distributed.broadcast_tree(model.trainable_parameters(), group))
    optimizer.state = distributed.broadcast_tree(optimizer.state, group)
    mx.eval(model.trainable_parameters(), optimizer.state)
    return state.check_progress(saved["progress"], run / state.CHECKPOINT / state.STATE, examples)


# ---------------------------------------------------------------- pieces of a step


def learning_rate(train: TrainSection, total_steps: int) -> Callable[[mx.array], mx.array]:
    """Schedule for `mlx.optimizers` (called with the 0-based step of the update it applies).

    Warmup: step s < warmup uses lr * (s + 1) / warmup (the first update is not wasted at 0).
    Then over the remaining steps: cosine from lr to min_learning_rate, linear from lr towards
    0 (transformers' default `get_linear_schedule_with_warmup`), or constant.
    """
    peak, low, warmup = train.learning_rate, train.min_learning_rate, train.warmup_steps
    decay = max(total_steps - warmup, 1)

    def schedule(step: mx.array) -> mx.array:
        s = step.astype(mx.float32)
        progress = mx.clip((s - warmup) / decay, 0.0, 1.0)
        if train.schedule == "cosine":
            after = low + (peak - low) * 0.5 * (1.0 + mx.cos(math.pi * progress))
        elif train.schedule == "linear":
            after = peak * (1.0 - progress)
        else:
            after = mx.array(peak, mx.float32)
        if warmup == 0:
            return after
        return mx.where(s < warmup, peak * (s + 1) / warmup, after)

    return schedule


def make_micro_step(model: nn.Module, tc: TrainSection) -> Callable:
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


# ---------------------------------------------------------------- the end of a run


def _summary(run_state: state.RunState, status: str, total_steps: int, splits: Splits, model: nn.Module,
             world: int, run: Path, wall_s: float) -> dict:
    losses = run_state.losses
    stride = max(len(losses) // 20, 1)
    return {
        "status": status,
        "steps": run_state.step,
        "total_steps": total_steps,
        "epochs_done": run_state.epoch + (run_state.batch >= len(run_state.order)),
        "train_loss_first": losses[0][1] if losses else None,
        "train_loss_last": losses[-1][1] if losses else None,
        "loss_curve": losses[::stride] + (losses[-1:] if losses and (len(losses) - 1) % stride else []),
        "val_losses": run_state.val_losses,
        "best_val_loss": run_state.best_loss,
        "best_step": run_state.best_step,
        "skipped_steps": run_state.skipped_steps,
        "train_time_s": run_state.elapsed_s,
        "wall_time_s": wall_s,
        "tokens": run_state.tokens,
        "trained_tokens": run_state.trained_tokens,
        "tokens_per_s": run_state.tokens / max(run_state.elapsed_s, 1e-9),
        "trained_tokens_per_s": run_state.trained_tokens / max(run_state.elapsed_s, 1e-9),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "trainable_parameters": count_trainable(model),
        "world_size": world,
        "data": splits.counts,
        "adapter": str(run),
        "best_adapter": str(run / state.BEST) if run_state.best_loss is not None else None,
    }


def resume_recipe(run: str | Path, recipe_file: str | Path | None = None, overrides: tuple[str, ...] = ()) -> Recipe:
    """The recipe to continue RUN with: its saved recipe.toml unless a recipe file is given
    (a different one is refused when the checkpoint is read), `--set` overrides applied (the
    length of the run and its validation may change); output.dir is RUN."""
    run = Path(run)
    saved = run / state.RECIPE
    if recipe_file is None and not saved.is_file():
        raise ReliefError(f"{run} has no {state.RECIPE}; pass the run folder `relief train` wrote")
    recipe = load_recipe(recipe_file or saved, overrides)
    return replace(recipe, output=replace(recipe.output, dir=str(run)))
