"""The recipes and the dataset ship in the wheel from one place (the top-level recipes/ and
datasets/), and a bundled name resolves from any folder: `relief demo` works after
`pip install` outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from relief_mlx import bundled
from relief_mlx.data.dataset import load_dataset
from relief_mlx.errors import ReliefError
from relief_mlx.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_names_resolve_from_any_folder_and_a_real_path_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("recipes/mini.toml", "mini.toml"):
        assert load_recipe(name).train.iterations == 30
    assert set(load_dataset("datasets/emergency_relief").splits) == {"train", "valid", "test"}
    assert load_dataset("emergency_relief").root == str(bundled.root("datasets") / "emergency_relief")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mini.toml").write_text('[model]\npath = "mine"\n')
    assert load_recipe("recipes/mini.toml").model.path == "mine"  # the user's file, not the bundled one
    with pytest.raises(ReliefError, match=r"recipe nope.toml does not exist; .*bundled recipe \(mini.toml, "):
        load_recipe("nope.toml")


def _source_copy(dest: Path) -> Path:
    """What a wheel is built from: the repository's files, without build leftovers."""
    dest.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("relief_mlx", "recipes", "datasets"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.mark.slow
def test_the_wheel_carries_recipes_and_dataset_and_runs_the_demo_from_an_empty_folder(tmp_path):
    """Regression: recipes/ and datasets/ were not in the wheel, so `relief demo` worked only in a clone."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_CURRENT_TEST")}
    run = lambda *args, **kw: subprocess.run(args, env=env, capture_output=True, text=True,  # noqa: E731
                                             check=True, timeout=600, **kw)
    run(sys.executable, "-m", "pip", "wheel", str(_source_copy(tmp_path / "src")), "--no-deps",
        "--no-build-isolation", "-w", str(tmp_path / "wheels"))
    (wheel,) = (tmp_path / "wheels").glob("relief_mlx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in ("recipes", "datasets"):
        for f in (ROOT / kind).rglob("*"):
            if f.is_file():
                assert f"relief_mlx/{kind}/{f.relative_to(ROOT / kind)}" in names

    # a fresh venv: mlx and the other dependencies from this Python, relief_mlx from the wheel
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    run(str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", str(wheel))
    empty = tmp_path / "empty"
    empty.mkdir()
    where = run(str(python), "-c", "import relief_mlx; print(relief_mlx.__file__)", cwd=empty).stdout.strip()
    assert where.startswith(str(venv)), where
    done = run(str(venv / "bin" / "relief"), "demo", "--out", "runs", "--set", "train.iterations=2",
               "--set", "validation.max_batches=1", "--max-tokens", "4", cwd=empty)
    assert "adapters -> runs/adapter" in done.stdout, done.stdout + done.stderr
    summary = json.loads((empty / "runs" / "adapter" / "summary.json").read_text())
    bundled_train = len((ROOT / "datasets" / "emergency_relief" / "train.jsonl").read_text().splitlines())
    assert summary["steps"] == 2 and summary["data"]["train"]["examples"] == bundled_train
    assert sorted(p.name for p in empty.iterdir()) == ["runs"]  # nothing written outside --out
