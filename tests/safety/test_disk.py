"""A full disk: a clear one-line error, what was written before intact, no temporary file left,
and the command continues once there is space. On a real full disk (a 1 MiB tmpfs where root can
mount one) and, at exact write points, through the writer that raises ENOSPC (RELIEF_FAULT=enospc)."""

from __future__ import annotations

import json

import pytest
from conftest import fill
from harness import assert_close, leftovers, metrics_steps, one_line_error, recipe_file, relief

from relief_mlx import io
from relief_mlx.errors import ReliefError
from relief_mlx.recipe import load_recipe
from relief_mlx.train import resume_recipe, train

# Each process of the chain fails at the n-th write matching its label (ENOSPC), then the run is
# resumed (or, when nothing was written, run again) by the next; each label is reached in order.
RUN_WRITES = [
    ("recipe.toml, the run's first write", "write {run}/recipe.toml", 1),
    ("a metrics.jsonl line after a checkpoint (the regression: a half line, then no resume ever)",
     "append {run}/metrics.jsonl", 4),
    ("best/, replacing the best adapter", "write {run}/best/adapters.safetensors", 1),
    ("checkpoint/, replacing the checkpoint", "write {run}/checkpoint/optimizer.safetensors", 1),
    ("the run's adapters.safetensors", "write {run}/adapters.safetensors", 2),
    ("summary.json", "write {run}/summary.json", 1),
]


@pytest.fixture
def no_space(monkeypatch):
    """no_space(label, n): the n-th write matching `label` in this process fails with ENOSPC."""
    def arm(label: str, n: int = 1) -> None:
        monkeypatch.setattr(io, "_fault_count", [0])
        monkeypatch.setenv("RELIEF_FAULT", f"enospc:{n}:{label}")

    yield arm
    monkeypatch.delenv("RELIEF_FAULT", raising=False)


@pytest.fixture
def reference(reference_run):
    return reference_run


@pytest.mark.survives("full disk", "relief train: ENOSPC in each kind of write, then --resume")
def test_a_full_disk_in_any_write_of_a_run_is_one_line_and_the_run_resumes(no_space, reference, mini_mlx_f32,
                                                                           tiny_data, tmp_path, monkeypatch,
                                                                           survival):
    run = tmp_path / "run"
    recipe = load_recipe(recipe_file(tmp_path, mini_mlx_f32, tiny_data, run))
    for what, label, n in RUN_WRITES:
        no_space(label.format(run=run), n)
        with pytest.raises(ReliefError, match=r"No space left on device; (the checkpoint of step \d+ is intact|no "
                                              r"checkpoint was written yet|nothing of the run was written yet)") as e:
            train(resume_recipe(run), resume=run) if (run / "recipe.toml").exists() else train(recipe)
        assert "\n" not in str(e.value), what
        assert leftovers(run) == [] and leftovers(tmp_path) == [], what  # temporary files removed
        if (run / "metrics.jsonl").exists():
            metrics_steps(run)  # every line parses: no half line
        survival.tried(what)
    monkeypatch.delenv("RELIEF_FAULT")
    resumed = train(resume_recipe(run), resume=run)
    assert resumed.status == "finished" and metrics_steps(run) == ([1, 2, 3, 4], [2, 4])
    for name in ("adapters.safetensors", "checkpoint/optimizer.safetensors", "best/adapters.safetensors"):
        assert_close(reference.run_dir / name, run / name, 1e-6)


@pytest.mark.survives("full disk", "relief train stopped by SIGTERM, then on a real full disk (tmpfs), then --resume "
                                   "once there is space")
