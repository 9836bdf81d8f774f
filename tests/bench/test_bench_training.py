"""The bench's LoRA step: the seed replica's shape is the recipe's, and the memory breakdown."""

from __future__ import annotations

from pathlib import Path

from relief_mlx.bench.training import memory_breakdown, train_shape
from relief_mlx.recipe import load_recipe

SEED = Path(__file__).parents[2] / "recipes" / "seed-replica.toml"


def test_built_in_shape_is_the_seed_replica_recipe():
    """Guards the bench timing a step the seed replica never runs (no checkpointing, compiled)."""
    recipe, built_in = load_recipe(SEED), train_shape()
    assert built_in.lora == recipe.lora and built_in.seq == recipe.data.max_length
    for field in ("batch_size", "grad_checkpoint", "compile", "loss_chunk", "learning_rate", "betas", "eps",
                  "weight_decay", "max_grad_norm", "pad_multiple"):
        assert getattr(built_in.train, field) == getattr(recipe.train, field), field


def test_memory_breakdown_parts(mini_mlx_f32):
    from relief_mlx import load
    from relief_mlx.train.targets import apply_lora

    model, _ = load(mini_mlx_f32)
    shape = train_shape(seq=64)
    apply_lora(model, shape.lora)
    parts = memory_breakdown(model, shape)
    lora = 4 * 8 * (128 + 256 + 128 + 128) * 4  # 4 layers, r8: q (128 -> 256) and v (128 -> 128), float32
    assert parts["lora_state"] == 5 * lora
    # the chunked head holds a few (64, 201088) float32 arrays at a time: 51 MB each
    assert 2 * 64 * 201_088 * 4 < parts["loss_head"] < 6 * 64 * 201_088 * 4
    assert 0 < parts["activations"] < parts["loss_head"]  # 4 layers of 64 tokens at width 128

