"""MXFP4 as gpt-oss stores it, and as MLX computes with it.

The Hugging Face checkpoint stores each expert matrix `(E, out, in)` as
`*_blocks` uint8 `(E, out, in/32, 16)`: 16 bytes hold 32 E2M1 values along `in`, low
nibble first, and `*_scales` uint8 `(E, out, in/32)`: one E8M0 exponent per 32 values,
value = FP4[nibble] * 2**(scale - 127). MLX's `mode="mxfp4"` is the same bit layout with
the bytes of a row read as little-endian uint32 words, so keeping the experts in MXFP4
is a reinterpretation of the bytes, never a dequantize/requantize round trip.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

GROUP_SIZE = 32
BITS = 4
QUANTIZATION = {"group_size": GROUP_SIZE, "bits": BITS, "mode": "mxfp4"}


def blocks_to_mlx(blocks: np.ndarray) -> np.ndarray:
    """uint8 `(..., out, in/32, 16)` -> uint32 `(..., out, in/8)` with the same bytes."""
    flat = np.ascontiguousarray(blocks).reshape(*blocks.shape[:-2], -1)  # (..., out, in/2)
    return flat.view("<u4")


def mlx_to_blocks(weight: np.ndarray) -> np.ndarray:
    """uint32 `(..., out, in/8)` -> uint8 `(..., out, in/32, 16)` with the same bytes."""
    flat = np.ascontiguousarray(weight).astype("<u4", copy=False).view(np.uint8)
    return flat.reshape(*weight.shape[:-1], -1, 16)


def dequantize(blocks: np.ndarray, scales: np.ndarray, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Decode MXFP4 blocks and scales to a dense `(..., out, in)` array of `dtype`.

    Every MXFP4 value (3 significant bits times a power of two) is exact in bf16 and fp32.
    """
    w = mx.array(blocks_to_mlx(blocks))
    return mx.dequantize(w, mx.array(scales), group_size=GROUP_SIZE, bits=BITS,
                         mode="mxfp4", dtype=dtype)


def quantize(weight: mx.array) -> tuple[np.ndarray, np.ndarray]:
    """Encode a dense `(..., out, in)` array (in % 32 == 0) as HF `(blocks, scales)`."""
    w, scales = mx.quantize(weight.astype(mx.float32), group_size=GROUP_SIZE, bits=BITS,
                            mode="mxfp4")
    return mlx_to_blocks(np.array(w)), np.array(scales)
