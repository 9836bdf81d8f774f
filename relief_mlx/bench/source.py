"""The model a bench runs: a converted checkpoint folder, or a preset's shapes with random weights
synthesized in memory (experts in MXFP4, as published), so gpt-oss-20b's speed can be measured
before its 13 GB download.

A preset is built tensor by tensor: each random tensor is drawn in its final dtype, mapped to
MLX's layout and evaluated before the next one is made, so memory holds the model plus at most
one tensor in the making (the peak is measured and reported), never the model twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .. import hub
from ..checkpoint.convert import Progress
from ..checkpoint.inspect import model_config
from ..checkpoint.layout import hf_to_mlx, mlx_config
from ..checkpoint.presets import PRESETS, hf_config, tensor_plan
from ..choices import EXPERT_FORMATS
from ..errors import ReliefError
from ..model.load import build_model, default_dtype, read_weights


@dataclass(frozen=True)
class Source:
    """Where the weights come from, and the MLX config.json they fit; nothing loaded yet."""

    label: str
    """`preset NAME (synthesized)` or the folder."""
    config: dict
    """MLX config: a `quantization` entry when the experts are MXFP4."""
    preset: str | None = None
    folder: str | None = None
    """A converted folder or the Hub id of one (downloaded only when built)."""
    shared_experts: bool = False
    """Every layer holds layer 0's dense expert arrays (`describe`'s `shared_experts`)."""

    @property
    def mxfp4(self) -> bool:
        return (self.config.get("quantization") or {}).get("mode") == "mxfp4"


def describe(model: str | None, preset: str | None, experts: str | None = None, dtype: str | None = None,
             shared_experts: bool = False) -> Source:
    """The source named by exactly one of `model` (folder or Hub id) and `preset`; a preset's
    experts are MXFP4 (as published; `auto` too) or dequantized to the dtype the model runs in
    (`dtype`: float32 or bfloat16, default the backend's: float32 on CPU, bfloat16 on GPUs).

    `shared_experts` gives every layer the same dense expert arrays (layer 0's): each layer does
    the work of a real one, in memory once, so a 6-layer float32 model fits 24 GB for timing
    (it is not the published model: the benchmarks check it times like distinct experts)."""
    if (model is None) == (preset is None):
        raise ReliefError("pass exactly one of --model (a converted folder) and --preset "
                          f"({', '.join(PRESETS)})")
    if experts not in (None, *EXPERT_FORMATS):
        raise ReliefError(f"--experts {experts} is not valid; choose one of {', '.join(EXPERT_FORMATS)}")
    runs_in = dtype or str(default_dtype()).removeprefix("mlx.core.")
    dense = experts not in (None, "auto", "mxfp4")
    if dense and experts != runs_in:
        raise ReliefError(f"--experts {experts}: the bench runs in {runs_in}, so dense experts are "
                          f"{runs_in}; pass --experts {runs_in} or mxfp4 (or --dtype {experts})")
    if shared_experts and not dense:
        raise ReliefError(f"--shared-experts shares dense experts; pass --experts {runs_in} with it")
    if preset is not None:
        config = mlx_config(hf_config(preset), experts if dense else "mxfp4")
        label = f"preset {preset} (synthesized{', experts shared by all layers' if shared_experts else ''})"
        return Source(label, config, preset=preset, shared_experts=shared_experts)
    if experts is not None:
        raise ReliefError("--experts applies to --preset; a converted folder's experts are what "
                          "`relief convert --experts` wrote")
    path = Path(model).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise ReliefError(f"{path} has no config.json; pass a folder written by `relief convert`")
        config = json.loads(file.read_text())
    else:
        config, _ = model_config(model)  # a Hub id: config.json only; the weights come in `build`
    if config.get("model_type") != "gpt_oss" or "quantization_config" in config:
        raise ReliefError(f"{model} is not a converted gpt-oss checkpoint; run `relief convert {model} --out DIR` "
                          "and pass DIR")
    return Source(model, config, folder=model)


def build(source: Source, dtype: mx.Dtype, seed: int = 0, progress: Progress | None = None) -> nn.Module:
    """The gpt-oss Model of `source`, every weight evaluated, float weights in `dtype`."""
    if source.folder is not None:
        path, _ = hub.resolve(source.folder)
        model = build_model(source.config, read_weights(path), dtype)
    else:
        weights = synth_weights(source.preset, dtype, seed, progress, dense=not source.mxfp4,
                                shared_experts=source.shared_experts)
        model = build_model(source.config, weights, dtype, check_fits=False)  # run_bench checked its need
    mx.eval(model.parameters())
    return model


def mlx_lm_model(model: nn.Module, config: dict) -> nn.Module:
    """mlx-lm's own gpt-oss `Model` holding the very arrays of `model` (nothing is copied): what
    the mlx-lm runners measure, so they run mlx-lm's modules (its MoE and YaRN), not relief's."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import gpt_oss

    stock = gpt_oss.Model(gpt_oss.ModelArgs.from_dict(config))
    if quantization := config.get("quantization"):
        quantized = {name for name, m in model.named_modules() if "scales" in m}
        nn.quantize(stock, **quantization, class_predicate=lambda p, m: p in quantized)
    stock.load_weights(tree_flatten(model.parameters()), strict=True)
    stock.eval()
    return stock


def random_tensors(config: dict, dtype: mx.Dtype, seed: int = 0) -> Iterator[tuple[str, mx.array]]:
    """(Hugging Face name, random tensor) for every tensor of `config`, in file order.

    Like `checkpoint.synth.synth_tensors` (same names, shapes and spread of values), but made
    for memory: float tensors are drawn directly in `dtype`, and expert `*_blocks` / `*_scales`
    are drawn as random MXFP4 codes instead of quantizing a dense draw, which on MLX's CPU
    backend needs ~80 bytes per value (43 GB for one gpt-oss-20b expert tensor).
    """
    plan = tensor_plan(config)
    keys = mx.random.split(mx.random.key(seed), len(plan))
    for index, (name, shape, _) in enumerate(plan):
        key = keys[index]
        if name.endswith("_blocks"):  # (E, out, in/32, 16) bytes: two 4-bit codes each
            yield name, mx.random.randint(0, 256, shape, dtype=mx.uint8, key=key)
        elif name.endswith("_scales"):  # (E, out, in/32): one power of two per 32 values
            yield name, mx.full(shape, _mxfp4_scale(shape[-1] * 32), dtype=mx.uint8)
        elif name.endswith("norm.weight"):
            yield name, 1.0 + 0.05 * mx.random.normal(shape, dtype=dtype, key=key)
        elif name.endswith("sinks"):
            yield name, mx.random.normal(shape, dtype=dtype, key=key)
        elif name.endswith("bias"):
            yield name, 0.02 * mx.random.normal(shape, dtype=dtype, key=key)
        else:  # uniform with std 1/sqrt(fan_in): 3x faster to draw than a normal on CPUs
            bound = (3 / shape[-1]) ** 0.5
            yield name, mx.random.uniform(-bound, bound, shape, dtype=dtype, key=key)


def _mxfp4_scale(fan_in: int) -> int:
    """The E8M0 exponent that gives uniformly random FP4 codes a std of about 1/sqrt(fan_in).

    The 16 E2M1 values (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) have an RMS of 2.93.
    """
    return 127 + round(math.log2(fan_in**-0.5 / 2.93))


def synth_weights(preset: str, dtype: mx.Dtype, seed: int = 0, progress: Progress | None = None,
                  dense: bool = False, shared_experts: bool = False) -> dict[str, mx.array]:
    """MLX weights of a preset (random, MXFP4 experts, dequantized to `dtype` when `dense`), one
    tensor evaluated at a time, mapped to MLX's names and layout by the converter's own `hf_to_mlx`.
    With `shared_experts`, every layer's experts are layer 0's arrays."""
    config = hf_config(preset)
    experts = str(dtype).removeprefix("mlx.core.") if dense else "mxfp4"
    total = len(tensor_plan(config))
    weights: dict[str, mx.array] = {}
    pending: dict[str, mx.array] = {}
    for done, (name, tensor) in enumerate(random_tensors(config, dtype, seed), start=1):
        if shared_experts and ".mlp.experts." in name and not name.startswith("model.layers.0."):
            layer = ".".join(name.split(".")[:3]) + "."  # model.layers.N.
            weights |= {k.replace("model.layers.0.", layer, 1): v
                        for k, v in weights.items() if k.startswith("model.layers.0.mlp.experts.")}
            continue  # drawn lazily, never evaluated
        pending[name] = tensor
        mapped = hf_to_mlx(pending, "mxfp4", experts, dtype)  # an expert waits for its bias
        mx.eval(mapped)
        weights |= mapped
        if progress:
            progress(done, total, name)
    return weights
