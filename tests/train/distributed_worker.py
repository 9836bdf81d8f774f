"""One rank of the data-parallel test: `mlx.launch -n 2 --backend ring python THIS RECIPE.toml`."""

import sys

from relief_mlx.recipe import load_recipe
from relief_mlx.train import train

if __name__ == "__main__":
    result = train(load_recipe(sys.argv[1]))
    print(f"rank done: {result.status} {result.summary['steps']} steps, world {result.summary['world_size']}")
