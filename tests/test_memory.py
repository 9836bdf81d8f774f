"""The training-memory forecast: exact parts by hand, the activation model's shape, the refusal
and what it proposes (`relief train` printing it: tests/train/test_memory_forecast.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from relief_mlx import memory
from relief_mlx.checkpoint.convert import mlx_config
from relief_mlx.checkpoint.presets import hf_config
from relief_mlx.errors import ReliefError
from relief_mlx.recipe import load_recipe

GIB = 2**30
SEED = load_recipe(Path(__file__).parents[1] / "recipes" / "seed-replica.toml")
CONFIG = mlx_config(hf_config("gpt-oss-20b"), "mxfp4")


def _shape(**changes) -> memory.StepShape:
    base = memory.StepShape(tokens=512, sequence=512, trained=512, trainable=1_990_656,
                            grad_checkpoint=True, loss_chunk=128)
    return replace(base, **changes)


def test_weights_and_lora_state_by_hand():
    parts = memory.train_forecast(CONFIG, 2, True, _shape())
    # 24 x 32 experts x (2880 x 5760 + 2880 x 2880) values at 4.25 bits, + their biases and the rest in bf16
    experts = 24 * 32 * (2880 * 5760 + 2880 * 2880)
    rest = 20_914_757_184 - experts
    assert parts["weights"] == round(experts * 4.25 / 8) + 2 * rest
    assert 12.8 < parts["weights"] / GIB < 12.9  # the published 12.8 GiB
    assert parts["lora_state"] == 5 * 1_990_656 * 2


def test_checkpointing_keeps_layer_inputs_not_layer_activations():
    with_ckpt = memory.train_forecast(CONFIG, 2, True, _shape())["activations"]
    without = memory.train_forecast(CONFIG, 2, True, _shape(grad_checkpoint=False))["activations"]
    assert without > 8 * with_ckpt  # 24 layers' activations against 24 inputs and one layer's
    two = memory.train_forecast(mlx_config(hf_config("gpt-oss-20b-2l"), "mxfp4"), 2, True,
                                _shape(grad_checkpoint=False))["activations"]
    assert without == 12 * two  # linear in layers
    # the checkpointed step adds one 512 x 2880 bf16 input per layer
    six = memory.train_forecast(mlx_config(hf_config("gpt-oss-20b-6l"), "mxfp4"), 2, True, _shape())["activations"]
    assert with_ckpt - six == 18 * 512 * 2880 * 2


def test_chunked_head_is_two_chunks_of_logits():
    chunked = memory.train_forecast(CONFIG, 2, True, _shape())["loss_head"]
    # measured at the real widths: 32 bytes a logit in bf16 (two chunks of 16), 24 in float32
    assert chunked == 128 * 201_088 * 32 + 512 * 2880 * 2
    assert memory.train_forecast(CONFIG, 4, True, _shape())["loss_head"] == 128 * 201_088 * 24 + 512 * 2880 * 4
    full = memory.train_forecast(CONFIG, 2, True, _shape(loss_chunk=0))["loss_head"]
    assert full == 512 * 201_088 * 14  # bf16 logits, their float32 copy, softmax and its gradient
    assert chunked < full


def test_seed_replica_forecast_fits_its_target():
    """Issue 15's target: the seed replica on gpt-oss-20b (MXFP4, bf16) at or under 14.5 GiB."""
    parts = memory.recipe_forecast(SEED, CONFIG, 2)
    assert parts["total"] <= 14.5 * GIB
    no_ckpt = memory.recipe_forecast(replace(SEED, train=replace(SEED.train, grad_checkpoint=False)), CONFIG, 2)
    assert no_ckpt["total"] > 17 * GIB  # what the H200 measured without checkpointing: 17.9 GiB


def test_refusal_names_the_numbers_and_the_changes_that_fit():
    recipe = replace(SEED, train=replace(SEED.train, grad_checkpoint=False))
    with pytest.raises(ReliefError) as e:
        memory.check_recipe_fits(recipe, CONFIG, 2, (15 * GIB, "test limit"), "gpt-oss-20b, bfloat16")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("gpt-oss-20b, bfloat16: the training step needs about 19.0 GiB: weights 12.8")
    assert "this machine has 15.0 GiB (test limit)" in message
    assert "train.grad_checkpoint = true (14.1 GiB)" in message
    assert "data.max_length = " in message and "train.memory_check=false" in message
    with pytest.raises(ReliefError, match="no recipe change fits"):
        memory.check_recipe_fits(SEED, CONFIG, 2, (12 * GIB, "test limit"), "here")
    assert memory.check_recipe_fits(SEED, CONFIG, 2, (16 * GIB, "test limit"), "here")["total"] < 16 * GIB
