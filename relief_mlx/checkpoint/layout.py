"""The one Hugging Face <-> MLX mapping of gpt-oss tensors and configs: `convert` reads with
`hf_to_mlx`, `export` writes with `mlx_to_hf`, and a test round-trips HF -> MLX -> HF bit for bit.

Every tensor keeps its name and layout except the experts of each layer (prefix `mlp.experts.`):

  Hugging Face                                     MLX (mlx-lm's SwitchGLU after `sanitize`)
  gate_up_proj_blocks  uint8 (E, 2I, H/32, 16)     gate_proj.weight, up_proj.weight  uint32 (E, I, H/8)
  gate_up_proj_scales  uint8 (E, 2I, H/32)         gate_proj.scales, up_proj.scales  uint8 (E, I, H/32)
  gate_up_proj         (E, H, 2I)  transformers'   gate_proj.weight, up_proj.weight  (E, I, H)
  gate_up_proj_bias    (E, 2I)                     gate_proj.bias, up_proj.bias      (E, I)
  down_proj_blocks, _scales, down_proj, _bias      down_proj.weight, .scales, .bias: the same rules

Hugging Face interleaves gate and up: row (or bias entry) 2j is gate j, 2j+1 is up j. MXFP4 bytes
are reinterpreted (16 bytes of a block = 4 little-endian uint32 words), never decoded. Dense HF
experts are transformers' (E, in, out); MLX's are (E, out, in). A square down_proj (hidden ==
intermediate, as in gpt-oss-20b) transposes without a shape error, so only values catch a
missed transpose (tests/checkpoint/test_layout.py).
"""

from __future__ import annotations

import mlx.core as mx

from .. import choices
from . import presets
from .mxfp4 import GROUP_SIZE, QUANTIZATION

DTYPES = {name: getattr(mx, name) for name in choices.DTYPES}
# The published checkpoint's quantization_config: everything but the experts stays dense.
MXFP4_NOT_CONVERTED = presets.hf_config("gpt-oss-20b")["quantization_config"]["modules_to_not_convert"]
_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


# --- Hugging Face -> MLX (convert) ----------------------------------------------------------
def _split_gate_up(prefix: str, suffix: str, value: mx.array, axis: int) -> dict[str, mx.array]:
    """Interleaved rows (or bias entries): even -> gate_proj, odd -> up_proj."""
    index = [slice(None)] * value.ndim
    out = {}
    for proj, start in (("gate_proj", 0), ("up_proj", 1)):
        index[axis] = slice(start, None, 2)
        out[f"{prefix}.{proj}.{suffix}"] = mx.contiguous(value[tuple(index)])
    return out


def _expert_tensors(prefix: str, proj: str, weight: mx.array, scales: mx.array | None,
                    bias: mx.array, experts: str, dtype: mx.Dtype) -> dict[str, mx.array]:
    """MLX tensors of one expert projection. `weight` is uint32 MXFP4 when `scales` is given,
    else dense (E, out, in)."""
    if scales is not None and experts != "mxfp4":
        weight = mx.dequantize(weight, scales, group_size=GROUP_SIZE, bits=4, mode="mxfp4",
                               dtype=DTYPES[experts])
        scales = None
    elif scales is None and experts == "mxfp4":
        weight, scales = mx.quantize(weight.astype(mx.float32), **QUANTIZATION)
    elif scales is None:
        weight = weight.astype(DTYPES[experts])
    bias = bias.astype(dtype if experts == "mxfp4" else DTYPES[experts])
    tensors = {"weight": weight, "bias": bias} | ({"scales": scales} if scales is not None else {})
    out = {}
    for suffix, value in tensors.items():
        axis = -1 if suffix == "bias" else -2
        if proj == "gate_up_proj":
            out |= _split_gate_up(prefix, suffix, value, axis)
        else:
            out[f"{prefix}.down_proj.{suffix}"] = value
    return out


def hf_to_mlx(pending: dict[str, mx.array], layout: str, experts: str,
              dtype: mx.Dtype) -> dict[str, mx.array]:
    """Map every tensor of `pending` that is complete; the rest stays in `pending`.

    `layout` is the source's: 'mxfp4' (published) or 'bf16' (transformers' dense experts);
    `experts` is what the MLX experts become: 'mxfp4', or a dtype name to dequantize to.
    An expert projection needs its weight, bias (and scales) together, which may sit in
    different shards; everything else maps alone.
    """
    out = {}
    for name in sorted(pending):
        if name not in pending:
            continue  # consumed with its projection
        if ".mlp.experts." not in name:
            out[name] = pending.pop(name).astype(dtype)
            continue
        prefix, leaf = name.rsplit(".", 1)
        proj = "gate_up_proj" if leaf.startswith("gate_up_proj") else "down_proj"
        parts = [f"{prefix}.{proj}_bias"]
        parts += [f"{prefix}.{proj}_blocks", f"{prefix}.{proj}_scales"] if layout == "mxfp4" else [f"{prefix}.{proj}"]
        if not all(p in pending for p in parts):
            continue
        bias = pending.pop(parts[0])
        if layout == "mxfp4":
            weight = pending.pop(parts[1]).view(mx.uint32).flatten(-2)  # (E, out, in/32, 16) u8 -> (E, out, in/8) u32
            scales = pending.pop(parts[2])
        else:
            weight, scales = pending.pop(parts[1]).swapaxes(-1, -2), None  # (E, in, out) -> (E, out, in)
        out |= _expert_tensors(prefix, proj, weight, scales, bias, experts, dtype)
    return out


