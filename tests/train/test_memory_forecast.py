"""`relief train` prints the memory forecast before it starts, and refuses, before loading the
model, a recipe the machine cannot hold (relief_mlx.memory)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from relief_mlx.recipe import to_toml


def test_train_prints_the_forecast_and_refuses_before_loading(make_recipe, tmp_path, monkeypatch):
    from relief_mlx.bench import memory as bench_memory
    from relief_mlx.cli import cli
    from relief_mlx.train import trainer

    file = tmp_path / "r.toml"
    file.write_text(to_toml(make_recipe("train.iterations=1", name="fits")))
    result = CliRunner().invoke(cli, ["train", str(file)])
    assert result.exit_code == 0, result.output
    assert re.search(r"memory forecast \(float32\): \d+\.\d GiB: weights \d+\.\d \+ activations .* of "
                     r"\d+\.\d GiB \(", result.output), result.output

    monkeypatch.setattr(bench_memory, "available_memory", lambda: (1 << 20, "test limit"))
    monkeypatch.setattr(trainer, "load", lambda *a: pytest.fail("loaded the model before refusing"))
    file.write_text(to_toml(make_recipe("train.iterations=1", name="refused")))
    result = CliRunner().invoke(cli, ["train", str(file)])
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert "this machine has 0.0 GiB (test limit)" in line and "train.memory_check=false" in line
    assert not (tmp_path / "refused").exists()
