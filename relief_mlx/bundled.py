"""What the wheel carries besides code: the recipes and the emergency_relief dataset.

The repository holds them once, in its top-level `recipes/` and `datasets/` folders; the wheel
installs them as `relief_mlx/recipes/` and `relief_mlx/datasets/` (setup.py maps them), found
here through `importlib.resources`, or in a source checkout beside the package. A recipe or
dataset path that does not exist resolves to the bundled one of the same name, so
`relief train recipes/mini.toml` and a recipe's `data.path = "datasets/emergency_relief"` work
from any folder, as do the short names `mini.toml` and `emergency_relief`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

KINDS = ("recipes", "datasets")


def root(kind: str) -> Path:
    """The folder of bundled `kind` (recipes or datasets)."""
    installed = resources.files("relief_mlx") / kind
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parents[1] / kind  # a source checkout: the repository's folder


def names(kind: str) -> list[str]:
    return sorted(p.name for p in root(kind).iterdir() if not p.name.startswith((".", "_")))


def resolve(kind: str, path: str | Path) -> Path:
    """`path` when it exists, else the bundled `kind` of that name (`recipes/mini.toml` or
    `mini.toml`) when there is one, else `path` unchanged (the caller reports it missing)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == (kind,) else path.parts
    if not parts or ".." in parts:
        return path
    bundled = root(kind).joinpath(*parts)
    return bundled if bundled.exists() else path
