"""Atomic writes: a later step never reads a half-written file or folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ReliefError

MANIFEST = "relief-manifest.json"


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


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result is an ordinary file
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ReliefError(f"could not write {path}: {e.strerror or e}; free space or fix permissions") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place only when complete.

    An interrupted build leaves `.<name>.partial-*` behind, never a folder at `path`.
    An existing non-empty `path` is an error unless `overwrite`, and is untouched until the
    new folder is complete.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise ReliefError(f"{path} already exists and is not empty; choose another --out or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


@contextlib.contextmanager
def atomic_files(folder: str | Path, names: list[str], overwrite: bool = False) -> Iterator[Path]:
    """Build the files `names` in a temporary folder inside `folder`, then move each into `folder`,
    the last name last (once it exists, the others do). Nothing else in `folder` is touched; an
    existing file of those names is an error unless `overwrite`."""
    folder = Path(folder)
    clash = next((n for n in names if (folder / n).exists()), None)
    if clash is not None and not overwrite:
        raise ReliefError(f"{folder / clash} already exists; choose another --out or pass --overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".relief.partial-", dir=folder))
    try:
        yield tmp
        for name in names:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        for name in names:
            os.replace(tmp / name, folder / name)
        _fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(folder: Path, record: dict, files: list[str] | None = None) -> None:
    """`folder/relief-manifest.json`: `record`, the sha256 of `files` (default: every file under
    `folder`, by relative path) as "outputs", and the package versions. The one manifest writer of
    every folder relief builds (convert, fuse, export), called last inside `atomic_dir`."""
    if files is None:
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    write_json(folder / MANIFEST, record | {"outputs": {f: sha256(folder / f) for f in files},
                                            "versions": package_versions()})
