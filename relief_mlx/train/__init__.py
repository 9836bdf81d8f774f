"""LoRA training: `train(recipe)` runs a Recipe (see `relief_mlx.recipe`) and writes a run folder."""

from .targets import trainable_parameters
from .trainer import Result, resume_recipe, train

__all__ = ["Result", "resume_recipe", "train", "trainable_parameters"]
