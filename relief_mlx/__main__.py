"""`python -m relief_mlx ...`: the `relief` command, for when the console script is not on PATH."""

from .cli import main

if __name__ == "__main__":
    main()
