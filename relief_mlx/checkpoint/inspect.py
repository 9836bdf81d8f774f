"""Describe a gpt-oss model from its config alone: architecture, parameters, memory per dtype."""

from __future__ import annotations

from pathlib import Path

from .. import hub
from ..errors import ReliefError
from ..io import read_json
from .presets import PRESETS, count_parameters, hf_config

MXFP4_BYTES = (4 + 8 / 32) / 8  # a 4-bit value plus its share of one E8M0 scale per 32


def model_config(model: str) -> tuple[dict, str]:
    """(config, where it came from) for a preset name, a folder or a Hub id; no weights are read."""
    if model in PRESETS:
        return hf_config(model), f"preset {model}"
    path = Path(model).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise ReliefError(f"{path} has no config.json; pass a checkpoint folder, a Hub id "
                              f"or a preset ({', '.join(PRESETS)})")
        return read_json(file, fix="download it again"), str(path)
    if not hub.is_hub_id(model):
        raise ReliefError(f"{model} is not a preset ({', '.join(PRESETS)}), a folder or a Hub id")
    from huggingface_hub import hf_hub_download

    try:
        file = Path(hf_hub_download(model, "config.json"))
    except Exception as e:  # offline, 404, auth: huggingface_hub has many error types
        raise ReliefError(f"could not get config.json of {model} from the Hub ({type(e).__name__}); "
                          "pass a folder or a preset") from e
    return read_json(file, fix="download it again"), model


def memory_table(counts: dict[str, int]) -> dict[str, int]:
    """Bytes of weights for the storage choices `relief convert` offers."""
    experts, rest = counts["experts"], counts["total"] - counts["experts"]
    return {
        "mxfp4 experts + bf16 (published)": round(experts * MXFP4_BYTES) + 2 * rest,
        "mxfp4 experts + float32": round(experts * MXFP4_BYTES) + 4 * rest,
        "bfloat16": 2 * counts["total"],
        "float32": 4 * counts["total"],
    }


def inspect_model(model: str) -> dict:
    """What `relief inspect` shows; `available` is what this machine's backend can hold (each
    storage of the weights above it is marked as not fitting)."""
    from .limits import available, check_config

    config, source = model_config(model)
    if config.get("model_type") != "gpt_oss":
        raise ReliefError(f"{source}: model_type {config.get('model_type')!r} is not 'gpt_oss'")
    check_config(config, source)
    limit, where = available()
    counts = count_parameters(config)
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_local_experts",
            "num_experts_per_tok", "num_attention_heads", "num_key_value_heads", "head_dim",
            "sliding_window", "vocab_size", "rope_theta")
    return {
        "source": source,
        "architecture": {k: config.get(k) for k in keys} | {
            "layer_types": "".join("S" if t == "sliding_attention" else "F" for t in config.get("layer_types", [])),
            "rope_scaling": config.get("rope_scaling"),
            "quantization": config.get("quantization") or config.get("quantization_config"),
        },
        "parameters": counts,
        "memory_bytes": memory_table(counts),
        "available": {"bytes": limit, "source": where},
    }
