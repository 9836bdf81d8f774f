"""Two ranks over mx.distributed (mlx.launch, ring backend on loopback) train the same adapter
as one rank accumulating both ranks' micro-batches."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from relief_mlx.recipe import to_toml
from relief_mlx.train import train

WORKER = Path(__file__).with_name("distributed_worker.py")
# Ranks sum their gradients in another order than one rank accumulating them: float32 rounding.
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not installed")
def test_two_ranks_equal_one_rank_with_accumulation(make_recipe, tmp_path):
    overrides = ("train.iterations=3", "train.grad_accumulation=2", "lora.dropout=0.1",
                 "validation.every=2", "output.checkpoint_every=2")
    single = train(make_recipe(*overrides, name="one-rank"))
    recipe = make_recipe(*overrides, name="two-ranks")
    recipe_file = tmp_path / "two.toml"
    recipe_file.write_text(to_toml(recipe))
    command = ["mlx.launch", "-n", "2", "--backend", "ring", "--starting-port", str(free_port()),
               sys.executable, str(WORKER), str(recipe_file)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("rank done: finished 3 steps, world 2") == 2
    two = Path(recipe.output.dir)
    for name in ("adapters.safetensors", "checkpoint/optimizer.safetensors", "best/adapters.safetensors"):
        a = mx.load(str(single.run_dir / name), format="safetensors")
        b = mx.load(str(two / name), format="safetensors")
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), atol=TOLERANCE, rtol=0, err_msg=f"{name}:{k}")
    summary = (two / "summary.json").read_text()
    assert '"world_size": 2' in summary
