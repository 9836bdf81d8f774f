"""`relief export --format hf`: the Hugging Face gpt-oss layout that transformers' GptOssForCausalLM
loads (and llama.cpp's convert_hf_to_gguf.py and vLLM read), from a base model plus adapter or
from a fused model.

The adapter is merged as `relief fuse` merges it; the tensors are mapped back with the one
HF <-> MLX mapping (`checkpoint.layout.mlx_to_hf`). Untouched MXFP4 experts leave as the same
`*_blocks`/`*_scales` bytes they came in as. transformers switches MXFP4 on or off per experts
module (`modules_to_not_convert`), so a layer whose experts the adapter touches is written dense
as a whole, in transformers' bf16 layout (`gate_up_proj` (E, H, 2I) interleaved, `down_proj`
(E, I, H)), and listed there; the other layers stay MXFP4. transformers loads this mix (tested on
the CPU, where it dequantizes MXFP4 itself).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..checkpoint.layout import hf_config, mlx_to_hf
from ..errors import ReliefError
from ..io import write_json
from .fuse import Adapter, Merged, Progress, copy_tokenizer, merge, quant_params


def _dense_expert_layers(weights: dict[str, mx.array], adapter: Adapter | None) -> set[int]:
    """Layers with an MXFP4 expert projection the adapter touches: written dense as a whole."""
    touched = [m for m in (adapter.lora if adapter else {}) if ".mlp.experts." in m and f"{m}.scales" in weights]
    return {int(m.split(".")[2]) for m in touched}


def _dequantize_layers(tensors: dict[str, mx.array], layers: set[int], config: dict,
                       dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """The still-quantized expert projections of `layers` dequantized (MXFP4 is exact in bf16)."""
    quantization = config.get("quantization") or {}
    for name in [n for n in tensors if n.endswith(".scales") and ".mlp.experts." in n]:
        module = name.removesuffix(".scales")
        if int(module.split(".")[2]) in layers:
            target = dtype or tensors[f"{module}.bias"].dtype
            tensors[f"{module}.weight"] = mx.dequantize(tensors[f"{module}.weight"], tensors.pop(name),
                                                        **quant_params(quantization, module), dtype=target)
    return tensors


def export_hf(tmp: Path, base: Path, weights: dict[str, mx.array], adapter: Adapter | None, config: dict,
              dtype: mx.Dtype | None, progress: Progress | None = None) -> tuple[dict, list[Merged]]:
    """Write the HF checkpoint into `tmp`, one MLX shard at a time."""
    quantization = config.get("quantization") or {}
    for name in (n for n in weights if n.endswith(".scales")):
        module = name.removesuffix(".scales")
        if ".mlp.experts." not in module or quant_params(quantization, module).get("mode") != "mxfp4":
            raise ReliefError(f"{module} is quantized ({quant_params(quantization, module)}); the Hugging Face "
                              "gpt-oss layout has only MXFP4 experts: convert the model again with dense weights")
    dense_layers = _dense_expert_layers(weights, adapter)
    shards = sorted(base.glob("model*.safetensors"))
    pending: dict[str, mx.array] = {}
    records: list[Merged] = []
    index: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        merged, done = merge(mx.load(str(shard)), adapter, config, "dequantize", dtype)
        pending |= _dequantize_layers(merged, dense_layers, config, dtype)
        tensors = mlx_to_hf(pending)
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(tmp / name), dict(sorted(tensors.items())), metadata={"format": "pt"})
        index |= {t: name for t in tensors}
        total += sum(t.nbytes for t in tensors.values())
        records += done
        if progress:
            progress(k + 1, len(shards), name)
    if pending:
        raise ReliefError(f"{base}: tensors {sorted(pending)[:3]} miss the rest of their expert projection; "
                          "the checkpoint is incomplete: convert it again")
    write_json(tmp / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))})
    mxfp4_layers = sorted({int(n.split(".")[2]) for n in index if n.endswith("_blocks")})
    write_json(tmp / "config.json", hf_config(config, mxfp4_layers))
    copy_tokenizer(base, tmp)
    dense = sorted(set(range(config["num_hidden_layers"])) - set(mxfp4_layers))
    return {"mxfp4_expert_layers": mxfp4_layers, "dense_expert_layers": dense}, records
