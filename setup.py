"""The package data the wheel needs from outside relief_mlx/: the top-level `recipes/` and
`datasets/` folders (the only copies in the repository) install as `relief_mlx/recipes/` and
`relief_mlx/datasets/` (see `relief_mlx/bundled.py`). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["relief_mlx*"]), "relief_mlx.recipes", "relief_mlx.datasets"])
