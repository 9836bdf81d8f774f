"""SIGTERM and SIGINT (a scheduler, Ctrl-C, a closed laptop's session) in the middle of a write:
training checkpoints and stops (exit 130); every other command unwinds, removing its partial
output (SIGTERM: exit 143, one line); what was complete stays, and the rerun continues. The
signal comes from the RELIEF_FAULT hook at a named write, so it lands where the test says."""

from __future__ import annotations

import json

import pytest
from harness import assert_close, leftovers, metrics_steps, recipe_file, relief

CONVERT = ("convert", "--experts", "float32", "--dtype", "float32")


@pytest.mark.parametrize("signal_name,code,line", [("sigterm", 143, "stopped by SIGTERM"), ("sigint", 1, "Aborted!")])
@pytest.mark.survives("signal", "SIGTERM / SIGINT to relief convert while it writes a shard")
def test_a_signal_during_convert_removes_the_partial_output(signal_name, code, line, mini_hf, tmp_path):
    out = tmp_path / "converted"
    done = relief(CONVERT[0], str(mini_hf), "--out", str(out), *CONVERT[1:],
                  fault=f"{signal_name}:1:write {out}/model-00002-of-00003.safetensors")
    assert done.returncode == code and line in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.survives("signal", "Ctrl-C (SIGINT) to relief train: it checkpoints, stops, and --resume continues "
                                "(SIGTERM: test_disk)")
def test_a_signal_during_training_checkpoints_and_the_run_resumes_exactly(mini_mlx_f32, tiny_data, tmp_path,
                                                                          reference_run):
    reference = reference_run
    run = tmp_path / "run"
    recipe = recipe_file(tmp_path, mini_mlx_f32, tiny_data, run)
    done = relief("train", str(recipe), fault=f"sigint:3:append {run}/metrics.jsonl")  # in step 2's validation
    assert done.returncode == 130 and f"continue with `relief train --resume {run}`" in done.stderr, done.stderr
    assert json.loads((run / "checkpoint" / "state.json").read_text())["progress"]["step"] == 3
    assert relief("train", "--resume", str(run)).returncode == 0
    assert metrics_steps(run) == ([1, 2, 3, 4], [2, 4])
    for name in ("adapters.safetensors", "checkpoint/optimizer.safetensors", "best/adapters.safetensors"):
        assert_close(reference.run_dir / name, run / name, 1e-6)


@pytest.mark.survives("signal", "SIGTERM to relief eval between answers: the answers so far are kept, the rerun "
                                "continues")
def test_a_signal_during_eval_keeps_the_answers_and_the_rerun_continues(mini_mlx_f32, tiny_data, tmp_path):
    out = tmp_path / "eval"
    args = ("eval", "--model", str(mini_mlx_f32), "--data", str(tiny_data), "--max-tokens", "4", "--batch-size", "1",
            "--out", str(out))
    done = relief(*args, fault=f"sigterm:2:append {out}/examples.partial.jsonl")
    assert done.returncode == 143 and "stopped by SIGTERM" in done.stderr, done.stderr
    kept = (out / "examples.partial.jsonl").read_text().splitlines()
    assert len(kept) == 2 and all(json.loads(line)["variant"] == "base" for line in kept)
    again = relief(*args)
    assert again.returncode == 0 and "2 answers already in" in again.stderr, again.stderr
    assert leftovers(out) == [] and leftovers(tmp_path) == []
