"""relief_mlx.io on its own: atomic files and folders, appends, manifests, recovery, the fault hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from relief_mlx import io
from relief_mlx.errors import ReliefError, WriteError


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


@pytest.fixture
def fault(monkeypatch):
    def arm(spec: str) -> None:
        monkeypatch.setattr(io, "_fault_count", [0])
        monkeypatch.setenv("RELIEF_FAULT", spec)

    return arm


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, fault):
    target = tmp_path / "a.json"
    io.write_json(target, {"v": 1})
    fault("enospc:1")
    with pytest.raises(WriteError, match=rf"could not write {target}: No space left on device; what was there is "
                                         "unchanged") as e:
        io.write_json(target, {"v": 2})
    assert e.value.reason == "No space left on device"
    assert json.loads(target.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_the_next_writer_removes_temporaries_of_dead_writers_only(tmp_path):
    target = tmp_path / "a.json"
    dead, live = tmp_path / f".a.json.{dead_pid()}.x1.tmp", tmp_path / f".a.json.{os.getppid()}.x2.tmp"
    dead.write_text("half"), live.write_text("being written")
    io.write_json(target, {})
    assert not dead.exists() and live.exists()


def test_a_failed_append_is_cut_back_off(tmp_path, fault):
    log = tmp_path / "metrics.jsonl"
    io.append_line(log, '{"step": 1}')
    fault("enospc:1:append")
    with pytest.raises(WriteError, match="could not append to .*: No space left on device; the file is as it was"):
        io.append_line(log, '{"step": 2, "loss": 1.5}')
    assert log.read_text() == '{"step": 1}\n'


def test_a_killed_append_tears_only_the_new_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    io.append_line(log, '{"step": 1}')
    code = ("import sys; from relief_mlx import io; io.append_line(sys.argv[1], '{\"step\": 2, \"loss\": 1.5}')")
    done = subprocess.run([sys.executable, "-c", code, str(log)], env=os.environ | {"RELIEF_FAULT": "kill:1"})
    assert done.returncode == -9
    first, torn = log.read_text().split("\n")
    assert first == '{"step": 1}' and 0 < len(torn) < len('{"step": 2, "loss": 1.5}')


def test_atomic_dir_refuses_an_output_that_appeared_while_it_was_built(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ReliefError, match="already exists and is not empty"), io.atomic_dir(out, lock=False) as tmp:
        (tmp / "a").write_text("mine")
        out.mkdir()
        (out / "b").write_text("another writer's, without a lock")
    assert [p.name for p in out.iterdir()] == ["b"] and io.leftovers(out) == []


def test_a_swap_that_fails_puts_the_previous_folder_back(tmp_path, fault):
    out = tmp_path / "out"
    with io.atomic_dir(out) as tmp:
        (tmp / "v").write_text("1")
    fault(f"enospc:1:swap {out}")
    with pytest.raises(WriteError), io.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "1" and io.leftovers(out) == []


def test_the_manifest_names_a_missing_or_changed_file(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"abc")
    io.write_manifest(folder, {"format": "test/1"})
    assert io.check_manifest(folder) is None
    (folder / "a.bin").write_bytes(b"abd")
    assert io.check_manifest(folder) == (f"{folder / 'a.bin'} does not match its sha256 in "
                                         f"{folder / io.MANIFEST}: it is torn or was changed")
    (folder / "a.bin").unlink()
    assert io.check_manifest(folder).startswith(f"{folder / 'a.bin'} is missing")


def test_recovery_takes_the_newest_complete_copy_and_never_a_torn_one(tmp_path):
    path, pid = tmp_path / "checkpoint", dead_pid()
    for name, content in ((f".checkpoint.old-{pid}-1", "old"), (f".checkpoint.partial-{pid}-a", "new"),
                          (f".checkpoint.partial-{pid}-b", "torn")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "state.json").write_text(content)
        io.write_manifest(folder, {})
    (tmp_path / f".checkpoint.partial-{pid}-b" / "state.json").write_text("to")  # torn after its manifest
    done = io.recover_dir(path)
    assert done == f"{path} is missing; the complete copy .checkpoint.partial-{pid}-a took its place"
    assert (path / "state.json").read_text() == "new" and io.leftovers(path) == []
    assert io.recover_dir(path) is None  # whole now: nothing to do


def test_a_fault_spec_that_is_not_understood_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RELIEF_FAULT", "explode:2")
    with pytest.raises(ReliefError, match="RELIEF_FAULT=explode:2 is not ACTION:N"):
        io.write_text(tmp_path / "a", "x")


def test_the_fault_log_lists_every_write_point(tmp_path, monkeypatch):
    monkeypatch.setenv("RELIEF_FAULT_LOG", str(tmp_path / "log"))
    with io.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "b").write_text("b")
        (tmp / "a").write_text("a")
    io.append_line(tmp_path / "m.jsonl", "{}")
    assert (tmp_path / "log").read_text().splitlines() == [
        f"write {tmp_path / 'out' / 'a'}", f"write {tmp_path / 'out' / 'b'}", f"append {tmp_path / 'm.jsonl'}"]
