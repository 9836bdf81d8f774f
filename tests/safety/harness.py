"""Helpers of the fault suite: run `relief` in a process of its own (so it can be killed), write
recipes, and check what a fault left (imported by name: a second `conftest` module would clash)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from relief_mlx.io import check_manifest
from relief_mlx.recipe import apply_overrides, from_dict, to_toml

TIMEOUT_S = 300  # a command that hangs fails the test instead of the suite


def relief(*args: str, fault: str | None = None, env: dict | None = None, timeout: float = TIMEOUT_S,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`relief ARGS` as a user runs it (`python -m relief_mlx`), with RELIEF_FAULT=`fault`."""
    environment = {k: v for k, v in os.environ.items() if k not in ("RELIEF_FAULT", "PYTEST_CURRENT_TEST")}
    environment |= (env or {}) | ({"RELIEF_FAULT": fault} if fault else {})
    return subprocess.run([sys.executable, "-m", "relief_mlx", *args], capture_output=True, text=True,
                          env=environment, timeout=timeout, cwd=cwd)


def start(*args: str, fault: str | None = None) -> subprocess.Popen:
    """`relief ARGS` started in the background (stdout and stderr piped)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("RELIEF_FAULT", "PYTEST_CURRENT_TEST")}
    environment |= {"RELIEF_FAULT": fault} if fault else {}
    return subprocess.Popen([sys.executable, "-m", "relief_mlx", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line a refused command printed; fails on a traceback or several lines."""
    assert done.returncode == 1, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def recipe_file(folder: Path, model: Path, data: Path, run: Path, *overrides: str) -> Path:
    """A small recipe on the mini model and tiny data, written as TOML (what `relief train` reads)."""
    tables = {
        "model": {"path": str(model)},
        "data": {"path": str(data), "max_length": 128},
        "lora": {"targets": ["self_attn.q_proj", "self_attn.v_proj"], "rank": 4, "alpha": 8},
        "train": {"iterations": 4, "batch_size": 1, "grad_accumulation": 2, "learning_rate": 1e-2,
                  "loss_chunk": 32},
        "validation": {"every": 2},
        "output": {"dir": str(run), "checkpoint_every": 2},
    }
    recipe = from_dict(apply_overrides(tables, list(overrides)), "fault recipe")
    file = folder / f"{run.name}.toml"
    file.write_text(to_toml(recipe))
    return file


def arrays(path: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(path), format="safetensors").items()}


def assert_close(want: Path, got: Path, rtol: float) -> None:
    """Every tensor of the safetensors file `got` equals `want`'s within `rtol` of its scale."""
    a, b = arrays(want), arrays(got)
    assert set(a) == set(b), f"{got}: other tensors than {want}"
    for k in a:
        scale = np.abs(a[k]).max()
        np.testing.assert_allclose(b[k], a[k], rtol=rtol, atol=rtol * scale, err_msg=f"{got}:{k}")


def complete_or_absent(*folders: Path) -> None:
    """No folder is left looking complete when it is not: each is absent or passes its manifest."""
    for folder in folders:
        if folder.exists():
            assert check_manifest(folder) is None, check_manifest(folder)


def leftovers(folder: Path) -> list[str]:
    """Temporary files, partial or old folders and locks in `folder` (none after a finished command)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith(".") and (".partial-" in p.name or ".old-" in p.name
                                                 or p.name.endswith((".tmp", ".lock"))))


def metrics_steps(run: Path) -> tuple[list[int], list[int]]:
    """(training steps, validation steps) recorded in RUN/metrics.jsonl; every line must parse."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r], [r["step"] for r in records if "val_loss" in r]


ROWS = [
    ("Where should the water point go?", "Uphill from the latrines, at least 30 metres away."),
    ("How much water per person per day?", "At least 15 litres for drinking, cooking and hygiene."),
    ("Who gets food first?", "Children under five, pregnant women and the sick, then everyone else."),
    ("The generator is out of fuel.", "Ration it for the clinic fridge and lights, and ask logistics."),
    ("A volunteer is exhausted.", "Send them to rest for a full shift; tired people make mistakes."),
    ("How do I count arrivals?", "Register each household once, with a token, at a single gate."),
    ("Rain is coming tonight.", "Dig drainage around the tents and lift supplies off the floor."),
    ("A child is alone.", "Keep them with a trained carer, register them and start tracing."),
    ("The road is flooded.", "Do not drive through; wait for the engineers' assessment."),
]


def write_tiny_data(folder: Path) -> Path:
    """6 training and 2 validation conversations, one short turn each, and 3 scored test items."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in ROWS]
    facts = [{"fact": word, "any": [word]} for word in ("wait", "engineers", "register")]
    test = [row | {"category": "logistics", "key_facts": facts} for row in rows[6:9]]
    for split, lines in {"train": rows[:6], "valid": rows[6:8], "test": test}.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def launch(*args: str, fault: str | None = None, ranks: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """`mlx.launch -n RANKS --backend ring -- python -m relief_mlx ARGS` on loopback; a launch that
    outlives `timeout` is killed with its ranks (they share its session) and fails the test."""
    import signal
    import socket

    import pytest

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environment = {k: v for k, v in os.environ.items() if k not in ("RELIEF_FAULT", "PYTEST_CURRENT_TEST")}
    environment |= {"RELIEF_FAULT": fault} if fault else {}
    command = ["mlx.launch", "-n", str(ranks), "--backend", "ring", "--starting-port", str(port),
               sys.executable, "-m", "relief_mlx", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{ranks} ranks did not finish in {timeout} s (a collective hung): {out[-2000:]}{err[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def clone(src: Path, dst: Path, files: dict[str, bytes | None]) -> Path:
    """`dst`: links to every file of `src`, except `files` (written as given, or left out for None)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in files:
            (dst / f.name).symlink_to(f.resolve())
    for name, content in files.items():
        if content is not None:
            (dst / name).write_bytes(content)
    return dst
