"""Fixtures of the eval tests: the hand-written split (eval_helpers.py) and a small adapter
trained on the mini model."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_helpers import write_split


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> Path:
    """train/valid/test splits; test holds the six hand-written items (3 categories, one multi-turn)."""
    return write_split(tmp_path_factory.mktemp("eval-data") / "relief")


@pytest.fixture(scope="session")
def trained_adapter(mini_mlx_f32, eval_data, tmp_path_factory) -> Path:
    """A run folder: LoRA on q_proj/v_proj of the mini model, 3 steps on the train split (best/ at step 3)."""
    from relief_mlx.recipe import from_dict
    from relief_mlx.train import train

    run = tmp_path_factory.mktemp("eval-run") / "run"
    recipe = from_dict({
        "model": {"path": str(mini_mlx_f32)},
        "data": {"path": str(eval_data), "max_length": 128},
        "lora": {"targets": ["self_attn.q_proj", "self_attn.v_proj"], "rank": 4, "alpha": 8},
        "train": {"iterations": 3, "learning_rate": 1e-2, "loss_chunk": 32},
        "validation": {"every": 3},
        "output": {"dir": str(run), "checkpoint_every": 0},
    })
    return train(recipe).run_dir