def mlx_config(config: dict, experts: str) -> dict:
    """The MLX config.json of a Hugging Face config: `quantization` when the experts stay MXFP4."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if experts == "mxfp4":
        config["quantization"] = dict(QUANTIZATION)
    return config


# --- MLX -> Hugging Face (export) -----------------------------------------------------------
def _interleave(gate: mx.array, up: mx.array, axis: int) -> mx.array:
    """The inverse of `_split_gate_up`: gate j -> index 2j, up j -> 2j+1 along `axis` (< 0)."""
    stacked = mx.stack([gate, up], axis=gate.ndim + axis + 1)  # (..., n, 2, ...)
    shape = list(gate.shape)
    shape[axis] *= 2
    return stacked.reshape(shape)


def _hf_projection(prefix: str, hf: str, parts: dict[str, mx.array]) -> dict[str, mx.array]:
    """HF tensors of one expert projection from its MLX tensors (`parts`: 'gate_proj.weight' -> array)."""
    projs = _PROJECTIONS[hf]

    def joined(leaf: str, axis: int) -> mx.array:
        values = [parts[f"{p}.{leaf}"] for p in projs]
        return _interleave(*values, axis) if len(values) == 2 else values[0]

    out = {f"{prefix}.{hf}_bias": joined("bias", -1)}
    weight = joined("weight", -2)
    if f"{projs[0]}.scales" in parts:
        out[f"{prefix}.{hf}_blocks"] = weight.view(mx.uint8).reshape(*weight.shape[:-1], -1, 16)
        out[f"{prefix}.{hf}_scales"] = joined("scales", -2)
    else:
        out[f"{prefix}.{hf}"] = mx.contiguous(weight.swapaxes(-1, -2))  # (E, out, in) -> (E, in, out)
    return out


def mlx_to_hf(pending: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map every tensor of `pending` that is complete; the rest stays in `pending`. The inverse of
    `hf_to_mlx`: MXFP4 experts -> `*_blocks`/`*_scales` (the same bytes), dense experts ->
    transformers' (E, in, out), gate/up interleaved again."""
    out = {}
    for name in sorted(pending):
        if name not in pending:
            continue  # consumed with its projection
        if ".mlp.experts." not in name:
            out[name] = pending.pop(name)
            continue
        prefix, proj, _ = name.rsplit(".", 2)
        hf = "gate_up_proj" if proj in ("gate_proj", "up_proj") else "down_proj"
        leaves = ("weight", "bias") + (("scales",) if f"{prefix}.{proj}.scales" in pending else ())
        names = [f"{p}.{leaf}" for p in _PROJECTIONS[hf] for leaf in leaves]
        if not all(f"{prefix}.{n}" in pending for n in names):
            continue
        out |= _hf_projection(prefix, hf, {n: pending.pop(f"{prefix}.{n}") for n in names})
    return out


def hf_config(config: dict, mxfp4_layers: list[int]) -> dict:
    """The Hugging Face config.json of an MLX config whose experts are MXFP4 in `mxfp4_layers` and
    dense elsewhere. transformers keeps the dense ones unconverted (`modules_to_not_convert`) and
    loads such a mixed checkpoint (tested)."""
    config = {k: v for k, v in config.items() if k != "quantization"}
    if mxfp4_layers:
        dense = [i for i in range(config["num_hidden_layers"]) if i not in mxfp4_layers]
        config["quantization_config"] = {
            "modules_to_not_convert": MXFP4_NOT_CONVERTED + [f"model.layers.{i}.mlp.experts" for i in dense],
            "quant_method": "mxfp4",
        }
    return config


def mlx_quantization(config: dict, dense_modules: list[str]) -> dict:
    """`config` with `dense_modules` marked unquantized in its `quantization` entry: mlx-lm's
    per-module form (`"model.layers.0.mlp.experts.gate_proj": false`), which mlx-lm's loader and
    relief's both honour; the other modules stay quantized where their weights have scales."""
    if not dense_modules or "quantization" not in config:
        return config
    return config | {"quantization": config["quantization"] | {m: False for m in sorted(dense_modules)}}
