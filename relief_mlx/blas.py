"""Give MLX's Linux CPU backend OpenBLAS instead of the reference BLAS the mlx-cpu wheel bundles.

The mlx-cpu wheel links netlib's reference BLAS (`mlx_cpu.libs/libblas-*.so.3.10.0`): a few
GFLOP/s for an fp32 matmul, against 30-50x that with OpenBLAS preloaded (benchmarks/blas.py).
The dynamic loader reads LD_PRELOAD only when a process starts, so the `relief` command
(`relief ...` or `python -m relief_mlx ...`) re-executes itself once with it set.

`import relief_mlx` inside someone else's Python process cannot do that: run the work through
`python -m relief_mlx`, or export the line `relief doctor` prints (`export LD_PRELOAD=...`)
before starting Python.

With no OpenBLAS on the machine, long commands print one line saying what to install
(`slow_blas_notice`). No PyPI wheel can stand in: scipy-openblas32/64 (and numpy's bundled
copy) prefix every symbol (`scipy_cblas_sgemm`), which MLX cannot call, and cmeel-openblas,
whose symbols are standard, needs libgfortran.so.5, which a fresh Debian lacks too.

Environment:
    RELIEF_NO_FAST_BLAS=1   keep the wheel's BLAS (no re-exec, no notice).
    RELIEF_BLAS=/path.so    preload this libblas.so.3 / libopenblas.so instead of searching,
                            whichever MLX wheel is installed.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import math
import os
import platform
import re
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ReliefError

OPT_OUT = "RELIEF_NO_FAST_BLAS"
OVERRIDE = "RELIEF_BLAS"
# Set in the re-executed process so it never re-executes again, even if the preload was ignored.
MARKER = "RELIEF_FAST_BLAS_REEXEC"
# OpenBLAS reads the first of these that is set; a user's choice in any of them stands.
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")
# An idle OpenBLAS worker spins for 2^28 cycles (~0.1 s) after each call before it sleeps, on
# a core that relief's own CPU streams need (`model.moe.split_glu` runs MXFP4 experts beside
# BLAS): 2^4 cycles made a 6-layer gpt-oss decode 1.11x faster with the split and left it as it
# was without (README, Benchmarks). A value the user set stands.
TIMEOUT_VARS = ("OPENBLAS_THREAD_TIMEOUT", "GOTO_THREAD_TIMEOUT")
SPIN = "4"
_CUDA_DISTS = ("mlx-cuda-12", "mlx-cuda-13", "mlx-cuda")
# benchmarks/blas.py (README, BLAS on Linux): fp32 1024 x 1024 matmul, reference BLAS vs OpenBLAS,
# and the demo's training speed on a fresh Debian machine without and with OpenBLAS (issue #10).
SPEEDUP = "an fp32 matmul runs 4.1 instead of 177 GFLOP/s, the demo trains at 43 instead of 175 tokens/s"
_BLAS_FILE = re.compile(r"lib(open)?blas|mkl_rt|libblis", re.IGNORECASE)


def candidate_paths() -> list[str]:
    """Where distributions install OpenBLAS, best first (threaded before serial)."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    deb = f"/usr/lib/{multiarch}"
    return [
        f"{deb}/openblas-pthread/libblas.so.3",  # Debian/Ubuntu: libopenblas0-pthread
        f"{deb}/openblas-openmp/libblas.so.3",  # libopenblas0-openmp
        f"{deb}/openblas-serial/libblas.so.3",  # libopenblas0-serial: one thread, still fast
        "/usr/lib64/libopenblasp.so.0",  # Fedora/RHEL: openblas-threads
        "/usr/lib64/libopenblaso.so.0",  # openblas-openmp
        "/usr/lib64/libopenblas.so.0",  # openblas (serial)
    ]


def find_blas(
    env: Mapping[str, str],
    candidates: Sequence[str],
    exists: Callable[[str], bool] = os.path.isfile,
) -> str | None:
    """The library to preload: `$RELIEF_BLAS`, else the first candidate that exists."""
    override = env.get(OVERRIDE)
    if override:
        if not exists(override):
            raise ReliefError(
                f"{OVERRIDE}={override} is not a file; point it at a libblas.so.3 or "
                f"libopenblas.so, or unset it"
            )
        return override
    return next((p for p in candidates if exists(p)), None)


def reexec_env(
    env: Mapping[str, str],
    *,
    system: str,
    reference_blas: Callable[[], bool],
    candidates: Sequence[str],
    cpus: int,
    exists: Callable[[str], bool] = os.path.isfile,
) -> dict[str, str] | None:
    """The environment to re-execute with so that OpenBLAS is preloaded, or None to carry on.

    `system` is `sys.platform`; `reference_blas()` says whether the installed MLX links the
    reference BLAS (asked only when needed: it reads package metadata); `cpus` is how many
    cores this process may use.
    """
    if system != "linux" or env.get(OPT_OUT) == "1" or MARKER in env:
        return None
    preload = env.get("LD_PRELOAD", "").replace(":", " ").split()
    if any(_BLAS_FILE.search(os.path.basename(p)) for p in preload):
        return None  # the user already chose a BLAS
    if not env.get(OVERRIDE) and not reference_blas():
        return None
    lib = find_blas(env, candidates, exists)
    if lib is None:
        return None
    new = dict(env)
    new["LD_PRELOAD"] = " ".join([lib, *preload])
    new[MARKER] = lib
    if not any(v in env for v in THREAD_VARS):
        # OpenBLAS sizes its pool from the CPU affinity mask but ignores cgroup quotas, so in a
        # container limited to 2 of 64 cores it would run 64 threads on 2 cores.
        new["OPENBLAS_NUM_THREADS"] = str(cpus)
    if not any(v in env for v in TIMEOUT_VARS):
        new[TIMEOUT_VARS[0]] = SPIN
    return new


