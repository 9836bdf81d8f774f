"""SIGKILL inside every kind of write `relief train`, `relief convert` and `relief eval` make, then
resume or run again: the result equals an uninterrupted run, and no output ever looks complete
when it is not. The kill comes from the `RELIEF_FAULT` hook (relief_mlx.io): the process tears
the file it is writing and SIGKILLs itself at the named write point, so every point is hit, not
whichever a timer happens to land on."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
from harness import (
    assert_close,
    complete_or_absent,
    launch,
    leftovers,
    metrics_steps,
    recipe_file,
    relief,
)

from relief_mlx.recipe import load_recipe
from relief_mlx.train import train

# Each process of the chain dies at the first write matching its label; the next one resumes.
# The chain is ordered so that each label is reached: the first four die before any complete
# checkpoint (so --resume starts over), the swaps die between the two renames of a replacement.
TRAIN_CHAIN = [
    ("a metrics.jsonl line before the first checkpoint", "append {run}/metrics.jsonl"),
    ("best/adapters.safetensors, the first best adapter", "write {run}/best/adapters.safetensors"),
    ("checkpoint/optimizer.safetensors, the first checkpoint", "write {run}/checkpoint/optimizer.safetensors"),
    ("checkpoint/state.json", "write {run}/checkpoint/state.json"),
    ("the checkpoint's manifest", "write {run}/checkpoint/relief-manifest.json"),
    ("the run's adapters.safetensors", "write {run}/adapters.safetensors"),
    ("between the two renames that replace best/", "swap {run}/best"),
    ("between the two renames that replace checkpoint/", "swap {run}/checkpoint"),
    ("summary.json", "write {run}/summary.json"),
]
RTOL = 1e-6  # a resumed run recomputes the same steps: float32 rounding at most


@pytest.mark.slow
@pytest.mark.survives("kill", "relief train: SIGKILL inside each kind of write, then --resume")
def test_train_killed_in_every_kind_of_write_resumes_to_the_uninterrupted_adapter(
        mini_mlx_f32, tiny_data, tmp_path, survival, reference_run):
    """Regression: a run killed before its first checkpoint could be neither resumed ("no complete
    checkpoint") nor started again ("already holds files")."""
    reference = reference_run
    run = tmp_path / "run"
    recipe = recipe_file(tmp_path, mini_mlx_f32, tiny_data, run)
    for number, (what, label) in enumerate(TRAIN_CHAIN):
        args = ("train", str(recipe)) if number == 0 else ("train", "--resume", str(run))
        done = relief(*args, fault=f"kill:1:{label.format(run=run)}")
        assert done.returncode == -signal.SIGKILL, f"{what}: the fault never fired\n{done.stderr}"
        assert "Traceback" not in done.stderr, done.stderr
        complete_or_absent(run / "checkpoint", run / "best")
        assert not (run / "summary.json").exists(), what
        survival.tried(what)
    finished = relief("train", "--resume", str(run))
    assert finished.returncode == 0, finished.stderr
    warnings = [line for line in finished.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings and all("took over the lock" in w or "took its place" in w for w in warnings), warnings

    for name in ("adapters.safetensors", "checkpoint/adapters.safetensors", "checkpoint/optimizer.safetensors",
                 "best/adapters.safetensors"):
        assert_close(reference.run_dir / name, run / name, RTOL)
    assert metrics_steps(run) == ([1, 2, 3, 4], [2, 4])  # no torn line, no step twice
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["best_val_loss"] == pytest.approx(reference.summary["best_val_loss"],
                                                                               rel=RTOL)
    assert leftovers(run) == [] and leftovers(tmp_path) == []


# ---------------------------------------------------------------- convert


CONVERT_POINTS = [
    ("the first output shard", "write {out}/model-00001-of-00003.safetensors"),
    ("tokenizer.json", "write {out}/tokenizer.json"),
    ("the manifest, written last", "write {out}/relief-manifest.json"),
]


@pytest.mark.slow
@pytest.mark.survives("kill", "relief convert: SIGKILL inside each output file, then run again")
def test_convert_killed_in_any_file_leaves_no_folder_and_runs_again(mini_hf, mini_mlx_f32, tmp_path, survival):
    out = tmp_path / "converted"
    for what, label in CONVERT_POINTS:
        done = relief("convert", str(mini_hf), "--out", str(out), "--experts", "float32", "--dtype", "float32",
                      fault=f"kill:1:{label.format(out=out)}")
        assert done.returncode == -signal.SIGKILL, f"{what}: the fault never fired\n{done.stderr}"
        assert not out.exists(), what  # the partial folder is never renamed into place
        assert any(".converted.partial-" in name for name in leftovers(tmp_path))
        survival.tried(what)
    again = relief("convert", str(mini_hf), "--out", str(out), "--experts", "float32", "--dtype", "float32")
    assert again.returncode == 0, again.stderr
    assert leftovers(tmp_path) == []  # the dead writers' partial folders went with the first new write
    for shard in sorted(mini_mlx_f32.glob("model-*.safetensors")):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name


@pytest.mark.slow
@pytest.mark.survives("kill", "relief convert --overwrite: SIGKILL between the two renames of the replacement")
def test_convert_killed_while_replacing_an_output_keeps_one_whole_copy(mini_hf, mini_mlx_f32, tmp_path):
    out = tmp_path / "converted"
    shutil.copytree(mini_mlx_f32, out)
    done = relief("convert", str(mini_hf), "--out", str(out), "--experts", "float32", "--dtype", "float32",
                  "--overwrite", fault=f"kill:1:swap {out}")
    assert done.returncode == -signal.SIGKILL, done.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".converted.")]
    assert not out.exists() and aside  # both copies are whole, under their temporary names
    complete_or_absent(*[p for p in aside if (p / "relief-manifest.json").is_file()])
    again = relief("convert", str(mini_hf), "--out", str(out), "--experts", "float32", "--dtype", "float32")
    assert again.returncode == 0, again.stderr
    assert leftovers(tmp_path) == []
    complete_or_absent(out)


