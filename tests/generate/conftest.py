"""Fixtures of the generation tests: the mini model loaded once, fresh copies for tests that
wrap layers (adapters, probes), and engines around a scripted model (see gen_helpers.py)."""

from __future__ import annotations

import pytest
from gen_helpers import ScriptedModel, build_mini


@pytest.fixture(scope="session")
def mini_loaded(mini_mlx):
    """(model, tokenizer) of the mini checkpoint, loaded once; tests must not change the model."""
    import relief_mlx

    return relief_mlx.load(mini_mlx)


@pytest.fixture
def fresh_mini(mini_mlx, mini_loaded):
    """A freshly built mini model (same weights) for tests that wrap its layers."""
    return build_mini(mini_mlx)


@pytest.fixture
def scripted_engine(harmony_tokenizer):
    """make(script) -> an Engine around a ScriptedModel and the real o200k_harmony tokenizer."""
    from relief_mlx.generate import Engine

    def make(script: list[int], context_length: int = 131_072) -> Engine:
        return Engine(ScriptedModel(script), harmony_tokenizer, context_length)

    return make
