"""`relief train` and `relief inspect --recipe`: thin click commands over the library."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from relief_mlx.cli import cli
from relief_mlx.recipe import to_toml

RECIPES = Path(__file__).parents[2] / "recipes"


def test_inspect_counts_the_seed_replica_lora_from_the_config():
    result = CliRunner().invoke(cli, ["inspect", "gpt-oss-20b", "--recipe", str(RECIPES / "seed-replica.toml")])
    assert result.exit_code == 0, result.output
    assert "1,990,656 trainable of 20,916,747,840 (0.0095%)" in result.output


def test_train_runs_a_recipe_with_set_and_prints_the_run_folder(make_recipe, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(to_toml(make_recipe("train.iterations=2")))
    out = tmp_path / "via-set"
    result = CliRunner().invoke(cli, ["train", str(recipe), "--set", f"output.dir={out}",
                                      "--set", "validation.every=1"])
    assert result.exit_code == 0, result.output
    assert f"adapters -> {out}" in result.output
    assert "step 2/2" in result.output and "validation loss" in result.output
    assert 'dir = "' + str(out) + '"' in (out / "recipe.toml").read_text()  # the resolved recipe, --set applied


def test_train_errors_are_one_line_and_exit_1(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('[model]\npath = "m"\n[train]\nepochs = "3"\n')
    result = CliRunner().invoke(cli, ["train", str(recipe)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {recipe}: train.epochs must be int, not str '3'"]
    result = CliRunner().invoke(cli, ["train"])
    assert result.exit_code == 1 and "pass a recipe" in result.output
    result = CliRunner().invoke(cli, ["train", str(recipe), "--resume", str(tmp_path), "--overwrite"])
    assert result.exit_code == 1 and result.output.strip() == (
        "error: --resume continues a run and --overwrite starts one over; pass one of them")
