"""No dead ends: a run stopped before its first checkpoint can be continued or started over, each
refusal says how, what a dead writer left is cleaned up (never a live one's), and the NaN stop
never claims a checkpoint that does not exist."""

from __future__ import annotations

import os
import signal

import pytest
from harness import leftovers, metrics_steps, recipe_file, relief

from relief_mlx.errors import ReliefError, ReliefWarning
from relief_mlx.io import atomic_dir
from relief_mlx.recipe import load_recipe
from relief_mlx.train import resume_recipe, train


@pytest.mark.survives("kill", "a run killed before its first checkpoint: --resume starts over, a fresh run into it "
                              "names --resume and --overwrite")
def test_a_run_killed_before_its_first_checkpoint_has_two_ways_out(mini_mlx_f32, tiny_data, tmp_path):
    """Regression: --resume said "no complete checkpoint" and a fresh run "already holds files"."""
    run = tmp_path / "run"
    recipe = recipe_file(tmp_path, mini_mlx_f32, tiny_data, run, "train.iterations=2")
    killed = relief("train", str(recipe), fault=f"kill:1:append {run}/metrics.jsonl")
    assert killed.returncode == -signal.SIGKILL
    with pytest.raises(ReliefError, match=rf"{run} already holds a run \(no checkpoint yet\); continue it with "
                                          rf"`relief train --resume {run}`, start it over with --overwrite"):
        train(load_recipe(recipe))
    with pytest.warns(ReliefWarning, match=r"has no checkpoint yet \(it stopped before its first\): starting it "
                                           r"from step 0"):
        resumed = train(resume_recipe(run), resume=run)
    assert resumed.status == "finished" and metrics_steps(run)[0] == [1, 2]
    again = train(load_recipe(recipe), overwrite=True)  # and the other way out
    assert again.status == "finished" and metrics_steps(run)[0] == [1, 2]


@pytest.mark.survives("hostile data", "a loss that is NaN from the first step: the NaN stop says no checkpoint "
                                      "exists yet")
def test_the_nan_stop_never_claims_a_checkpoint_that_does_not_exist(mini_mlx_f32, tiny_data, tmp_path, monkeypatch):
    """Regression: it said "the last good checkpoint is intact" when there was none."""
    from relief_mlx.train import trainer

    real = trainer.make_micro_step

    def poisoned(model, tc):  # as data that overflows the model would: every loss NaN
        step = real(model, tc)
        return lambda accumulated, *batch: (lambda loss, grads: (loss * float("nan"), grads))(*step(accumulated,
                                                                                                      *batch))

    monkeypatch.setattr(trainer, "make_micro_step", poisoned)
    run = tmp_path / "run"
    recipe = load_recipe(recipe_file(tmp_path, mini_mlx_f32, tiny_data, run, "train.max_bad_steps=2"))
    with pytest.raises(ReliefError, match=r"2 steps in a row had a NaN/inf loss or gradient \(last at step 2\); no "
                                          r"checkpoint was written yet: lower train.learning_rate") as e:
        train(recipe)
    assert "is intact" not in str(e.value) and not (run / "checkpoint").exists()


@pytest.mark.survives("kill", "leftovers of dead writers (.partial-*, .old-*) removed by the next writer; a live "
                              "writer's kept")
def test_the_next_writer_removes_a_dead_writers_leftovers_but_not_a_live_ones(tmp_path):
    """Regression: .checkpoint.partial-* and .out.partial-* folders were never cleaned up."""
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    live = os.getppid()  # pytest's parent: alive for the whole test
    for name in (f".out.partial-{dead}-abc", f".out.old-{dead}-1", ".out.partial-x7q2kd1m",  # older relief
                 f".out.partial-{live}-def"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard").write_text("half")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "done").write_text("whole")
    assert leftovers(tmp_path) == [f".out.partial-{live}-def"]
