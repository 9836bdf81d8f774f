"""The training loop end to end on the mini model: what it writes, resume, interruption,
NaN steps, validation and early stopping, bad inputs."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from train_helpers import assert_trees_close, write_dataset

from relief_mlx.errors import ReliefError
from relief_mlx.recipe import TrainSection
from relief_mlx.train import resume_recipe, train
from relief_mlx.train import state as state_module
from relief_mlx.train import trainer as trainer_module


def arrays(path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path), format="safetensors").items()}


@pytest.mark.slow
def test_a_run_writes_an_adapter_mlx_lm_and_relief_load_both_read(make_recipe, mini_mlx_f32):
    result = train(make_recipe("train.iterations=3", "validation.every=2", "output.checkpoint_every=2"))
    run = result.run_dir
    assert result.status == "finished"
    for name in ("adapter_config.json", "adapters.safetensors", "recipe.toml", "metrics.jsonl", "summary.json",
                 "best/adapters.safetensors", "checkpoint/state.json", "checkpoint/optimizer.safetensors"):
        assert (run / name).is_file(), name
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["num_layers"] == 4
    assert config["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                         "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 3]  # every 2 and at the end
    summary = result.summary
    assert summary["steps"] == 3 and summary["best_val_loss"] == min(m["val_loss"] for m in metrics if "val_loss" in m)
    assert summary["tokens_per_s"] > 0 and summary["peak_memory_gb"] > 0

    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load as mlx_lm_load
    from train_helpers import build

    import relief_mlx

    x = mx.array([[200006, 1428, 200008, 13225, 200007]])
    ours, _ = relief_mlx.load(mini_mlx_f32, adapter=run)
    via_mlx_lm = load_adapters(build(mini_mlx_f32), str(run))  # mlx-lm's adapter loader, our model
    trained = np.array(ours(x))
    np.testing.assert_allclose(np.array(via_mlx_lm(x)), trained, atol=1e-6)
    assert np.abs(np.array(build(mini_mlx_f32)(x)) - trained).max() > 1e-4  # the adapter changes the model
    # mlx-lm end to end (its own model class, whose YaRN rounds: compare it with itself)
    mlx_lm_base, _ = mlx_lm_load(str(mini_mlx_f32))
    mlx_lm_tuned, _ = mlx_lm_load(str(mini_mlx_f32), adapter_path=str(run))
    assert np.abs(np.array(mlx_lm_tuned(x)) - np.array(mlx_lm_base(x))).max() > 1e-4


def test_loss_falls_on_repeated_data(make_recipe):
    result = train(make_recipe("train.iterations=8", "train.learning_rate=3e-2", "train.schedule=\"constant\"",
                               "lora.targets=[\"self_attn.*\"]"))
    losses = [loss for _, loss in result.summary["loss_curve"]]
    assert np.mean(losses[-3:]) < losses[0] - 0.3


@pytest.mark.slow
def test_resumed_run_equals_a_straight_run(make_recipe):
    """2 x N steps with a SIGTERM checkpoint in between == 2N straight: weights and optimizer.

    The signal arrives while step 2 reports; the loop finishes step 3, checkpoints and stops.
    """
    overrides = ("train.iterations=6", "lora.dropout=0.1", "validation.every=2", "validation.patience=5")
    straight = train(make_recipe(*overrides, name="straight"))

    def stop_during_step_two(kind, event):
        if kind == "step" and event["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a scheduler would

    first = train(make_recipe(*overrides, name="resumed"), on_event=stop_during_step_two)
    assert first.status == "interrupted" and first.summary["steps"] == 3
    resumed = train(resume_recipe(first.run_dir), resume=first.run_dir)
    assert resumed.status == "finished" and resumed.summary["steps"] == 6
    for name in ("checkpoint/adapters.safetensors", "checkpoint/optimizer.safetensors", "best/adapters.safetensors"):
        assert_trees_close(arrays(straight.run_dir / name), arrays(resumed.run_dir / name), 1e-6, name)
    metrics = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]  # no step twice
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 4, 6]
    np.testing.assert_allclose(resumed.summary["val_losses"], straight.summary["val_losses"], rtol=1e-6)


def test_gradient_is_normalized_by_trained_tokens_not_micro_batches(make_recipe, monkeypatch):
    """Accumulating two micro-batches of one == one micro-batch of two (padding included)."""
    updates = {}

    def capture(name):
        original = trainer_module.optim.AdamW.update

        def update(self, model, grads):
            updates[name] = {k: np.array(v) for k, v in _flat(grads)}
            return original(self, model, grads)

        return update

    common = ("train.iterations=1", "train.max_grad_norm=0", "data.max_length=64")
    monkeypatch.setattr(trainer_module.optim.AdamW, "update", capture("accumulated"))
    train(make_recipe(*common, "train.batch_size=1", "train.grad_accumulation=2", name="a"))
    monkeypatch.setattr(trainer_module.optim.AdamW, "update", capture("batched"))
    monkeypatch.setattr(trainer_module, "epoch_order", lambda lengths, b, s, e: _pairs_as_in_accumulated(lengths, s, e))
    train(make_recipe(*common, "train.batch_size=2", "train.grad_accumulation=1", name="b"))
    for k, g in updates["accumulated"].items():
        np.testing.assert_allclose(updates["batched"][k], g, rtol=1e-4, atol=1e-6 * np.abs(g).max(), err_msg=k)


def _pairs_as_in_accumulated(lengths, seed, epoch):
    from relief_mlx.train.data import epoch_order

    singles = epoch_order(lengths, 1, seed, epoch)
    return [singles[0] + singles[1]] + singles[2:]


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def test_nan_steps_are_skipped_and_repeated_ones_stop_with_the_checkpoint_intact(make_recipe, monkeypatch):
    from mlx.utils import tree_map

    real = trainer_module.make_micro_step
    poisoned_grads, poisoned_losses = {3}, set()  # micro-step 3 = step 2 (accumulation 2)

    def micro_step(model, tc):
        step = real(model, tc)

        def poisoned(accumulated, *batch):
            loss, grads = step(accumulated, *batch)
            calls.append(1)
            if len(calls) in poisoned_grads:  # an inf gradient with a finite loss
                grads = tree_map(lambda g: g * float("inf"), grads)
            if len(calls) in poisoned_losses:
                loss = loss * float("nan")
            return loss, grads

        return poisoned

    calls: list[int] = []
    monkeypatch.setattr(trainer_module, "make_micro_step", micro_step)
    result = train(make_recipe("train.iterations=3", name="one-nan"))
    assert result.summary["skipped_steps"] == 1
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped"] for m in metrics] == [False, True, False]
    weights = arrays(result.run_dir / "adapters.safetensors")
    assert all(np.isfinite(w).all() for w in weights.values())

    calls.clear()
    poisoned_grads.clear()
    poisoned_losses.update(range(5, 100))  # from step 3 on, every step
    recipe = make_recipe("train.iterations=6", "train.max_bad_steps=2", "output.checkpoint_every=2", name="nan")
    with pytest.raises(ReliefError, match=r"2 steps in a row had a NaN/inf.*checkpoint.*intact"):
        train(recipe)
    run = recipe.output.dir
    checkpoint = Path(run) / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())["progress"]["step"] == 2
    assert all(np.isfinite(w).all() for w in arrays(checkpoint / "adapters.safetensors").values())


def test_early_stopping_keeps_the_best_adapter_apart_from_the_last(make_recipe, monkeypatch):
    scripted = iter([5.0, 4.0, 4.5, 4.7, 4.8, 4.9])
    monkeypatch.setattr(trainer_module, "_validate", lambda *a: next(scripted))
    result = train(make_recipe("train.iterations=6", "validation.every=1", "validation.patience=2"))
    assert result.status == "early_stopped" and result.summary["steps"] == 4
    assert result.summary["best_val_loss"] == 4.0 and result.summary["best_step"] == 2
    best = arrays(result.run_dir / "best" / "adapters.safetensors")
    last = arrays(result.run_dir / "adapters.safetensors")
    assert any(np.abs(best[k] - last[k]).max() > 0 for k in best)


def test_stop_flag_is_set_by_sigint_and_sigterm():
    for sig in (signal.SIGINT, signal.SIGTERM):
        with trainer_module._stop_requested() as stop:
            os.kill(os.getpid(), sig)
            assert stop.is_set()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


# ---------------------------------------------------------------- bad input: one clear line


def test_a_target_that_matches_nothing_fails_before_training(make_recipe):
    with pytest.raises(ReliefError, match=r"lora.targets pattern 'attn.q' matches no module"):
        train(make_recipe("lora.targets=[\"attn.q\"]"))


def test_a_model_folder_missing_tensors(make_recipe, mini_mlx_f32, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in mini_mlx_f32.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    weights = {}
    for f in sorted(mini_mlx_f32.glob("model*.safetensors")):
        weights |= mx.load(str(f))
    weights.pop("model.layers.2.self_attn.q_proj.weight")
    mx.save_safetensors(str(broken / "model-00001-of-00001.safetensors"), weights)
    missing = r"Missing 1 parameters: model.layers.2.self_attn.q_proj.weight.*convert the checkpoint"
    with pytest.raises(ReliefError, match=missing) as e:
        train(make_recipe(f"model.path=\"{broken}\""))
    assert "\n" not in str(e.value)


def test_resume_refuses_another_recipe_or_model(make_recipe, mini_mlx, tmp_path):
    first = train(make_recipe("train.iterations=2", "output.checkpoint_every=1", name="base"))
    recipe_file = tmp_path / "other.toml"
    recipe_file.write_text((first.run_dir / "recipe.toml").read_text().replace("rank = 4", "rank = 8"))
    with pytest.raises(ReliefError, match=r"another recipe \(lora.rank differ\)"):
        train(resume_recipe(first.run_dir, recipe_file), resume=first.run_dir)
    with pytest.raises(ReliefError, match=r"trained with another model"):
        train(resume_recipe(first.run_dir, None, (f"model.path=\"{mini_mlx}\"",)), resume=first.run_dir)
    with pytest.raises(ReliefError, match=r"has no recipe.toml"):
        resume_recipe(tmp_path)


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(make_recipe, monkeypatch):
    recipe = make_recipe("train.iterations=4", "output.checkpoint_every=2", name="full")
    real = state_module.save_arrays

    def save_arrays(path, arrays_):
        if "checkpoint" in str(path) and json_step(recipe) == 2:  # the second checkpoint fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, arrays_)

    monkeypatch.setattr(state_module, "save_arrays", save_arrays)
    with pytest.raises(ReliefError, match=r"No space left on device; the checkpoint of step 2 is intact") as e:
        train(recipe)
    assert "\n" not in str(e.value)
    run = Path(recipe.output.dir)
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["adapters.safetensors", "optimizer.safetensors",
                                                                       "state.json"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no partial folder left
    monkeypatch.setattr(state_module, "save_arrays", real)
    resumed = train(resume_recipe(run), resume=run)
    assert resumed.summary["steps"] == 4


def json_step(recipe) -> int | None:
    file = Path(recipe.output.dir) / "checkpoint" / "state.json"
    return json.loads(file.read_text())["progress"]["step"] if file.is_file() else None


def test_a_fresh_run_refuses_a_used_folder(make_recipe):
    recipe = make_recipe("train.iterations=1")
    train(recipe)
    with pytest.raises(ReliefError, match=r"already holds files; continue that run with --resume"):
        train(recipe)


def test_training_wires_the_model_memory_where_the_backend_recommends_it(make_recipe, monkeypatch):
    """Metal's call path on any backend: the loop runs inside mlx-lm's wired_limit, which sets the
    recommended working set from mx.device_info() and restores the old limit at the end."""
    calls = []
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 5 * 2**30})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 0)
    train(make_recipe("train.iterations=1"))
    assert calls == [5 * 2**30, 0]


def test_a_finished_run_is_extended_with_more_iterations(make_recipe):
    """Regression: the whole recipe was the resume identity, so --set train.iterations was refused."""
    first = train(make_recipe("train.iterations=2", "validation.every=1"))
    extended = train(resume_recipe(first.run_dir, None, ("train.iterations=3", "validation.every=3")),
                     resume=first.run_dir)
    assert extended.status == "finished" and extended.summary["steps"] == 3
    assert [step for step, _ in extended.summary["val_losses"]] == [1, 2, 3]
    assert "iterations = 3" in (first.run_dir / "recipe.toml").read_text()  # the run folder says what ran
    with pytest.raises(ReliefError, match=r"another recipe \(train.learning_rate differ\)"):
        train(resume_recipe(first.run_dir, None, ("train.learning_rate=0.5",)), resume=first.run_dir)


def test_resume_finds_the_checkpoint_a_crash_left_between_the_two_renames(make_recipe):
    """Regression: with checkpoint/ moved aside and the new one not yet in place, --resume said
    "no complete checkpoint" although .checkpoint.old-PID held it whole."""
    first = train(make_recipe("train.iterations=2", "output.checkpoint_every=1"))
    run = first.run_dir
    (run / "checkpoint").rename(run / ".checkpoint.old-4242")
    resumed = train(resume_recipe(run, None, ("train.iterations=3",)), resume=run)
    assert resumed.summary["steps"] == 3
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # continued from step 2, not from scratch
    assert (run / "checkpoint" / "state.json").is_file() and not list(run.glob(".checkpoint.old-*"))


def test_a_valid_split_with_no_example_that_fits_is_refused_when_the_data_loads(make_recipe, tmp_path):
    """Regression: every validation example too long ended in a 0/0 ZeroDivisionError at the first validation."""
    data = write_dataset(tmp_path / "data")
    long_answer = {"messages": [{"role": "user", "content": "Tell me everything."},
                                {"role": "assistant", "content": "water " * 200}]}
    (data / "valid.jsonl").write_text(json.dumps(long_answer) + "\n")
    with pytest.raises(ReliefError, match=r"no valid example fits data.max_length = 128 \(1 dropped as too long\); "
                                          r"raise it or set validation.every = -1") as e:
        train(make_recipe(f"data.path=\"{data}\"", "validation.every=1"))
    assert "\n" not in str(e.value)
    assert train(make_recipe(f"data.path=\"{data}\"", "train.iterations=1", name="no-valid")).status == "finished"


# ---------------------------------------------------------------- learning-rate schedules


def lrs(total, **kw):
    schedule = trainer_module.learning_rate(TrainSection(**kw), total)
    return [schedule(mx.array(s)).item() for s in range(total)]


def test_cosine_with_warmup():
    values = lrs(12, learning_rate=1e-3, warmup_steps=2, min_learning_rate=1e-4)
    assert values[:2] == pytest.approx([5e-4, 1e-3])
    assert values[2] == pytest.approx(1e-3)
    assert values[7] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert values == sorted(values[:2]) + sorted(values[2:], reverse=True)


def test_linear_is_transformers_default_decay():
    # transformers' get_linear_schedule_with_warmup(0 warmup): lr * (total - s) / total
    assert lrs(4, learning_rate=1e-4, schedule="linear") == pytest.approx([1e-4, 0.75e-4, 0.5e-4, 0.25e-4])


def test_constant():
    assert lrs(3, learning_rate=2e-4, schedule="constant", warmup_steps=1) == pytest.approx([2e-4] * 3)
