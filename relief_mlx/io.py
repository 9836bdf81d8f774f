"""Writing and reading what relief produces, safely: a later step never reads a half-written file
or folder, two writers never share an output, and every failure is one line.

- `atomic_path` (`write_text`, `write_json`): a file appears whole or not at all (temporary
  file, fsync, rename).
- `atomic_dir`: a folder is built as `.NAME.partial-PID-*` and renamed into place when complete.
  Its writer calls `write_manifest` last (the sha256 of every file), so `check_manifest` finds a
  torn or changed file and names it, and `recover_dir` can tell a complete leftover from a torn one.
  Leftovers of a writer that died (`.NAME.partial-*`, `.NAME.old-*`, `.NAME.PID.*.tmp`) are
  removed by the next writer, never while their process lives.
- `append_line`: one JSON Lines record appended and fsynced; a failed append (full disk) is cut
  back off, so the file never ends in half a line.
- `folder_lock`: one writer per output: `.NAME.lock` beside it holds the owner's pid and host
  under an flock (released by the kernel when the process dies, even by SIGKILL); a second
  writer is refused naming the owner, a lock left by a dead process is taken over with a warning.
- `read_json`: every JSON file relief reads (configs, manifests, adapter configs) through one
  place: anything but a JSON object is one line naming the file.
- Fault injection, for the test suite's fault harness: `RELIEF_FAULT=kill:N` makes the Nth write
  point of the process tear the file it is writing (half of its new bytes) and SIGKILL the
  process; `enospc:N` tears it and fails as a full disk does; `sigterm:N` / `sigint:N` send the
  process that signal there; `kill:N:MATCH` counts only points whose label (`KIND PATH`)
  contains MATCH. Points: `write` (a file complete under its temporary
  name), `append` (a line appended), `swap` (between the two renames that replace a folder).
  `RELIEF_FAULT_LOG=FILE` appends the label of every point passed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ReliefError, ReliefWarning, WriteError

MANIFEST = "relief-manifest.json"
MAX_JSON_BYTES = 64 * 2**20  # tokenizer.json, the largest JSON relief reads, is ~27 MB


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (this one included: another of its threads may be
    writing; a write that fails removes its own temporaries)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_error(path: Path, e: OSError | WriteError) -> WriteError:
    reason = e.reason if isinstance(e, WriteError) else (e.strerror or str(e))
    return WriteError(f"could not write {path}: {reason}; what was there is unchanged and the partial output "
                      "was removed: free disk space or fix permissions, then run again", str(path), reason)


# ---------------------------------------------------------------- fault injection


_fault_count = [0]


def fault_point(kind: str, file: Path, label: Path | None = None, start: int = 0) -> None:
    """A place where a write can be interrupted (module doc). `file` is being written (its bytes
    from `start` on are new); `label` is the path a reader will know it by (default `file`)."""
    name = f"{kind} {label or file}"
    if log := os.environ.get("RELIEF_FAULT_LOG"):
        with open(log, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    spec = os.environ.get("RELIEF_FAULT")
    if not spec:
        return
    action, _, rest = spec.partition(":")
    number, _, match = rest.partition(":")
    if action not in ("kill", "enospc", "sigterm", "sigint") or not number.isdigit():
        raise ReliefError(f"RELIEF_FAULT={spec} is not ACTION:N[:MATCH] with ACTION kill, enospc, sigterm or sigint; "
                          "fix it or unset it")
    if match not in name:
        return
    _fault_count[0] += 1
    if _fault_count[0] != int(number):
        return
    if action in ("sigterm", "sigint"):  # delivered as a user or a scheduler would: the write goes on
        os.kill(os.getpid(), signal.SIGTERM if action == "sigterm" else signal.SIGINT)
        return
    if file.is_file():
        os.truncate(file, start + (file.stat().st_size - start) // 2)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))


# ---------------------------------------------------------------- files


def _remove_stale_temps(path: Path) -> None:
    """`.NAME.PID.*.tmp` beside `path` whose process is gone (a writer killed mid-write)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result is an ordinary file
        yield tmp
        fault_point("write", tmp, label=path)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, WriteError) as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_line(path: str | Path, text: str) -> None:
    """Append `text` (one line, no newline in it) and fsync. A write that fails is cut back off."""
    path = Path(path)
    data = memoryview((text + "\n").encode("utf-8"))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise _write_error(path, e) from e
    start = os.fstat(fd).st_size
    try:
        while data:
            data = data[os.write(fd, data):]
        fault_point("append", path, start=start)
        os.fsync(fd)
    except OSError as e:
        os.ftruncate(fd, start)
        reason = e.strerror or str(e)
        raise WriteError(f"could not append to {path}: {reason}; the file is as it was before: free disk space "
                         "or fix permissions, then run again", str(path), reason) from e
    finally:
        os.close(fd)


