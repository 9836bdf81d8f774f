"""An independent float32 reference of a Hugging Face gpt-oss checkpoint, for `relief convert --verify`.

It shares no code with the conversion it checks (`convert.map_tensors`, its gate/up split,
`mxfp4.py`, `mx.load`): the safetensors bytes are read with numpy, MXFP4 is decoded from the
FP4 (E2M1) table and the E8M0 exponents, and the interleaved gate/up rows are split and named
here, so a mapping bug in the converter shows as a difference instead of on both sides.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

# E2M1 code -> value; a byte holds two codes, the low nibble first (the earlier element).
FP4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
_NUMPY = {"F32": np.float32, "F16": np.float16, "U8": np.uint8}


def read_tensors(path: Path, keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file that `keep` accepts; bf16 and f16 become float32."""
    raw = np.memmap(path, np.uint8, mode="r")
    n = int(raw[:8].view("<u8")[0])
    header = json.loads(raw[8 : 8 + n].tobytes())
    out = {}
    for name, entry in header.items():
        if name == "__metadata__" or not keep(name):
            continue
        start, end = (8 + n + offset for offset in entry["data_offsets"])
        data = np.array(raw[start:end])
        if entry["dtype"] == "BF16":  # the upper half of a float32
            value = (data.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            value = data.view(_NUMPY[entry["dtype"]])
            value = value.astype(np.float32) if value.dtype == np.float16 else value
        out[name] = value.reshape(entry["shape"])
    return out


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Blocks (E, out, in/32, 16) uint8 and E8M0 scales (E, out, in/32) -> (E, out, in) float32."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # (E, out, G, 16, 2): low nibble first
    values = FP4[codes].reshape(*blocks.shape[:-1], 32)  # (E, out, G, 32)
    values = values * np.exp2(scales.astype(np.float32) - 127.0)[..., None]
    return values.reshape(*blocks.shape[:-2], -1)  # (E, out, in)


def _expert_matrix(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    """One expert projection as (E, out, in) float32, from either source layout."""
    if f"{name}_blocks" in tensors:
        return dequantize_mxfp4(tensors.pop(f"{name}_blocks"), tensors.pop(f"{name}_scales"))
    return tensors.pop(name).transpose(0, 2, 1)  # transformers' bf16 layout is (E, in, out)


def reference_weights(path: Path, shards: list[Path], layers: int) -> dict[str, np.ndarray]:
    """float32 weights in MLX's names of the first `layers` layers, the embeddings, final norm and head."""

    def keep(name: str) -> bool:
        return not name.startswith("model.layers.") or int(name.split(".")[2]) < layers

    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors |= read_tensors(shard, keep)
    out = {}
    for layer in range(layers):
        hf = f"model.layers.{layer}.mlp.experts"
        gate_up = _expert_matrix(tensors, f"{hf}.gate_up_proj")  # (E, 2I, H): row 2j gate j, 2j+1 up j
        bias = tensors.pop(f"{hf}.gate_up_proj_bias")  # (E, 2I)
        out[f"{hf}.gate_proj.weight"], out[f"{hf}.up_proj.weight"] = gate_up[:, 0::2], gate_up[:, 1::2]
        out[f"{hf}.gate_proj.bias"], out[f"{hf}.up_proj.bias"] = bias[:, 0::2], bias[:, 1::2]
        out[f"{hf}.down_proj.weight"] = _expert_matrix(tensors, f"{hf}.down_proj")  # (E, H, I)
        out[f"{hf}.down_proj.bias"] = tensors.pop(f"{hf}.down_proj_bias")
    return out | {name: value.astype(np.float32) for name, value in tensors.items()}
