"""Fixtures of the trainer tests: a tiny chat dataset (short conversations, so a step takes a
fraction of a second on the mini model) and recipes over it."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import build, write_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """8 training and 3 validation conversations of one short turn each (~90 tokens)."""
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture
def make_recipe(mini_mlx_f32, tiny_data, tmp_path):
    """make_recipe(*overrides, name=...) -> a Recipe on the mini model and tiny data."""
    from relief_mlx.recipe import from_dict

    def make(*overrides: str, name: str = "run"):
        from relief_mlx.recipe import apply_overrides

        tables = {
            "model": {"path": str(mini_mlx_f32)},
            "data": {"path": str(tiny_data), "max_length": 128},
            "lora": {"targets": ["self_attn.q_proj", "self_attn.v_proj"], "rank": 4, "alpha": 8},
            "train": {"iterations": 4, "batch_size": 1, "grad_accumulation": 2, "learning_rate": 1e-2,
                      "loss_chunk": 32},
            "validation": {"every": -1},
            "output": {"dir": str(tmp_path / name), "checkpoint_every": 0},
        }
        return from_dict(apply_overrides(tables, list(overrides)), "test recipe")

    return make


@pytest.fixture
def mini_model(mini_mlx_f32):
    """A fresh mini model (float32 experts), no LoRA yet."""
    return build(mini_mlx_f32)
