"""relief_mlx.doctor and `relief doctor`: what the machine gives MLX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from relief_mlx import blas
from relief_mlx.cli import cli
from relief_mlx.doctor import diagnose, format_table

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["backend", "default_device", "versions", "platform", "cpu", "memory", "device_info",
        *(["blas"] if sys.platform == "linux" else []), "matmul_fp32_256_gflops", "hf"]


def expected_backend() -> str:
    """What this machine's MLX runs on, asked of MLX's device and the OS (not of doctor.backend)."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if sys.platform == "darwin" else "cuda"


@pytest.fixture(scope="module")
def info() -> dict:
    return diagnose(matmul_n=256)


def test_diagnose_keys_and_backend(info):
    """Regression: the CPU backend was asserted unconditionally, so the suite failed on a Mac and on CUDA."""
    assert list(info) == KEYS
    assert info["backend"] == expected_backend()
    assert {"python", "relief-mlx", "mlx", "mlx-lm", "numpy"} <= set(info["versions"])
    assert info["versions"]["mlx"].startswith("0.")
    available = info["memory"]["available_bytes"]  # macOS has no such figure
    assert (available is None if sys.platform == "darwin" else 0 < available <= info["memory"]["total_bytes"])
    assert 1 <= info["cpu"]["usable_cores"] <= info["cpu"]["cores"]
    assert info["matmul_fp32_256_gflops"] > 0
    if sys.platform == "linux":
        assert info["blas"]["kind"] in {"reference", "openblas", "mkl", "blis", "other"}
    json.dumps(info)  # everything must survive --json


def test_table_aligns_values_and_shows_bytes_in_gib():
    text = format_table({"a": {"total_bytes": 3 * 2**30, "xs": ["p", "q"]}, "longer_key": None})
    assert text.splitlines() == [
        "a.total_bytes  3.0 GiB",
        "a.xs           p, q",
        "longer_key     -",
    ]


def test_relief_doctor_json_reports_the_backend(monkeypatch):
    monkeypatch.setattr("relief_mlx.doctor.matmul_gflops", lambda n=1024: 1.0)
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["backend"] == expected_backend()


def _doctor(**extra: str) -> dict:
    drop = ("LD_PRELOAD", blas.MARKER, blas.OPT_OUT, blas.OVERRIDE, *blas.THREAD_VARS)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "relief_mlx", "doctor", "--json"],
                          env={**env, **extra}, cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout)


OPENBLAS = next((p for p in blas.candidate_paths() if os.path.isfile(p)), None)


@pytest.mark.skipif(OPENBLAS is None,
                    reason="Debian's OpenBLAS is absent: apt-get install libopenblas0-pthread")
@pytest.mark.skipif(sys.platform != "linux" or not blas.mlx_uses_reference_blas(),
                    reason="only the Linux mlx-cpu wheel links the reference BLAS")
def test_python_m_relief_mlx_doctor_uses_openblas():
    info = _doctor()
    assert info["backend"] == "cpu"
    assert info["blas"]["kind"] == "openblas"
    assert info["blas"]["library"] == OPENBLAS
    assert info["blas"]["python_api"].startswith(f"export LD_PRELOAD={OPENBLAS} ")
