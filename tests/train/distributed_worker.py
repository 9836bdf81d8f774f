"""One rank of the data-parallel tests, as `mlx.launch -n 2 --backend ring python THIS ...` runs it:

    THIS RECIPE.toml [STOP_AFTER]   train; rank 0 gets a SIGTERM while step STOP_AFTER reports,
                                    so every rank checkpoints and stops after the next step
    THIS --resume RUN               continue RUN from its checkpoint
"""

import os
import signal
import sys

from relief_mlx.recipe import load_recipe
from relief_mlx.train import resume_recipe, train

if __name__ == "__main__":
    if sys.argv[1] == "--resume":
        result = train(resume_recipe(sys.argv[2]), resume=sys.argv[2])
    else:
        stop_after = int(sys.argv[2]) if len(sys.argv) > 2 else None

        def on_event(kind, event):  # events reach rank 0 only, as in `relief train`
            if kind == "step" and event["step"] == stop_after:
                os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would

        result = train(load_recipe(sys.argv[1]), on_event=on_event)
    print(f"rank done: {result.status} {result.summary['steps']} steps, world {result.summary['world_size']}")
