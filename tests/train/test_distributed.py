"""Two ranks over mx.distributed (mlx.launch, ring backend on loopback) train the same adapter
as one rank accumulating both ranks' micro-batches, also across a stop and a resume."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from train_helpers import assert_trees_close

from relief_mlx.recipe import to_toml
from relief_mlx.train import train

WORKER = Path(__file__).with_name("distributed_worker.py")
# Ranks sum their gradients in another order than one rank accumulating them: float32 rounding,
# which Adam's division by sqrt(v) amplifies a little.
RTOL = 1e-4
TIMEOUT_S = 240  # one launch takes ~20 s here; a hang (ranks pairing different tensors) fails


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str) -> str:
    """Run the worker on 2 ranks; the stdout of both. A launch that outlives TIMEOUT_S is killed
    with its ranks (they are in its session) and fails the test."""
    command = ["mlx.launch", "-n", "2", "--backend", "ring", "--starting-port", str(free_port()),
               sys.executable, str(WORKER), *args]
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        out, err = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"2 ranks did not finish in {TIMEOUT_S} s (a collective hung): {out[-2000:]}{err[-2000:]}")
    assert process.returncode == 0, out + err
    return out


def arrays(path: Path) -> dict:
    return dict(mx.load(str(path), format="safetensors"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not installed")
def test_two_ranks_stopped_and_resumed_equal_one_rank_with_accumulation(make_recipe, tmp_path):
    """Regression: on --resume rank 0 rebuilt the optimizer state in the checkpoint file's key
    order and the broadcast paired tensors by each rank's own order, so 2 ranks hung."""
    overrides = ("train.iterations=4", "train.grad_accumulation=2", "lora.dropout=0.1",
                 "validation.every=2", "output.checkpoint_every=2")
    single = train(make_recipe(*overrides, name="one-rank"))
    recipe = make_recipe(*overrides, name="two-ranks")
    recipe_file = tmp_path / "two.toml"
    recipe_file.write_text(to_toml(recipe))
    two = Path(recipe.output.dir)

    stopped = launch(str(recipe_file), "1")  # SIGTERM while step 1 reports: stops after step 2
    assert stopped.count("rank done: interrupted 2 steps, world 2") == 2, stopped
    resumed = launch("--resume", str(two))
    assert resumed.count("rank done: finished 4 steps, world 2") == 2, resumed

    for name in ("adapters.safetensors", "checkpoint/adapters.safetensors", "checkpoint/optimizer.safetensors",
                 "best/adapters.safetensors"):
        assert_trees_close(arrays(single.run_dir / name), arrays(two / name), RTOL, name)
    summary = (two / "summary.json").read_text()
    assert '"world_size": 2' in summary and '"steps": 4' in summary
