"""Absurd sizes are refused before anything is allocated, with the numbers: a LoRA rank of 10^9, a
config of hidden size 10^9, weights larger than the machine. The memory guard compares the
estimate with what the backend can use (here: available RAM; on a Mac, Metal's working set)."""

from __future__ import annotations

import json

import pytest
from harness import clone, one_line_error, recipe_file, relief

import relief_mlx
from relief_mlx.checkpoint import limits
from relief_mlx.errors import ReliefError
from relief_mlx.recipe import load_recipe
from relief_mlx.train import train

RANKS = [10**9, 10**5, 129]


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.survives("absurd sizes", "lora.rank above what a layer can hold (10^9 segfaulted, 10^5 hung)")
def test_a_lora_rank_above_the_layer_is_refused_before_training(rank, mini_mlx_f32, tiny_data, tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, mini_mlx_f32, tiny_data, tmp_path / "run", f"lora.rank={rank}"))
    with pytest.raises(ReliefError, match=rf"lora.rank = {rank} is above 128, the smaller side of "
                                          r"self_attn\.\w_proj \(128 x \d+\); .* lower lora.rank"):
        train(recipe)
    assert not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.survives("absurd sizes", "train.batch_size 10^5, more examples than the split holds (segfaulted at "
                                      "13.5 GB)")
def test_a_batch_larger_than_the_training_split_is_refused(mini_mlx_f32, tiny_data, tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, mini_mlx_f32, tiny_data, tmp_path / "run", "train.batch_size=100000"))
    with pytest.raises(ReliefError, match=r"the training step needs about [\d,.]+ GiB.* it would fit with "
                                          r"train.batch_size = \d+ "):
        train(recipe)  # the memory forecast, before anything is loaded
    recipe = load_recipe(recipe_file(tmp_path, mini_mlx_f32, tiny_data, tmp_path / "run", "train.batch_size=100000",
                                     "train.memory_check=false"))
    with pytest.raises(ReliefError, match=r"train.batch_size = 100000 is more than the 6 training examples; lower it "
                                          r"to 6 or less"):
        train(recipe)


@pytest.mark.survives("absurd sizes", "relief inspect --recipe with a rank of 10^9: refused with the reason")
def test_inspect_refuses_a_rank_no_layer_can_hold(mini_mlx_f32, tiny_data, tmp_path):
    recipe = recipe_file(tmp_path, mini_mlx_f32, tiny_data, tmp_path / "run", "lora.rank=1000000000")
    line = one_line_error(relief("inspect", str(mini_mlx_f32), "--recipe", str(recipe)))
    assert "lora.rank = 1000000000 is above 128" in line, line


CONFIGS = {"hidden_size 10^9": {"hidden_size": 10**9}, "vocab_size 10^12": {"vocab_size": 10**12},
           "num_hidden_layers 10^6": {"num_hidden_layers": 10**6, "layer_types": None},
           "num_local_experts 10^7": {"num_local_experts": 10**7}}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.survives("absurd sizes", "a config.json whose sizes need more memory than the machine: refused with the "
                                      "numbers before anything is allocated")
def test_a_config_of_absurd_sizes_is_refused_with_the_numbers(name, mini_mlx_f32, tmp_path):
    config = json.loads((mini_mlx_f32 / "config.json").read_text()) | CONFIGS[name]
    folder = clone(mini_mlx_f32, tmp_path / "model", {"config.json": json.dumps(config).encode()})
    with pytest.raises(ReliefError, match=r"loading the model needs about [\d,.]+ GiB \(\d+ layers, hidden size "
                                          r"\d+, .*\) but this machine has [\d,.]+ GiB \(.*\); use a machine with "
                                          r"more memory"):
        relief_mlx.load(folder)


@pytest.mark.survives("absurd sizes", "relief inspect of a 10^9 hidden size: every storage marked as not fitting")
def test_inspect_marks_weights_this_machine_cannot_hold(mini_mlx_f32, tmp_path):
    """Regression: inspect reported a 10^9 hidden size without a warning."""
    config = json.loads((mini_mlx_f32 / "config.json").read_text()) | {"hidden_size": 10**9}
    folder = clone(mini_mlx_f32, tmp_path / "model", {"config.json": json.dumps(config).encode()})
    done = relief("inspect", str(folder))
    assert done.returncode == 0, done.stderr
    rows = done.stdout.split("weights in memory")[1].splitlines()[1:5]
    assert "(this machine:" in done.stdout and all(r.endswith("does not fit") for r in rows), done.stdout


@pytest.mark.survives("absurd sizes", "the memory guard on each backend: Metal's working set, CUDA memory, CPU RAM")
def test_the_memory_guard_uses_each_backends_limit(monkeypatch):
    for limit, source in ((24 * 2**30, "Metal's recommended working set"), (80 * 2**30, "GPU memory"),
                          (12 * 2**30, "available RAM")):
        monkeypatch.setattr(limits, "available", lambda limit=limit, source=source: (limit, source))
        limits.check_memory("x", limit, "fix")  # exactly what fits
        with pytest.raises(ReliefError, match=rf"x needs about [\d.]+ GiB but this machine has {limit // 2**30}\.0 GiB "
                                              rf"\({source}\); fix, or set RELIEF_MEMORY_CHECK=off to try anyway"):
            limits.check_memory("x", limit + 2**30, "fix")
    monkeypatch.setenv("RELIEF_MEMORY_CHECK", "off")
    limits.check_memory("x", 10**30, "fix")  # the user said so


@pytest.mark.survives("absurd sizes", "relief convert whose output cannot fit in memory: refused with the numbers")
def test_convert_refuses_a_conversion_the_machine_cannot_hold(mini_hf, tmp_path, monkeypatch):
    from relief_mlx.checkpoint.convert import convert

    monkeypatch.setattr(limits, "available", lambda: (2**20, "available RAM"))
    with pytest.raises(ReliefError, match=r"converting .* needs about 0\.\d GiB \(the largest shard and its converted "
                                          r"tensors\) but this machine has 0\.0 GiB \(available RAM\)"):
        convert(mini_hf, tmp_path / "out", experts="float32", dtype="float32")
    assert not (tmp_path / "out").exists()
