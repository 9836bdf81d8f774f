"""Recipes: every file in recipes/ loads, TOML maps 1:1 to the dataclasses, errors name key and
file, --set overrides, the resolved recipe round-trips, and every field reaches the trainer."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from relief_mlx import recipe as recipe_module
from relief_mlx.errors import ReliefError
from relief_mlx.recipe import SECTIONS, from_dict, load_recipe, to_toml

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.toml"))


def test_the_three_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"seed-replica", "relief-default", "mini"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_validates_and_starts_with_its_command(path):
    recipe = load_recipe(path)
    assert from_dict(recipe.to_dict()) == recipe
    head = path.read_text().splitlines()[:6]
    assert head[0].startswith(f"# relief train recipes/{path.name}")
    assert any("--set " in line for line in head), "the first lines show a --set override"
    tables = recipe_module.read_tables(path)
    assert all(isinstance(v, dict) for v in tables.values())


def test_seed_replica_is_the_original_run():
    r = load_recipe(Path(__file__).parents[1] / "recipes" / "seed-replica.toml")
    assert (r.lora.rank, r.lora.alpha, r.lora.targets) == (8, 16.0, ("self_attn.q_proj", "self_attn.v_proj"))
    assert (r.train.learning_rate, r.train.epochs, r.train.batch_size, r.train.grad_accumulation) == (1e-4, 3, 1, 8)
    assert (r.data.max_length, r.train.grad_checkpoint, r.validation.every) == (512, True, 0)


def test_every_field_has_a_one_line_doc():
    for cls in SECTIONS.values():
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        documented = {node.target.id for node, doc in zip(body, body[1:], strict=False)
                      if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr)
                      and isinstance(doc.value, ast.Constant) and "\n" not in doc.value.value.strip()}
        assert documented == {f.name for f in dataclasses.fields(cls)}, cls.__name__


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text('[model]\npath = "m"\n' + text)
    return path


@pytest.mark.parametrize("text,message", [
    ("[train]\nbatch_size = \"4\"\n", r"r.toml: train.batch_size must be int, not str '4'"),
    ("[train]\nbatch_size = true\n", r"r.toml: train.batch_size must be int, not bool"),
    ("[train]\nlearning_rate = \"fast\"\n", r"r.toml: train.learning_rate must be float"),
    ("[lora]\ntargets = \"self_attn.q_proj\"\n", r"r.toml: lora.targets must be a list of str"),
    ("[train]\nbatchsize = 4\n", r"r.toml: unknown key train.batchsize; known keys of \[train\]: epochs"),
    ("[trainer]\nepochs = 1\n", r"r.toml: unknown section \[trainer\]"),
    ("[train]\nbatch_size = 0\n", r"r.toml: train.batch_size = 0 is invalid: it must be at least 1"),
    ("[lora]\ndropout = 1.5\n", r"r.toml: lora.dropout = 1.5 is invalid"),
    ("[train\n", r"r.toml is not valid TOML"),
])
def test_bad_recipes_name_the_key_and_the_file(tmp_path, text, message):
    with pytest.raises(ReliefError, match=message) as e:
        load_recipe(write(tmp_path, text))
    assert "\n" not in str(e.value)


def test_set_overrides_the_file_and_is_type_checked(tmp_path):
    path = write(tmp_path, "[train]\nlearning_rate = 1e-4\n")
    r = load_recipe(path, ["train.learning_rate=2e-4", "model.path=models/other", 'lora.targets=["mlp.experts.*"]',
                           "train.epochs=2", "train.grad_checkpoint=true"])
    assert (r.train.learning_rate, r.model.path, r.lora.targets, r.train.epochs) == (
        2e-4, "models/other", ("mlp.experts.*",), 2)
    assert r.train.grad_checkpoint is True
    with pytest.raises(ReliefError, match=r"with --set: train.epochs must be int, not str 'two'"):
        load_recipe(path, ["train.epochs=two"])
    with pytest.raises(ReliefError, match=r"--set 'epochs=2' is not section.key=value"):
        load_recipe(path, ["epochs=2"])


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, '[data]\ncurrent_date = "2025-01-02"\n[train]\nbetas = [0.8, 0.95]\n'),
                    ["output.dir=adapters/x y"])
    saved = tmp_path / "saved.toml"
    saved.write_text(to_toml(r))
    assert load_recipe(saved) == r


def test_defaults_are_the_fast_safe_choice():
    """Regression: compile = true by default with pad_multiple = 1 retraced the micro-step for
    every new length (no gain measured on CPU, a minute of JIT per shape)."""
    r = from_dict({"model": {"path": "m"}})
    assert r.train.compile is False and r.train.pad_multiple == 1
