"""Checkpoint folder -> model on dtypes that run on the current backend. Every command loads here."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from .. import hub
from ..errors import ReliefError
from .gpt_oss import Model, ModelArgs


def default_dtype() -> mx.Dtype:
    """float32 on the CPU backend (its gather_mm and BLAS run only in float32), bf16 on GPUs."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def read_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of an MLX checkpoint folder, lazily (nothing is read until evaluated)."""
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ReliefError(f"{path} holds no model*.safetensors; pass a folder written by `relief convert`")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights |= mx.load(str(f))
    if any(k.endswith(("_blocks", ".gate_up_proj")) for k in weights):
        raise ReliefError(f"{path} is a Hugging Face checkpoint; run `relief convert {path} --out DIR` and load DIR")
    return weights


def build_model(config: dict, weights: dict[str, mx.array], dtype: mx.Dtype | None = None) -> Model:
    """A gpt-oss `Model` holding `weights`; float weights cast to `dtype` (default: the backend's)."""
    model = Model(ModelArgs.from_dict(config))
    if quantization := config.get("quantization"):
        # mlx-lm's rule (mlx_lm.utils.load_model): a per-module entry wins (`false` keeps a module
        # dense, as `relief fuse` writes for dequantized experts), else a module with scales is quantized
        def quantized(path: str, module: nn.Module) -> bool | dict:
            if path in quantization:
                return quantization[path]
            return hasattr(module, "to_quantized") and f"{path}.scales" in weights

        defaults = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}
        nn.quantize(model, **defaults, class_predicate=quantized)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        detail = " ".join(str(e).split())  # MLX's message spans lines; ours is one
        raise ReliefError(f"the weights do not fit config.json ({detail}); convert the checkpoint again") from e
    dtype = dtype or default_dtype()
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    model.eval()
    return model


def load_model(path: str | Path, adapter: str | Path | None = None, dtype: mx.Dtype | None = None,
               lazy: bool = False) -> tuple[Model, dict]:
    """Load a converted checkpoint (folder or Hub id) without its tokenizer: `(model, config)`."""
    path, _ = hub.resolve(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ReliefError(f"{path} has no config.json; pass a folder written by `relief convert`")
    config = json.loads(config_file.read_text())
    weights = read_weights(path)
    try:
        model = build_model(config, weights, dtype)
    except ReliefError as e:  # name the folder whose weights do not fit
        raise ReliefError(f"{path}: {e}") from None
    if adapter is not None:
        from .lora import apply_adapter

        apply_adapter(model, adapter)
    if not lazy:
        mx.eval(model.parameters())
    return model, config


def load(path: str | Path, adapter: str | Path | None = None, dtype: mx.Dtype | None = None,
         lazy: bool = False, wrapper: bool = True):
    """Load a converted checkpoint (folder or Hub id) and its tokenizer: `(model, tokenizer)`.

    `adapter` is a LoRA adapter folder written by `relief train` or `mlx_lm.lora`. The tokenizer
    is mlx-lm's TokenizerWrapper, or with `wrapper=False` relief's `HarmonyTokenizer` alone
    (what training and Harmony parsing use; building mlx-lm's wrapper too costs seconds).
    """
    path, _ = hub.resolve(path)
    model, config = load_model(path, adapter, dtype, lazy)
    if not wrapper:
        from ..data.harmony import HarmonyTokenizer

        return model, HarmonyTokenizer.from_dir(path)
    from mlx_lm.utils import load_tokenizer

    eos = [config["eos_token_id"]] if isinstance(config.get("eos_token_id"), int) else config.get("eos_token_id")
    return model, load_tokenizer(path, eos_token_ids=eos)
