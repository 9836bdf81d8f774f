"""LoRA adapters in mlx-lm's format (`adapter_config.json` + `adapters.safetensors`), so an
adapter written by either tool loads in the other. The layers are mlx-lm's (LoRALinear,
LoRASwitchLinear for experts, MXFP4 ones included)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..checkpoint.safetensors_header import check
from ..errors import ReliefError, shown
from ..io import MANIFEST, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
# Sizes that must agree for an adapter to be trained on a model (relief eval names the first that differs).
ARCHITECTURE = ("hidden_size", "num_hidden_layers", "num_local_experts", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
_FIX = "write it with `relief train` or `mlx_lm.lora`"


def apply_adapter(model: nn.Module, adapter_dir: str | Path) -> dict:
    """Wrap the adapter's target layers in LoRA layers and load its weights; returns its config.

    Unlike mlx-lm's loader, every adapter tensor must exist in the model with the same shape,
    so an adapter trained for another model or rank fails here, not inside a matmul.
    """
    path = Path(adapter_dir)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise ReliefError(f"{path} is not an adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = read_config(config_file, len(model.layers), model.args.hidden_size)
    weights = mx.load(str(check(weights_file)))
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    params = dict(tree_flatten(model.parameters()))
    for name, value in weights.items():
        if name not in params:
            raise ReliefError(f"{weights_file}: tensor {shown(name)} has no place in this model; "
                              "the adapter was trained for another model")
        if params[name].shape != value.shape:
            raise ReliefError(
                f"{weights_file}: tensor {name} has shape {value.shape}, the model expects {params[name].shape}; "
                "the adapter was trained for another model or LoRA rank"
            )
    model.load_weights([(k, v.astype(params[k].dtype)) for k, v in weights.items()], strict=False)
    return config


def read_config(file: Path, layers: int, hidden_size: int) -> dict:
    """An adapter_config.json whose fields mlx-lm's LoRA layers can be built from, for a model of
    `layers` layers and `hidden_size`: a rank above the hidden size, or a layer count above the
    model's, would allocate for nothing (or not at all), so each is refused naming the field."""
    config = read_json(file, fix=_FIX)
    if config.get("fine_tune_type", "lora") != "lora":
        raise ReliefError(f"{file}: fine_tune_type {config['fine_tune_type']!r} is not supported; only 'lora'")
    lora = config.get("lora_parameters")
    if "num_layers" not in config or not isinstance(lora, dict) or not {"rank", "scale", "dropout"} <= set(lora):
        raise ReliefError(f"{file} needs num_layers and lora_parameters.rank/scale/dropout "
                          f"(mlx-lm's adapter format); {_FIX}")
    n, rank, scale, dropout = config["num_layers"], lora["rank"], lora["scale"], lora["dropout"]
    keys = lora.get("keys")
    problems = {
        "num_layers": not _integer(n) or not (n == -1 or 1 <= n <= layers),
        "lora_parameters.rank": not _integer(rank) or not 1 <= rank <= hidden_size,
        "lora_parameters.scale": not _number(scale),
        "lora_parameters.dropout": not _number(dropout) or not 0 <= dropout < 1,
        "lora_parameters.keys": keys is not None and (not isinstance(keys, list)
                                                      or not all(isinstance(k, str) for k in keys)),
    }
    field = next((k for k, bad in problems.items() if bad), None)
    if field:
        value = {"num_layers": n, "lora_parameters.rank": rank, "lora_parameters.scale": scale,
                 "lora_parameters.dropout": dropout, "lora_parameters.keys": keys}[field]
        raise ReliefError(f"{file}: {field} = {value!r} is not valid for this model ({layers} layers, hidden size "
                          f"{hidden_size}); the adapter was made for another model or the file is damaged")
    return config


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def base_fingerprint(model_dir: str | Path) -> str | None:
    """What identifies a converted model's weights whatever dtype they were converted to: the
    sha256 of the source shards' hashes its convert manifest records. None without one (a model
    converted by mlx-lm, a fused model): nothing to compare then."""
    file = Path(model_dir) / MANIFEST
    if not file.is_file():
        return None
    inputs = read_json(file, fix="convert the model again").get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        return None
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def check_base(adapter_dir: str | Path, model_dir: str | Path, name: str | None = None) -> None:
    """Refuse an adapter trained on another base model, in one line: its `base_fingerprint` differs
    from the model's (same shapes, other weights), or the `base_model` folder it names is here and
    has another architecture. Adapters that record neither (mlx-lm's) pass."""
    adapter_dir, model_dir = Path(adapter_dir), Path(model_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        return  # not an adapter folder: apply_adapter says so
    config = read_json(adapter_dir / ADAPTER_CONFIG, fix=_FIX)
    name = name or str(adapter_dir)
    base, recorded = config.get("base_model"), config.get("base_fingerprint")
    mine = base_fingerprint(model_dir) if recorded else None
    if mine and mine != recorded:
        raise ReliefError(f"adapter {name} was trained on {base} (weights {str(recorded)[:12]}), not on {model_dir} "
                          f"(weights {mine[:12]}): same shapes, other weights; pass the model it was trained on")
    theirs = Path(str(base)).expanduser() / "config.json" if base else None
    if theirs is None or not theirs.is_file() or theirs.parent.resolve() == model_dir.resolve():
        return
    ours, other = read_json(model_dir / "config.json"), read_json(theirs)
    differs = next((k for k in ARCHITECTURE if ours.get(k) != other.get(k)), None)
    if differs:
        raise ReliefError(f"adapter {name} was trained on {base} ({differs} {other.get(differs)}), not on "
                          f"{model_dir} ({differs} {ours.get(differs)}); pass the model it was trained for")


def remove_adapter(model: nn.Module) -> int:
    """Unwrap every LoRA layer back to the base layer it wraps (mlx-lm's LoRA layers keep it as
    `.linear`), so one loaded model can serve the base and several adapters in turn. Returns how
    many layers were unwrapped; the base weights were never changed."""
    unwrapped = [(name, module.linear) for name, module in model.named_modules()
                 if "lora_a" in module and "linear" in module]
    if unwrapped:
        model.update_modules(tree_unflatten(unwrapped))
    return len(unwrapped)
