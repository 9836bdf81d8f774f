"""Fixtures of the export tests: mini adapters (q/v only, and with expert LoRA)."""

from __future__ import annotations

from pathlib import Path

import pytest
from export_helpers import EXPERTS, QV, write_adapter


@pytest.fixture(scope="session")
def qv_adapter(mini_mlx, tmp_path_factory) -> Path:
    """LoRA r4 on q_proj and v_proj of every layer of `mini_mlx` (MXFP4 experts, untouched)."""
    return write_adapter(mini_mlx, tmp_path_factory.mktemp("adapters") / "qv", QV)


@pytest.fixture(scope="session")
def expert_adapter(mini_mlx, tmp_path_factory) -> Path:
    """LoRA r4 on q/v and on every expert projection of the last 2 layers of `mini_mlx`: the MXFP4
    experts of layers 2-3 are touched, those of layers 0-1 are not."""
    return write_adapter(mini_mlx, tmp_path_factory.mktemp("adapters") / "experts", EXPERTS, layers=2, seed=1)
