"""Synthesize a gpt-oss checkpoint with random weights in the exact Hugging Face layout.

The output is what `huggingface_hub.snapshot_download("openai/gpt-oss-20b")` gives, at a
preset's sizes: `config.json`, `generation_config.json`, `model-0000K-of-0000N.safetensors`
shards with `model.safetensors.index.json`, MXFP4 experts, bf16 everything else, and the real
o200k_harmony tokenizer files. Shards are generated and written one at a time, so memory
stays near one shard even for the 20b preset.

Weights are N(0, 1/fan_in) so activations stay near unit scale through any depth (logits
~N(0, 1), no NaN/inf); norms are 1 + N(0, 0.05^2) and sinks N(0, 1), so a test notices a
norm, a sink or a bias that is dropped or misplaced.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..io import atomic_dir, write_json
from . import mxfp4
from .convert import Progress
from .presets import PRESETS, generation_config, hf_config, nbytes, tensor_plan
from .tokenizer import write_tokenizer_files


def _random_tensor(name: str, shape: tuple[int, ...], key: mx.array) -> mx.array:
    """A random bf16 tensor for `name`; expert `*_blocks` come back as dense float weights."""
    if name.endswith(("layernorm.weight", "norm.weight")):
        return (1.0 + 0.05 * mx.random.normal(shape, key=key)).astype(mx.bfloat16)
    if name.endswith("sinks"):
        return mx.random.normal(shape, key=key).astype(mx.bfloat16)
    if name.endswith(("bias", "_bias")):
        return (0.02 * mx.random.normal(shape, key=key)).astype(mx.bfloat16)
    if name.endswith("_blocks"):
        shape = (*shape[:-2], shape[-2] * 32)  # dense (E, out, in)
    fan_in = shape[-1]
    return (mx.random.normal(shape, key=key) / math.sqrt(fan_in)).astype(mx.bfloat16)


def synth_tensors(config: dict, seed: int = 0) -> Iterator[tuple[str, mx.array]]:
    """Yield (HF name, tensor) in file order; deterministic in `seed`."""
    plan = tensor_plan(config)
    keys = mx.random.split(mx.random.key(seed), len(plan))
    for index, (name, shape, _) in enumerate(plan):
        if name.endswith("_scales"):
            continue  # produced together with its blocks
        if name.endswith("_blocks"):
            # one expert at a time: MLX's CPU mxfp4 quantize needs ~80 bytes per value
            experts = mx.random.split(keys[index], shape[0])
            parts = [mxfp4.quantize(_random_tensor(name, shape[1:], key)) for key in experts]
            yield name, mx.array(np.stack([blocks for blocks, _ in parts]))
            yield name.replace("_blocks", "_scales"), mx.array(np.stack([scales for _, scales in parts]))
        else:
            yield name, _random_tensor(name, shape, keys[index])


def _shard_groups(config: dict, max_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape, dtype in tensor_plan(config):
        b = nbytes(shape, dtype)
        if groups[-1] and size + b > max_bytes and not name.endswith("_scales"):
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += b
    return groups


def synth(preset: str, out: str | Path, seed: int = 0, overwrite: bool = False,
          progress: Progress | None = None) -> Path:
    """Write a random-weight checkpoint of `preset` to `out` (atomically). Returns `out`."""
    config = hf_config(preset)
    groups = _shard_groups(config, PRESETS[preset][1])
    last = len(groups) - 1
    files = [f"model-{k:05d}-of-{last:05d}.safetensors" for k in range(len(groups))]
    file_of = {name: files[k] for k, group in enumerate(groups) for name in group}
    total = len(file_of)
    closes_shard = {group[-1] for group in groups}
    weight_map, total_size, shard = {}, 0, {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for done, (name, tensor) in enumerate(synth_tensors(config, seed), start=1):
            shard[name] = tensor
            if progress:
                progress(done, total, name)
            if name in closes_shard:
                mx.save_safetensors(str(tmp / file_of[name]), shard, metadata={"format": "pt"})
                for k, v in shard.items():
                    weight_map[k] = file_of[name]
                    total_size += v.nbytes
                shard = {}
        write_json(tmp / "model.safetensors.index.json",
                   {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", generation_config())
        write_tokenizer_files(tmp)
    return Path(out)

