"""Checkpoint folder -> model on dtypes that run on the current backend. Every command loads here."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from .. import hub
from ..checkpoint.limits import check_config, check_memory, check_tokenizer_files, weight_bytes
from ..checkpoint.safetensors_header import check
from ..errors import ReliefError
from ..io import read_json
from .gpt_oss import Model, ModelArgs


def default_dtype() -> mx.Dtype:
    """float32 on the CPU backend (its gather_mm and BLAS run only in float32), bf16 on GPUs."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def read_config(path: Path) -> dict:
    """`config.json` of a converted checkpoint folder, checked (`checkpoint.limits.check_config`)."""
    file = path / "config.json"
    if not file.is_file():
        raise ReliefError(f"{path} has no config.json; pass a folder written by `relief convert`")
    return check_config(read_json(file, fix="convert the checkpoint again"), file)


def read_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of an MLX checkpoint folder, lazily (nothing is read until evaluated); every
    shard's header is checked first, so a torn or hostile shard fails here, naming it."""
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ReliefError(f"{path} holds no model*.safetensors; pass a folder written by `relief convert`")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights |= mx.load(str(check(f)))
    if any(k.endswith(("_blocks", ".gate_up_proj")) for k in weights):
        raise ReliefError(f"{path} is a Hugging Face checkpoint; run `relief convert {path} --out DIR` and load DIR")
    return weights


def build_model(config: dict, weights: dict[str, mx.array], dtype: mx.Dtype | None = None,
                check_fits: bool = True) -> Model:
    """A gpt-oss `Model` holding `weights`; float weights cast to `dtype` (default: the backend's).
    Refused before anything is allocated when the machine cannot hold them (`limits.check_memory`;
    `check_fits=False` where the caller has checked its own need, as the bench does for weights it
    made itself)."""
    dtype = dtype or default_dtype()
    check_config(config, "config.json")
    if check_fits:
        check_memory("loading the model", weight_bytes(config, dtype.size, bool(config.get("quantization"))),
                     "use a machine with more memory, or MXFP4 experts (`relief convert --experts mxfp4`)",
                     f"{config['num_hidden_layers']} layers, hidden size {config['hidden_size']}, "
                     f"{str(dtype).rpartition('.')[2]}")
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
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    model.eval()
    return model


def load_model(path: str | Path, adapter: str | Path | None = None, dtype: mx.Dtype | None = None,
               lazy: bool = False) -> tuple[Model, dict]:
    """Load a converted checkpoint (folder or Hub id) without its tokenizer: `(model, config)`."""
    path, _ = hub.resolve(path)
    config = read_config(path)
    check_tokenizer_files(path)  # before any weight is read: no code from a model folder
    weights = read_weights(path)
    try:
        model = build_model(config, weights, dtype)
    except ReliefError as e:  # name the folder whose weights do not fit
        raise ReliefError(f"{path}: {e}") from None
    if adapter is not None:
        from .lora import apply_adapter, check_base

        check_base(adapter, path)
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
    try:
        return model, load_tokenizer(path, eos_token_ids=eos)
    except Exception as e:  # transformers raises many types for a file it cannot read
        raise ReliefError(f"{path}: transformers could not load its tokenizer ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); copy gpt-oss's tokenizer files into it") from e