def slow_blas_notice(
    env: Mapping[str, str],
    *,
    system: str,
    reference_blas: Callable[[], bool],
    candidates: Sequence[str],
    exists: Callable[[str], bool] = os.path.isfile,
) -> str | None:
    """One line for the start of a long command when MLX computes with the reference BLAS because
    no OpenBLAS was found to preload, else None (arguments as in `reexec_env`)."""
    if system != "linux" or env.get(OPT_OUT) == "1" or MARKER in env:
        return None
    preload = env.get("LD_PRELOAD", "").replace(":", " ").split()
    if any(_BLAS_FILE.search(os.path.basename(p)) for p in preload) or not reference_blas():
        return None
    if find_blas(env, candidates, exists) is not None:
        return None  # found: `relief` re-executes with it (only an embedded interpreter does not)
    return ("note: MLX is computing with the reference BLAS, no OpenBLAS was found: " + SPEEDUP + " here; "
            "install it (Debian/Ubuntu: apt-get install libopenblas0-pthread) or set RELIEF_BLAS=/path/libopenblas.so")


def mlx_uses_reference_blas() -> bool:
    """True when the installed MLX is the mlx-cpu wheel with its bundled reference BLAS.

    Read from package metadata, not by importing mlx: the preload must precede that import.
    """
    for name in _CUDA_DISTS:
        try:
            importlib.metadata.distribution(name)
            return False
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        files = importlib.metadata.files("mlx-cpu") or []
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(f.name.startswith("libblas") for f in files)


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max` ("200000 100000" = 2 CPUs, "max 100000" = no limit) -> CPUs or None."""
    quota, _, period = text.strip().partition(" ")
    if quota == "max" or not period:
        return None
    return int(quota) / int(period)


def _cgroup_cpus() -> float | None:
    v2 = Path("/sys/fs/cgroup/cpu.max")
    if v2.is_file():
        return parse_cpu_max(v2.read_text())
    v1 = Path("/sys/fs/cgroup/cpu")
    try:
        quota = int((v1 / "cpu.cfs_quota_us").read_text())
        period = int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 else None


def usable_cpus() -> int:
    """Cores this process may run on: the affinity mask, capped by a cgroup CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(n, math.ceil(quota))) if quota else n


def ensure_fast_blas() -> None:
    """Re-execute this process with OpenBLAS preloaded when MLX would use the reference BLAS.

    Call before anything imports mlx; returns when there is nothing to do. A bad
    `$RELIEF_BLAS` ends the process with one line on stderr, like any other user error.
    """
    if sys.platform != "linux" or not sys.executable or not sys.orig_argv[1:]:
        return  # an embedded or interactive interpreter cannot be restarted where it was
    try:
        env = reexec_env(
            os.environ,
            system=sys.platform,
            reference_blas=mlx_uses_reference_blas,
            candidates=candidate_paths(),
            cpus=usable_cpus(),
        )
    except ReliefError as e:
        raise SystemExit(f"error: {e}") from None
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps `-m relief_mlx`, `-c ...` or the console script path, and interpreter flags.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def export_line() -> str | None:
    """The shell line that gives a Python process started outside `relief` the same BLAS."""
    lib = find_blas(os.environ, candidate_paths())
    if lib is None:
        return None
    return f"export LD_PRELOAD={lib} OPENBLAS_NUM_THREADS={usable_cpus()} {TIMEOUT_VARS[0]}={SPIN}"


def _mappings() -> list[tuple[int, int, str]]:
    """(start, end, file) for each file-backed region of this process."""
    regions = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            regions.append((start, end, fields[5]))
    return regions


def _symbol(handle: ctypes.CDLL, name: str) -> int | None:
    try:
        return ctypes.cast(getattr(handle, name), ctypes.c_void_p).value
    except AttributeError:
        return None


def _kind(path: str | None) -> str:
    name = os.path.realpath(path or "").lower()
    if "openblas" in name:
        return "openblas"
    if "mlx_cpu.libs" in name:
        return "reference"
    return "mkl" if "mkl" in name else ("blis" if "blis" in name else "other")


def blas_info() -> dict[str, Any]:
    """Which BLAS MLX uses in this process (Linux): the file that provides `cblas_sgemm` to
    libmlx.so, and every BLAS file mapped.

    libmlx.so is loaded RTLD_LOCAL, so the loader looks a symbol up in the global scope
    (executable, LD_PRELOAD) first and in libmlx.so's own dependencies second.
    """
    import mlx.core  # noqa: F401  loads libmlx.so and the BLAS it links

    regions = _mappings()
    files = {path for _, _, path in regions}
    mapped = sorted(p for p in files if _BLAS_FILE.search(Path(p).name))
    libmlx = next((p for p in files if p.endswith("/libmlx.so")), None)
    address = _symbol(ctypes.CDLL(None), "cblas_sgemm")
    if address is None and libmlx:
        address = _symbol(ctypes.CDLL(libmlx, mode=os.RTLD_NOLOAD), "cblas_sgemm")
    library = next((p for start, end, p in regions if address and start <= address < end), None)
    info: dict[str, Any] = {
        "kind": _kind(library),
        "library": library,
        "mapped": mapped,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }
    lib = ctypes.CDLL(library, mode=os.RTLD_NOLOAD) if library else None
    if lib is not None and hasattr(lib, "openblas_get_config"):
        lib.openblas_get_config.restype = ctypes.c_char_p
        info["openblas_config"] = lib.openblas_get_config().decode()
        info["openblas_threads"] = lib.openblas_get_num_threads()
    return info