def test_a_run_on_a_disk_that_fills_stops_in_one_line_and_resumes(small_disk, reference, mini_mlx_f32, tiny_data,
                                                                  tmp_path, no_space):
    disk = small_disk or tmp_path
    run = disk / "run"
    recipe = recipe_file(tmp_path, mini_mlx_f32, tiny_data, run)
    stopped = relief("train", str(recipe), fault=f"sigterm:1:append {run}/metrics.jsonl")  # as a scheduler would
    assert stopped.returncode == 130 and "interrupted at step 2" in stopped.stderr, stopped.stderr
    if small_disk is not None:
        filler = fill(small_disk)
        fault = None
    else:  # no tmpfs here: the next write fails as a full disk does
        filler, fault = None, f"enospc:1:{run}"
    done = relief("train", "--resume", str(run), fault=fault)
    line = one_line_error(done)
    assert "No space left on device" in line and "the checkpoint of step 2 is intact" in line, line
    assert json.loads((run / "checkpoint" / "state.json").read_text())["progress"]["step"] == 2
    assert leftovers(run) == [] and leftovers(disk) == []
    if filler:
        filler.unlink()
    assert relief("train", "--resume", str(run)).returncode == 0
    assert metrics_steps(run)[0] == [1, 2, 3, 4]
    for name in ("adapters.safetensors", "checkpoint/optimizer.safetensors"):
        assert_close(reference.run_dir / name, run / name, 1e-6)


@pytest.mark.survives("full disk", "relief convert onto a disk without room: refused before writing")
def test_convert_onto_a_full_disk_is_refused_before_it_writes(small_disk, mini_hf, tmp_path, monkeypatch):
    if small_disk is None:  # no tmpfs: a disk reporting 1 MiB free
        import shutil

        from relief_mlx.checkpoint import limits

        monkeypatch.setattr(limits.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**20, 2**20, 2**20))
        out = tmp_path / "converted"
    else:
        out = small_disk / "converted"
    from relief_mlx.checkpoint.convert import convert

    with pytest.raises(ReliefError, match=r"converting .* writes about 0\.\d+ GiB but .* has 0\.00 GiB free; free "
                                          r"some space or choose another --out"):
        convert(mini_hf, out, experts="float32", dtype="float32")
    assert not out.exists() and leftovers(out.parent) == []


@pytest.mark.parametrize("label", ["model-00002-of-00003.safetensors", "relief-manifest.json"])
@pytest.mark.survives("full disk", "relief convert: ENOSPC while writing a shard or the manifest")
def test_convert_when_the_disk_fills_midway_removes_its_partial_output(label, mini_hf, tmp_path, no_space):
    from relief_mlx.checkpoint.convert import convert

    out = tmp_path / "converted"
    no_space(f"{out}/{label}")
    with pytest.raises(ReliefError, match=f"could not write {out}: No space left on device; what was there is "
                                          "unchanged and the partial output was removed"):
        convert(mini_hf, out, experts="float32", dtype="float32")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.survives("full disk", "relief eval: ENOSPC appending an answer, then run again")
def test_eval_when_the_disk_fills_keeps_its_answers_and_resumes(mini_mlx_f32, tiny_data, tmp_path, no_space,
                                                                monkeypatch):
    from relief_mlx.eval.run import EvalConfig, evaluate
    from relief_mlx.recipe import DataSection

    out = tmp_path / "eval"
    config = EvalConfig(model=str(mini_mlx_f32), data=DataSection(path=str(tiny_data)), out=str(out), max_tokens=4,
                        batch_size=1)
    no_space(f"append {out}/examples.partial.jsonl", 2)
    with pytest.raises(ReliefError, match="could not append to .*examples.partial.jsonl: No space left on device"):
        evaluate(config)
    kept = (out / "examples.partial.jsonl").read_text().splitlines()
    assert len(kept) == 1 and json.loads(kept[0])["variant"] == "base"  # the first answer, whole
    monkeypatch.delenv("RELIEF_FAULT")
    events = []
    evaluate(config, on_event=lambda kind, e: events.append((kind, e)))
    assert [e["resumed"] for kind, e in events if kind == "start"] == [1]


@pytest.mark.survives("full disk", "relief synth onto a disk without room: refused before writing")
def test_synth_onto_a_full_disk_is_refused_before_it_writes(small_disk, tmp_path, monkeypatch):
    if small_disk is None:
        import shutil

        from relief_mlx.checkpoint import limits

        monkeypatch.setattr(limits.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**20, 2**20, 2**20))
    out = (small_disk or tmp_path) / "mini"
    line = one_line_error(relief("synth", "--preset", "mini", "--out", str(out))) if small_disk else None
    if small_disk is None:
        from relief_mlx.checkpoint.synth import synth

        with pytest.raises(ReliefError) as e:
            synth("mini", out)
        line = str(e.value)
    assert "synthesizing mini writes about" in line and "free" in line, line
    assert not out.exists()
