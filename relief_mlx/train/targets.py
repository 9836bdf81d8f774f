"""LoRA targets by name pattern, applied with mlx-lm's layers, counted from a config alone.

Patterns are fnmatch globs over module names inside one transformer block, the names mlx-lm's
`adapter_config.json` calls `keys`: `self_attn.q_proj`, `self_attn.*`, `mlp.experts.*`.
Expert projections get one LoRA per expert (mlx-lm's `LoRASwitchLinear`, MXFP4 experts
included); the router only when a pattern names it; embeddings and lm_head are not targets.
"""

from __future__ import annotations

import fnmatch

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..errors import ReliefError
from ..recipe import LoraSection, Recipe

_LINEAR = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)


def module_shapes(config: dict) -> dict[str, tuple[int, int, int]]:
    """Every LoRA-able module of one gpt-oss block: name -> (experts, in, out), from config.json."""
    h, i, e = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    return {
        "self_attn.q_proj": (1, h, q),
        "self_attn.k_proj": (1, h, kv),
        "self_attn.v_proj": (1, h, kv),
        "self_attn.o_proj": (1, q, h),
        "mlp.router": (1, h, e),
        "mlp.experts.gate_proj": (e, h, i),
        "mlp.experts.up_proj": (e, h, i),
        "mlp.experts.down_proj": (e, i, h),
    }


def resolve_targets(patterns: tuple[str, ...], names: list[str]) -> list[str]:
    """The module names matched by any pattern; a pattern that matches nothing is an error."""
    keys: list[str] = []
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ReliefError(
                f"lora.targets pattern {pattern!r} matches no module of a gpt-oss layer; "
                f"use one of {', '.join(names)} (globs like self_attn.* work)"
            )
        keys += [n for n in matched if n not in keys]
    return keys


def trainable_parameters(config: dict, recipe: Recipe | LoraSection) -> int:
    """LoRA parameters a recipe adds to the model of `config`: r * (in + out) per module and expert."""
    lora = recipe.lora if isinstance(recipe, Recipe) else recipe
    shapes = module_shapes(config)
    n = config["num_hidden_layers"]
    layers = n if lora.layers == -1 else min(lora.layers, n)
    keys = resolve_targets(lora.targets, list(shapes))
    check_rank(lora.rank, {k: shapes[k] for k in keys})
    return layers * sum(e * lora.rank * (i + o) for e, i, o in (shapes[k] for k in keys))


def check_rank(rank: int, shapes: dict[str, tuple[int, int, int]]) -> None:
    """A LoRA rank above a targeted module's smaller side adds parameters and no expressive power
    (and a rank of 10^9 would allocate until the machine fails): refuse it before anything is built."""
    name, (_, i, o) = min(shapes.items(), key=lambda kv: min(kv[1][1:]))
    if rank > min(i, o):
        raise ReliefError(f"lora.rank = {rank} is above {min(i, o)}, the smaller side of {name} ({i} x {o}); a "
                          f"LoRA update of a {i} x {o} matrix has at most that rank: lower lora.rank")


def adapter_config(lora: LoraSection, keys: list[str], num_layers: int) -> dict:
    """`adapter_config.json` in mlx-lm's keys (what `mlx_lm.generate --adapter-path` reads)."""
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": lora.rank, "scale": lora.alpha / lora.rank,
                            "dropout": lora.dropout, "keys": keys},
        "relief_mlx": {"targets": list(lora.targets), "alpha": lora.alpha},
    }


def apply_lora(model: nn.Module, lora: LoraSection) -> dict:
    """Freeze the model, wrap the targeted modules in mlx-lm LoRA layers; returns the adapter config.

    LoRA A is drawn from MLX's global random state: seed it first (`mx.random.seed`).
    """
    names = [n for n, m in model.layers[0].named_modules() if isinstance(m, _LINEAR)]
    keys = resolve_targets(lora.targets, sorted(names))
    num_layers = len(model.layers) if lora.layers == -1 else lora.layers
    if num_layers > len(model.layers):
        raise ReliefError(f"lora.layers = {lora.layers} but the model has {len(model.layers)} layers; "
                          "lower it or use -1")
    check_rank(lora.rank, {k: v for k, v in module_shapes(vars(model.args)).items() if k in keys})
    config = adapter_config(lora, keys, num_layers)
    model.freeze()
    linear_to_lora_layers(model, num_layers, config["lora_parameters"])
    return config


def count_trainable(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def lora_summary(config: dict, recipe: Recipe) -> dict:
    """Trainable LoRA parameters of `recipe` on the model of `config`, against the model's total."""
    from ..checkpoint.presets import count_parameters

    trainable = trainable_parameters(config, recipe)
    total = count_parameters(config)["total"] + trainable
    return {"trainable": trainable, "total": total, "percent": 100 * trainable / total}