def read_json(path: str | Path, fix: str = "replace it with a good copy", limit: int = MAX_JSON_BYTES) -> dict:
    """The JSON object in `path`; one-line ReliefError naming the file (and line) when it is
    missing, larger than `limit`, not UTF-8, not JSON, nested too deeply or not an object."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise ReliefError(f"{path} is {size:,} bytes, more than the {limit:,} a JSON file of this kind may "
                              f"hold; {fix}")
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ReliefError(f"{path} does not exist; {fix}") from None
    except IsADirectoryError:
        raise ReliefError(f"{path} is a folder, not a JSON file; {fix}") from None
    except UnicodeDecodeError as e:
        raise ReliefError(f"{path} is not UTF-8 text (byte {e.start}); {fix}") from None
    except json.JSONDecodeError as e:
        raise ReliefError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {fix}") from None
    except RecursionError:
        raise ReliefError(f"{path} nests JSON too deeply to be a relief or Hugging Face file; {fix}") from None
    except OSError as e:
        raise ReliefError(f"could not read {path}: {e.strerror or e}; {fix}") from None
    if not isinstance(obj, dict):
        raise ReliefError(f"{path} holds a JSON {type(obj).__name__}, not an object; {fix}")
    return obj


# ---------------------------------------------------------------- manifests


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape what relief writes."""
    from importlib import metadata

    versions = {}
    for package in ("relief-mlx", "mlx", "mlx-lm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(folder: Path, record: dict, files: list[str] | None = None) -> None:
    """`folder/relief-manifest.json`: `record`, the sha256 of `files` (default: every file under
    `folder`, by relative path) as "outputs", and the package versions. The one manifest writer of
    every folder relief builds (convert, fuse, export, a training checkpoint), called last inside
    `atomic_dir`."""
    if files is None:
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    write_json(folder / MANIFEST, record | {"outputs": {f: sha256(folder / f) for f in files},
                                            "versions": package_versions()})


def check_manifest(folder: Path) -> str | None:
    """None when every file `folder/relief-manifest.json` lists is there with its sha256; else what
    is wrong, in words that name the file."""
    file = folder / MANIFEST
    if not file.is_file():
        return f"{folder} has no {MANIFEST}"
    try:
        outputs = read_json(file).get("outputs")
    except ReliefError as e:
        return str(e).partition(";")[0]
    if not isinstance(outputs, dict) or not all(isinstance(v, str) for v in outputs.values()):
        return f"{file} has no outputs table"
    for name, digest in sorted(outputs.items()):
        part = Path(name)
        if part.is_absolute() or ".." in part.parts:
            return f"{file} lists {name!r}, a path outside {folder}"
        if not (folder / part).is_file():
            return f"{folder / part} is missing (listed in {file})"
        if sha256(folder / part) != digest:
            return f"{folder / part} does not match its sha256 in {file}: it is torn or was changed"
    return None


# ---------------------------------------------------------------- folders


def leftovers(path: Path) -> list[Path]:
    """`.NAME.partial-PID-*` and `.NAME.old-PID*` beside `path` whose writer no longer runs."""
    found = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*"):
        kind, _, rest = p.name[len(path.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind in ("partial", "old") and not (pid.isdigit() and _alive(int(pid))):
            found.append(p)
    return sorted(found)


def _refuse_used(path: Path, overwrite: bool) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise ReliefError(f"{path} already exists and is not empty; choose another --out or pass --overwrite")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, lock: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place only when complete.

    An existing non-empty `path` is an error unless `overwrite`, and is untouched until the new
    folder is complete. The writer holds `folder_lock(path)` throughout (`lock=False` when the
    caller's lock covers it, as a run's lock covers its checkpoint). What a dead writer left is
    removed first; a failed write removes its own partial folder and raises WriteError.
    """
    path = Path(path)
    with folder_lock(path) if lock else contextlib.nullcontext():
        _refuse_used(path, overwrite)
        for leftover in leftovers(path):
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent))
            os.chmod(tmp, 0o777 & ~_umask())
        except OSError as e:
            raise _write_error(path, e) from e
        try:
            yield tmp
            _commit(tmp, path, overwrite)
        except (OSError, WriteError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _write_error(path, e) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
    """fsync every file of `tmp`, then rename it to `path` (swapping out an existing `path`)."""
    for child in sorted(tmp.rglob("*")):
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
            fault_point("write", child, label=path / child.relative_to(tmp))
    _refuse_used(path, overwrite)  # a writer that takes no lock (an older relief) may have been faster
    if not path.exists():
        os.replace(tmp, path)
    else:
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(path, old)
        try:
            fault_point("swap", path)
            os.replace(tmp, path)
        except BaseException:
            if not path.exists():
                os.replace(old, path)  # put the previous folder back
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_files(folder: str | Path, names: list[str], overwrite: bool = False) -> Iterator[Path]:
    """Build the files `names` in a temporary folder inside `folder`, then move each into `folder`,
    the last name last (once it exists, the others do). Nothing else in `folder` is touched; an
    existing file of those names is an error unless `overwrite`. Like `atomic_dir`: one writer at a
    time (the lock of the last name), a dead writer's leftovers removed, a failure is WriteError."""
    folder = Path(folder)
    last = folder / names[-1]
    with folder_lock(last):
        clash = next((n for n in names if (folder / n).exists()), None)
        if clash is not None and not overwrite:
            raise ReliefError(f"{folder / clash} already exists; choose another --out or pass --overwrite")
        for leftover in leftovers(last):
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{last.name}.partial-{os.getpid()}-", dir=folder))
        except OSError as e:
            raise _write_error(last, e) from e
        try:
            yield tmp
            for name in names:
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
                fault_point("write", tmp / name, label=folder / name)
            for name in names:
                os.replace(tmp / name, folder / name)
            _fsync_dir(folder)
        except (OSError, WriteError) as e:
            raise _write_error(last, e) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(path: Path) -> str | None:
    """After a crash, make `path` the newest complete copy of itself: when it is missing or fails
    its manifest, and a leftover `.NAME.partial-*` / `.NAME.old-*` of a dead writer is complete
    (its manifest checks out), that one is renamed into place; once `path` is whole, the other
    leftovers (older or torn copies) are removed. Returns what was repaired, in words, or None.
    Call it holding the folder's lock, before anything writes `path` again."""
    problem = check_manifest(path) if path.is_dir() else f"{path} is missing"
    done = None
    if problem is not None:
        complete = [p for p in leftovers(path) if p.is_dir() and check_manifest(p) is None]
        if not complete:
            return None  # nothing better to offer: the reader names the problem
        # the newest manifest; a partial folder is newer than the old one its swap moved aside
        chosen = max(complete, key=lambda p: ((p / MANIFEST).stat().st_mtime_ns, ".partial-" in p.name))
        if path.exists():
            os.replace(path, path.with_name(f".{path.name}.old-{os.getpid()}-{time.monotonic_ns()}"))
        os.replace(chosen, path)
        _fsync_dir(path.parent)
        done = f"{problem}; the complete copy {chosen.name} took its place"
    for leftover in leftovers(path):  # older or torn copies: `path` is whole now
        shutil.rmtree(leftover, ignore_errors=True)
    return done


# ---------------------------------------------------------------- one writer per output


_held: dict[str, int] = {}  # lock files this process holds -> depth (a writer may nest)


def lock_file(target: str | Path) -> Path:
    """Where the lock of `target` lives: `.NAME.lock` beside it (the target may not exist yet)."""
    target = Path(target).absolute()
    return target.parent.resolve() / f".{target.name}.lock"


@contextlib.contextmanager
def folder_lock(target: str | Path) -> Iterator[None]:
    """Hold the one-writer lock of `target` (a folder a command writes) for the block."""
    target = Path(target)
    try:
        target.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(target, e) from e
    file = lock_file(target)
    key = str(file)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = _acquire(file, target)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            file.unlink()
        os.close(fd)


def _owner(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
    if not owner:
        return "another process"
    return f"pid {owner.get('pid')} on {owner.get('host')} (`{owner.get('command')}`, since {owner.get('since')})"


def _acquire(file: Path, target: Path) -> int:
    while True:
        try:
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _write_error(file, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise ReliefError(f"{target} is being written by {_describe(owner)}; wait for it to finish or "
                              "write somewhere else") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file while we opened it: lock the new one
    program = Path(sys.argv[0]).name
    program = "relief" if program in ("__main__.py", "relief") else program  # `python -m relief_mlx` too
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join([program, *sys.argv[1:3]]),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    previous = _owner(fd)
    if previous.get("host") not in (None, me["host"]):  # flock may not reach across machines: trust the record
        os.close(fd)
        raise ReliefError(f"{target} is locked by {_describe(previous)}, which cannot be checked from "
                          f"{me['host']}; if that process is gone, delete {file}")
    if previous.get("pid") not in (None, me["pid"]):
        warnings.warn(f"took over the lock of {target} from {_describe(previous)}, which is no longer running",
                      ReliefWarning, stacklevel=4)
    with contextlib.suppress(OSError):  # a full disk: the flock still holds, only the record is missing
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
    return fd