# ---------------------------------------------------------------- eval


@pytest.mark.slow
@pytest.mark.survives("kill", "relief eval: SIGKILL inside an answer's append, inside the report, then run again")
def test_eval_killed_mid_answer_or_mid_report_resumes_to_the_same_report(mini_mlx_f32, tiny_data, tmp_path,
                                                                         survival):
    args = ["eval", "--model", str(mini_mlx_f32), "--data", str(tiny_data), "--max-tokens", "4",
            "--batch-size", "1"]
    straight = relief(*args, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "eval"
    for what, label in [("the second answer's line", "append {out}/examples.partial.jsonl"),
                        ("report.md", "write {out}/report.md")]:
        number = 2 if "second" in what else 1
        done = relief(*args, "--out", str(out), fault=f"kill:{number}:{label.format(out=out)}")
        assert done.returncode == -signal.SIGKILL, f"{what}: the fault never fired\n{done.stderr}"
        assert not (out / "relief-manifest.json").exists()  # not a complete report
        survival.tried(what)
    again = relief(*args, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "answers already in" in again.stderr  # resumed, not redone
    complete_or_absent(out)
    want = [json.loads(line) for line in (tmp_path / "straight" / "examples.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert [(r["id"], r["answer"], r["generated_tokens"]) for r in got] == \
        [(r["id"], r["answer"], r["generated_tokens"]) for r in want]
    assert leftovers(out) == []


# ---------------------------------------------------------------- two ranks


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not installed")
@pytest.mark.survives("kill", "relief train on 2 ranks (mlx.launch): SIGKILL of rank 0 inside a checkpoint write, "
                              "then --resume on 2 ranks")
def test_two_ranks_killed_inside_a_checkpoint_write_resume_to_the_one_rank_adapter(mini_mlx_f32, tiny_data,
                                                                                   tmp_path):
    """Rank 0 dies inside the step-4 checkpoint; rank 1 loses its peer at step 5 and says so in one
    line; both resume from the step-2 checkpoint and end where one rank accumulating both ranks'
    micro-batches ends."""
    overrides = ("train.iterations=6",)
    reference = train(load_recipe(recipe_file(tmp_path, mini_mlx_f32, tiny_data, tmp_path / "one", *overrides)))
    run = tmp_path / "two"
    recipe = recipe_file(tmp_path, mini_mlx_f32, tiny_data, run, *overrides)
    killed = launch("train", str(recipe), fault=f"kill:2:write {run}/checkpoint/optimizer.safetensors")
    assert "Traceback" not in killed.stderr, killed.stderr
    assert "error: rank 1 of 2 lost the others" in killed.stderr, killed.stderr
    assert "the checkpoint of step 2 is intact" in killed.stderr
    complete_or_absent(run / "checkpoint", run / "best")
    resumed = launch("train", "--resume", str(run))
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    for name in ("adapters.safetensors", "checkpoint/adapters.safetensors", "checkpoint/optimizer.safetensors",
                 "best/adapters.safetensors"):
        assert_close(reference.run_dir / name, run / name, 1e-4)  # ranks sum in another order: float32 rounding
    assert metrics_steps(run)[0] == [1, 2, 3, 4, 5, 6]
    assert leftovers(run) == [] and leftovers(tmp_path) == []


# ---------------------------------------------------------------- fuse and export


@pytest.mark.slow
@pytest.mark.survives("kill", "relief fuse / relief export (hf, gguf): SIGKILL inside an output file, then run again")
def test_fuse_and_export_killed_in_a_file_leave_nothing_and_run_again(mini_mlx_f32, reference_run, tmp_path,
                                                                      survival):
    adapter = str(reference_run.run_dir)
    commands = {
        "fuse": (("fuse", "--model", str(mini_mlx_f32), "--adapter", adapter, "--out"), "fused", "{out}/", 1),
        "export --format hf": (("export", "--model", str(mini_mlx_f32), "--adapter", adapter, "--format", "hf",
                                "--out"), "hf", "{out}/", 3),
        "export --format gguf": (("export", "--model", str(mini_mlx_f32), "--adapter", adapter, "--format", "gguf",
                                  "--out"), "model.gguf", "{dir}/model.", 2),
    }
    for name, (args, target, label, number) in commands.items():  # killed in the number-th file it commits
        out = tmp_path / name.replace(" ", "-") / target
        done = relief(*args, str(out), fault=f"kill:{number}:write {label.format(out=out, dir=out.parent)}")
        assert done.returncode == -signal.SIGKILL, f"{name}: the fault never fired\n{done.stderr}"
        assert not out.exists() and not [p for p in out.parent.iterdir() if not p.name.startswith(".")], name
        survival.tried(f"{name}, file {number}")
        again = relief(*args, str(out))
        assert again.returncode == 0, again.stderr
        assert leftovers(out.parent) == [], name
        complete_or_absent(*([out] if out.is_dir() else []))
