"""Two writers on one output: the second is refused in one line naming the first (pid and host);
a lock left by a process that died is taken over with a warning; nothing of the first is lost."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import leftovers, metrics_steps, one_line_error, recipe_file, relief, start

from relief_mlx.errors import ReliefError, ReliefWarning
from relief_mlx.io import folder_lock, lock_file
from relief_mlx.recipe import load_recipe
from relief_mlx.train import train

HOLD = """
import sys, time
from relief_mlx.io import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@pytest.fixture
def holder():
    """holder(path): another live process holding the writer's lock of `path` until the test ends."""
    processes = []

    def hold(path: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "held"
        processes.append(process)
        return process

    yield hold
    for process in processes:
        process.stdin.close()
        process.wait(timeout=30)


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


@pytest.mark.slow
@pytest.mark.survives("concurrent writer", "two relief train runs started together into one output.dir")
def test_two_trainings_into_one_folder_one_runs_the_other_is_refused(mini_mlx_f32, tiny_data, tmp_path):
    """Regression: both exited 0 with interleaved metrics (steps 1,1,2,2,...) and one adapter lost."""
    run = tmp_path / "run"
    recipe = recipe_file(tmp_path, mini_mlx_f32, tiny_data, run)
    first, second = start("train", str(recipe)), start("train", str(recipe))
    outcomes = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in (first, second)]
    assert sorted(code for code, _, _ in outcomes) == [0, 1], outcomes
    refused = next(err for code, _, err in outcomes if code == 1)
    assert "Traceback" not in refused
    assert (f"{run} is being written by pid" in refused and f"on {socket.gethostname()}" in refused) or \
        f"{run} already holds a run" in refused, refused  # the second came before or after the first's lock
    assert metrics_steps(run) == ([1, 2, 3, 4], [2, 4])  # one run's steps, once each
    assert leftovers(tmp_path) == []


@pytest.mark.survives("concurrent writer", "relief train into a folder another live process writes")
def test_a_run_into_a_locked_folder_is_refused_naming_the_owner(mini_mlx_f32, tiny_data, tmp_path, holder):
    run = tmp_path / "run"
    owner = holder(run)
    with pytest.raises(ReliefError, match=rf"{run} is being written by pid {owner.pid} on {socket.gethostname()}"):
        train(load_recipe(recipe_file(tmp_path, mini_mlx_f32, tiny_data, run)))
    assert not run.exists()  # refused before anything was written


@pytest.mark.slow
@pytest.mark.survives("concurrent writer", "two relief convert started together into one --out")
def test_two_conversions_into_one_folder_one_converts_the_other_is_refused(mini_hf, tmp_path):
    """Regression: both printed "converted", the second replacing the first without --overwrite."""
    out = tmp_path / "converted"
    args = ("convert", str(mini_hf), "--out", str(out), "--experts", "float32", "--dtype", "float32")
    processes = [start(*args), start(*args)]
    outcomes = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in processes]
    assert sorted(code for code, _, _ in outcomes) == [0, 1], outcomes
    refused = next(err for code, _, err in outcomes if code == 1)
    assert "is being written by pid" in refused or "already exists and is not empty" in refused, refused
    assert sum("converted ->" in out_ for _, out_, _ in outcomes) == 1
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["convert", "synth", "eval", "fuse", "export"])
@pytest.mark.survives("concurrent writer", "relief convert / synth / eval / fuse / export into an --out another "
                                           "process writes")
def test_commands_refuse_an_out_folder_another_process_writes(command, mini_hf, mini_mlx_f32, tiny_data, tmp_path,
                                                              holder, reference_run):
    out = tmp_path / "out"
    owner = holder(out)
    adapter = ("--adapter", str(reference_run.run_dir))
    args = {"convert": ("convert", str(mini_hf), "--out", str(out)),
            "synth": ("synth", "--preset", "mini", "--out", str(out)),
            "eval": ("eval", "--model", str(mini_mlx_f32), "--data", str(tiny_data), "--out", str(out)),
            "fuse": ("fuse", "--model", str(mini_mlx_f32), *adapter, "--out", str(out)),
            "export": ("export", "--model", str(mini_mlx_f32), *adapter, "--format", "peft", "--out", str(out)),
            }[command]
    line = one_line_error(relief(*args))
    assert f"{out} is being written by pid {owner.pid} on {socket.gethostname()}" in line, line
    assert not out.exists()


@pytest.mark.survives("concurrent writer", "a lock left by a writer that died: taken over with a warning (command "
                                           "line)")
def test_a_stale_lock_from_a_dead_process_is_taken_over_with_a_warning(mini_hf, tmp_path):
    out = tmp_path / "out"
    pid = dead_pid()
    lock_file(out).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "relief convert",
                                          "since": "2025-01-01 00:00:00"}))
    done = relief("convert", str(mini_hf), "--out", str(out))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: took over the lock of {out} from pid {pid} on {socket.gethostname()} "
                        "(`relief convert`, since 2025-01-01 00:00:00), which is no longer running"], done.stderr
    assert not lock_file(out).exists()  # released at the end


@pytest.mark.survives("concurrent writer", "a training run's lock left by a run that died: taken over")
def test_a_run_takes_over_the_lock_of_a_run_that_died(mini_mlx_f32, tiny_data, tmp_path):
    run = tmp_path / "run"
    pid = dead_pid()
    lock_file(run).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "relief train"}))
    with pytest.warns(ReliefWarning, match=rf"took over the lock of {run} from pid {pid}"):
        result = train(load_recipe(recipe_file(tmp_path, mini_mlx_f32, tiny_data, run, "train.iterations=1")))
    assert result.status == "finished" and not lock_file(run).exists()


@pytest.mark.survives("concurrent writer", "a lock held on another machine (shared disk): refused, with the way out")
def test_a_lock_recorded_by_another_host_is_refused_with_the_file_to_delete(tmp_path):
    out = tmp_path / "out"
    lock_file(out).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "relief convert", "since": "x"}))
    with pytest.raises(ReliefError, match=rf"locked by pid 1 on elsewhere .*; if that process is gone, delete "
                                          rf"{lock_file(out)}"):
        with folder_lock(out):
            pass


@pytest.mark.survives("concurrent writer", "the lock is re-entrant within one process and released on error")
def test_the_lock_nests_in_one_process_and_is_released_by_an_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), folder_lock(out), folder_lock(out):  # a writer that calls another writer
        assert json.loads(lock_file(out).read_text())["pid"] == os.getpid()
        raise RuntimeError("a bug")
    assert not lock_file(out).exists()
    with folder_lock(out):  # free again
        pass


@pytest.mark.survives("concurrent writer", "the lock's owner dies by SIGKILL: the next writer takes over")
def test_the_kernel_releases_the_lock_of_a_killed_writer(tmp_path, holder):
    out = tmp_path / "out"
    owner = holder(out)
    owner.kill()
    owner.wait(timeout=30)
    deadline = time.monotonic() + 10
    with pytest.warns(ReliefWarning, match=rf"took over the lock of {out} from pid {owner.pid}"):
        while True:  # the flock goes with the process
            try:
                with folder_lock(out):
                    break
            except ReliefError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
