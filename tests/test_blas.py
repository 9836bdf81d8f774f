"""relief_mlx.blas: when `relief` re-executes itself with OpenBLAS preloaded, and what MLX uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relief_mlx import blas
from relief_mlx.errors import ReliefError

ROOT = Path(__file__).resolve().parents[1]
OPENBLAS = next((p for p in blas.candidate_paths() if os.path.isfile(p)), None)
needs_openblas = pytest.mark.skipif(
    OPENBLAS is None or sys.platform != "linux" or not blas.mlx_uses_reference_blas(),
    reason="needs Linux, the mlx-cpu wheel and OpenBLAS (apt-get install libopenblas0-pthread)",
)

LIB = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def plan(env: dict[str, str], *, system: str = "linux", reference: bool = True,
         found: tuple[str, ...] = (LIB,)) -> dict[str, str] | None:
    return blas.reexec_env(env, system=system, reference_blas=lambda: reference,
                           candidates=[LIB, "/other/libblas.so.3"], cpus=3,
                           exists=lambda p: p in found)


def test_preloads_openblas_with_marker_and_threads():
    env = plan({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "LD_PRELOAD": LIB, blas.MARKER: LIB,
                   "OPENBLAS_NUM_THREADS": "3", "OPENBLAS_THREAD_TIMEOUT": "4"}


def test_prepends_to_a_non_blas_preload():
    env = plan({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
    assert env["LD_PRELOAD"] == f"{LIB} /usr/lib/libjemalloc.so.2"


def test_marker_stops_a_second_reexec():
    """Guards against an exec loop when the loader ignores the preload."""
    env = plan({"PATH": "/bin"})
    assert plan(env) is None
    assert plan({blas.MARKER: LIB, "LD_PRELOAD": ""}) is None


@pytest.mark.parametrize("value, opted_out", [("1", True), ("0", False), ("", False)])
def test_opt_out(value, opted_out):
    assert (plan({blas.OPT_OUT: value}) is None) == opted_out


@pytest.mark.parametrize("preload", [LIB, "/opt/intel/libmkl_rt.so", "/x/libopenblas.so.0:/y.so"])
def test_a_blas_the_user_preloaded_stands(preload):
    assert plan({"LD_PRELOAD": preload}) is None


def test_nothing_to_do_off_linux_without_cpu_wheel_or_without_openblas():
    assert plan({}, system="darwin") is None
    assert plan({}, reference=False) is None  # mlx-cuda, or no mlx-cpu wheel
    assert plan({}, found=()) is None
    assert plan({}, found=("/other/libblas.so.3",))["LD_PRELOAD"] == "/other/libblas.so.3"


@pytest.mark.parametrize("var", blas.THREAD_VARS)
def test_a_thread_count_the_user_set_stands(var):
    env = plan({var: "7"})
    assert env[var] == "7"
    assert var == "OPENBLAS_NUM_THREADS" or "OPENBLAS_NUM_THREADS" not in env


@pytest.mark.parametrize("var", blas.TIMEOUT_VARS)
def test_a_spin_timeout_the_user_set_stands(var):
    env = plan({var: "28"})
    assert env[var] == "28" and [v for v in blas.TIMEOUT_VARS if v in env] == [var]


def test_relief_blas_wins_even_without_the_cpu_wheel():
    env = plan({blas.OVERRIDE: "/mine/libopenblas.so"}, reference=False,
               found=(LIB, "/mine/libopenblas.so"))
    assert env["LD_PRELOAD"] == "/mine/libopenblas.so"


def test_relief_blas_that_is_missing_names_the_variable():
    with pytest.raises(ReliefError, match="RELIEF_BLAS=/missing.so is not a file"):
        plan({blas.OVERRIDE: "/missing.so"})


@pytest.mark.parametrize("text, cpus", [("200000 100000", 2.0), ("150000 100000", 1.5),
                                         ("max 100000", None)])
def test_parse_cpu_max(text, cpus):
    assert blas.parse_cpu_max(text) == cpus


def test_usable_cpus_is_within_the_machine():
    assert 1 <= blas.usable_cpus() <= os.cpu_count()


def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("LD_PRELOAD", blas.MARKER, blas.OPT_OUT, blas.OVERRIDE, *blas.THREAD_VARS)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, **extra}


PROBE = ("from relief_mlx.blas import ensure_fast_blas, blas_info; ensure_fast_blas(); "
         "import json, os; print(json.dumps({**blas_info(), 'pid': os.getpid()}))")


def _probe(argv: list[str], **env: str) -> dict:
    done = subprocess.run([sys.executable, *argv], env=_clean_env(**env), cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_this_process_reports_the_blas_it_links():
    info = blas.blas_info()
    preloaded = "openblas" in os.environ.get("LD_PRELOAD", "")
    assert info["kind"] == ("openblas" if preloaded else "reference")
    assert info["library"] in info["mapped"]


@needs_openblas
def test_python_c_reexecs_with_openblas():
    info = _probe(["-c", PROBE])
    assert info["kind"] == "openblas"
    assert info["library"] == OPENBLAS
    assert info["openblas_config"].startswith("OpenBLAS")
    # The wheel's reference BLAS is still mapped; OpenBLAS wins because it is searched first.
    assert any("mlx_cpu.libs" in p for p in info["mapped"])


@needs_openblas
def test_a_script_reexecs_like_the_relief_console_script(tmp_path):
    script = tmp_path / "relief"
    script.write_text(PROBE.replace("; ", "\n") + "\n")
    assert _probe([str(script)])["kind"] == "openblas"


@needs_openblas
def test_opt_out_keeps_the_reference_blas():
    assert _probe(["-c", PROBE], RELIEF_NO_FAST_BLAS="1")["kind"] == "reference"


@needs_openblas
def test_bad_relief_blas_is_one_line_and_exit_1():
    done = subprocess.run([sys.executable, "-c", PROBE], env=_clean_env(RELIEF_BLAS="/nope.so"),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: RELIEF_BLAS=/nope.so is not a file; point it at a libblas.so.3 or libopenblas.so,"
        " or unset it"]


# ---------------------------------------------------------------- the notice on a machine without OpenBLAS


def notice(env: dict[str, str], *, system: str = "linux", reference: bool = True, found: tuple[str, ...] = ()):
    return blas.slow_blas_notice(env, system=system, reference_blas=lambda: reference,
                                 candidates=[LIB, "/other/libblas.so.3"], exists=lambda p: p in found)


def test_without_openblas_long_commands_say_what_to_install_and_what_it_gains():
    """Regression: a fresh Debian machine ran the demo 4x slower and printed nothing about it."""
    line = notice({"PATH": "/bin"})
    assert "\n" not in line and "reference BLAS" in line
    assert "apt-get install libopenblas0-pthread" in line and "4.1 instead of 177 GFLOP/s" in line
    assert "43 instead of 175 tokens/s" in line


@pytest.mark.parametrize("case", ["openblas found", "re-executed", "opted out", "user preload", "not linux",
                                  "not the reference BLAS"])
def test_no_notice_where_the_fast_path_is_taken_or_declined(case):
    env, kw = {"PATH": "/bin"}, {}
    if case == "openblas found":
        kw["found"] = (LIB,)
    elif case == "re-executed":
        env[blas.MARKER] = LIB
    elif case == "opted out":
        env[blas.OPT_OUT] = "1"
    elif case == "user preload":
        env["LD_PRELOAD"] = "/opt/libopenblas.so.0"
    elif case == "not linux":
        kw["system"] = "darwin"
    else:
        kw["reference"] = False
    assert notice(env, **kw) is None


def test_the_notice_opens_long_commands_only(monkeypatch):
    from click.testing import CliRunner

    from relief_mlx import cli as cli_module

    monkeypatch.setattr(cli_module, "_slow_blas_notice", lambda: "note: slow BLAS")
    long_command = CliRunner().invoke(cli_module.cli, ["train"])  # fails on its missing recipe, after the note
    assert long_command.stderr.splitlines()[0] == "note: slow BLAS"
    quick = CliRunner().invoke(cli_module.cli, ["inspect", "mini", "--json"])
    assert quick.exit_code == 0 and "slow BLAS" not in quick.stderr
