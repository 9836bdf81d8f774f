"""The fault-injection and hostile-input suite (issue #16): what survives what.

Every test here carries `@pytest.mark.survives(KIND, WHAT)`: KIND is one of `KINDS`, WHAT says
which fault or input. A parametrized case is one variant; a test that tries several faults in one
run (a chain of kills) counts each with `survival.tried(label)`. With `RELIEF_SURVIVAL_REPORT=FILE`
set, each test's kind, what, variants and outcome are appended to FILE as JSON lines:
`benchmarks/survival.py` runs this folder so and writes the README table from it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

KINDS = ("kill", "signal", "full disk", "concurrent writer", "torn file", "hostile checkpoint", "hostile data",
         "absurd sizes", "fuzzed input", "server abuse")


def pytest_configure(config):
    config.addinivalue_line("markers", "survives(kind, what): a fault or hostile input this test tries (issue #16)")


class Survival:
    """Labels of the variants one test tried (none: the test is one variant)."""

    def __init__(self) -> None:
        self.labels: list[str] = []

    def tried(self, label: str) -> None:
        self.labels.append(label)


@pytest.fixture
def survival(request) -> Survival:
    tracker = Survival()
    request.node.survival = tracker
    return tracker


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("survives")
    file = os.environ.get("RELIEF_SURVIVAL_REPORT")
    if marker is None or not file or report.when != "call":
        return
    kind, what = marker.args
    assert kind in KINDS, f"{item.nodeid}: survives kind {kind!r} is not one of {KINDS}"
    labels = getattr(getattr(item, "survival", None), "labels", [])
    with open(file, "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": kind, "what": what, "test": item.nodeid, "outcome": report.outcome,
                            "variants": len(labels) or 1, "labels": labels}) + "\n")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("survives") is None and "tests/safety/" in item.nodeid:
            raise pytest.UsageError(f"{item.nodeid} has no @pytest.mark.survives(kind, what)")


# ---------------------------------------------------------------- a small full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs where root may mount one (`mount -t tmpfs`); None elsewhere (the tests then
    make the same writes fail with RELIEF_FAULT=enospc, the writer that raises ENOSPC)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill `disk` up to `leave` free bytes with one file; returns it (delete it to free the space)."""
    import shutil

    filler = disk / "filler"
    with open(filler, "wb") as f:
        free = shutil.disk_usage(disk).free - leave
        while free > 0:
            chunk = min(free, 1 << 16)
            try:
                f.write(b"\0" * chunk)
                f.flush()
            except OSError:
                break
            free = shutil.disk_usage(disk).free - leave
    return filler


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from harness import write_tiny_data

    return write_tiny_data(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def reference_run(mini_mlx_f32, tiny_data, tmp_path_factory):
    """The uninterrupted run of `harness.recipe_file`'s recipe (4 steps, checkpoint and validation
    every 2) that every interrupted run is compared with."""
    from harness import recipe_file

    from relief_mlx.recipe import load_recipe
    from relief_mlx.train import train

    folder = tmp_path_factory.mktemp("reference")
    return train(load_recipe(recipe_file(folder, mini_mlx_f32, tiny_data, folder / "run")))
