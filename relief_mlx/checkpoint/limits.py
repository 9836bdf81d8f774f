"""What a checkpoint's config may claim, and whether this machine can hold and store what a
command is about to make: checked before anything is allocated or written, refused in one line
with the numbers.

`check_config` refuses a config.json whose sizes are not positive whole numbers or do not fit
together (a hostile or corrupt config would otherwise reach MLX as a segfault or a hang).
`check_memory` compares an estimated need (weights from the config or the safetensors headers,
a shard being converted, a training step) with what the backend can use: Metal's recommended
working set on a Mac (the wired limit relief and mlx-lm run under), the GPU's memory on CUDA,
available RAM on a CPU. `check_disk` compares bytes to write with the free space of the folder.
`RELIEF_MEMORY_CHECK=off` skips the memory check (the estimate may be wrong for a machine).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import ReliefError

GIB = 2**30
SIZES = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_local_experts", "num_experts_per_tok",
         "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
LAYER_TYPES = ("sliding_attention", "full_attention")
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_config(config: dict, file: str | Path) -> dict:
    """`config` when it describes a gpt-oss model whose sizes fit together; else ReliefError
    naming `file` and the field."""
    if config.get("model_type") != "gpt_oss":
        raise ReliefError(f"{file} has model_type {config.get('model_type')!r}; relief-mlx reads only 'gpt_oss' "
                          "checkpoints")
    for key in SIZES:
        if not _whole(config.get(key)):
            raise ReliefError(f"{file}: {key} = {config.get(key)!r} is not a positive whole number; the config is "
                              "corrupt or not gpt-oss's: download it again")
    problems = {
        "num_experts_per_tok": config["num_experts_per_tok"] > config["num_local_experts"],
        "num_key_value_heads": config["num_attention_heads"] % config["num_key_value_heads"] != 0,
        "sliding_window": "sliding_window" in config and not _whole(config["sliding_window"]),
        "layer_types": "layer_types" in config and config["layer_types"] is not None and (
            not isinstance(config["layer_types"], list) or len(config["layer_types"]) != config["num_hidden_layers"]
            or any(t not in LAYER_TYPES for t in config["layer_types"])),
        "rope_theta": not isinstance(config.get("rope_theta", 1.0), int | float) or config.get("rope_theta", 1) <= 0,
    }
    bad = next((key for key, wrong in problems.items() if wrong), None)
    if bad:
        raise ReliefError(f"{file}: {bad} = {config.get(bad)!r} does not fit the rest of the config (heads "
                          "divisible by key-value heads, experts per token within the experts, one layer type per "
                          "layer); the config is corrupt: download it again")
    return config


def weight_bytes(config: dict, float_bytes: int, mxfp4: bool) -> int:
    """Bytes the weights of `config` take in memory: expert matrices MXFP4 or dense in
    `float_bytes`, everything else (expert biases included, as published) dense. The one count
    behind every memory check and forecast (loading, the bench, `relief_mlx.memory`)."""
    from .inspect import MXFP4_BYTES
    from .presets import count_parameters

    h, i = config["hidden_size"], config["intermediate_size"]
    matrices = config["num_hidden_layers"] * config["num_local_experts"] * 3 * h * i  # gate, up, down
    rest = count_parameters(config)["total"] - matrices
    return round(matrices * (MXFP4_BYTES if mxfp4 else float_bytes)) + rest * float_bytes


def available() -> tuple[int | None, str]:
    """(bytes the backend can use, what that figure is); see `relief_mlx.bench.memory`."""
    from ..bench.memory import available_memory

    return available_memory()


def memory_check_off() -> bool:
    """RELIEF_MEMORY_CHECK=off: every memory refusal (loading, converting, training) is skipped."""
    return os.environ.get("RELIEF_MEMORY_CHECK", "").lower() in ("off", "0", "false", "no")


def check_memory(what: str, need: int, fix: str, detail: str = "") -> None:
    """Refuse `what` when `need` bytes exceed what the backend can use (module doc)."""
    if memory_check_off():
        return
    limit, source = available()
    if limit is None or need <= limit:
        return
    detail = f" ({detail})" if detail else ""
    raise ReliefError(f"{what} needs about {need / GIB:,.1f} GiB{detail} but this machine has {limit / GIB:,.1f} GiB "
                      f"({source}); {fix}, or set RELIEF_MEMORY_CHECK=off to try anyway")


def check_disk(what: str, folder: Path, need: int) -> None:
    """Refuse `what` when writing `need` bytes under `folder` would not fit its free space."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ReliefError(f"{what} writes about {need / GIB:,.2f} GiB but {folder} has {free / GIB:,.2f} GiB free; "
                          "free some space or choose another --out")


def check_tokenizer_files(folder: Path) -> None:
    """Refuse tokenizer files that would make transformers import code from the folder (`auto_map`
    in tokenizer_config.json) or name a module to import; no code in a model folder ever runs."""
    import re

    from ..io import read_json

    file = Path(folder) / "tokenizer_config.json"
    if not file.is_file():
        return
    config = read_json(file, fix="copy gpt-oss's tokenizer files into the folder again")
    if "auto_map" in config:
        raise ReliefError(f"{file}: auto_map names tokenizer code shipped in the folder; relief never runs code "
                          "from a model folder (gpt-oss needs none): remove auto_map")
    for key in ("tokenizer_class", "chat_template_type", "tool_parser_type"):
        value = config.get(key)
        if value is not None and not (isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", value)):
            raise ReliefError(f"{file}: {key} = {value!r} is not a plain name; remove it or copy gpt-oss's "
                              "tokenizer files again")
