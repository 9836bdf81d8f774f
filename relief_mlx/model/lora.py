"""LoRA adapters in mlx-lm's format (`adapter_config.json` + `adapters.safetensors`), so an
adapter written by either tool loads in the other. The layers are mlx-lm's (LoRALinear,
LoRASwitchLinear for experts, MXFP4 ones included)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..errors import ReliefError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"


def apply_adapter(model: nn.Module, adapter_dir: str | Path) -> dict:
    """Wrap the adapter's target layers in LoRA layers and load its weights; returns its config.

    Unlike mlx-lm's loader, every adapter tensor must exist in the model with the same shape,
    so an adapter trained for another model or rank fails here, not inside a matmul.
    """
    path = Path(adapter_dir)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise ReliefError(f"{path} is not an adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = json.loads(config_file.read_text())
    if config.get("fine_tune_type", "lora") != "lora":
        raise ReliefError(f"{config_file}: fine_tune_type {config['fine_tune_type']!r} is not supported; only 'lora'")
    lora = config.get("lora_parameters", {})
    if "num_layers" not in config or not {"rank", "scale", "dropout"} <= set(lora):
        raise ReliefError(f"{config_file} needs num_layers and lora_parameters.rank/scale/dropout "
                          "(mlx-lm's adapter format); write it with `relief train` or `mlx_lm.lora`")
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], lora)
    params = dict(tree_flatten(model.parameters()))
    weights = mx.load(str(weights_file))
    for name, value in weights.items():
        if name not in params:
            raise ReliefError(f"{weights_file}: tensor {name} has no place in this model; "
                              "the adapter was trained for another model")
        if params[name].shape != value.shape:
            raise ReliefError(
                f"{weights_file}: tensor {name} has shape {value.shape}, the model expects {params[name].shape}; "
                "the adapter was trained for another model or LoRA rank"
            )
    model.load_weights([(k, v.astype(params[k].dtype)) for k, v in weights.items()], strict=False)
    return config


def remove_adapter(model: nn.Module) -> int:
    """Unwrap every LoRA layer back to the base layer it wraps (mlx-lm's LoRA layers keep it as
    `.linear`), so one loaded model can serve the base and several adapters in turn. Returns how
    many layers were unwrapped; the base weights were never changed."""
    unwrapped = [(name, module.linear) for name, module in model.named_modules()
                 if "lora_a" in module and "linear" in module]
    if unwrapped:
        model.update_modules(tree_unflatten(unwrapped))
    return len(unwrapped)
