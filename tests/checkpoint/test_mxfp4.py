"""MXFP4 decoding is bit-exact against a decoder written from the format description alone."""

import mlx.core as mx
import numpy as np
import pytest

from relief_mlx.checkpoint import mxfp4


# E2M1 from the OCP MX spec: sign, 2 exponent bits (bias 1), 1 mantissa bit; 0b000x is subnormal.
def _e2m1(nibble: int) -> float:
    sign = -1.0 if nibble & 0b1000 else 1.0
    exponent, mantissa = (nibble >> 1) & 0b11, nibble & 1
    magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
    return sign * magnitude


def reference_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Element by element: byte k of a 16-byte block holds values 2k (low nibble) and 2k+1 (high)."""
    out = np.zeros((*blocks.shape[:-2], blocks.shape[-2] * 32), dtype=np.float64)
    for index in np.ndindex(*blocks.shape[:-1]):
        *row, group = index
        scale = 2.0 ** (int(scales[index]) - 127)
        for k in range(16):
            byte = int(blocks[index][k])
            out[(*row, group * 32 + 2 * k)] = _e2m1(byte & 0xF) * scale
            out[(*row, group * 32 + 2 * k + 1)] = _e2m1(byte >> 4) * scale
    return out


def test_lookup_table_matches_the_published_one():
    published = [0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6]
    assert [_e2m1(n) for n in range(16)] == published
    assert np.signbit(_e2m1(8))  # nibble 8 is negative zero


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_decode_is_bit_exact_with_edge_scales(dtype):
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(2, 3, 4, 16), dtype=np.uint8)
    scales = rng.integers(100, 140, size=(2, 3, 4), dtype=np.uint8)
    scales[0, 0, :3] = [0, 127, 254]  # smallest, unit and largest finite E8M0 exponents
    got = np.array(mxfp4.dequantize(blocks, scales, dtype).astype(mx.float32))
    with np.errstate(over="ignore"):  # 2**127 * 2 and up overflow to inf in float32 and bf16
        want = reference_decode(blocks, scales).astype(np.float32)
    assert np.isinf(want).any() and (want[0, 0, :32] != 0).any()  # the edge scales are exercised
    assert np.array_equal(got, want)
    assert np.array_equal(np.signbit(got), np.signbit(want))  # negative zero survives


def test_nibble_order_low_first():
    blocks = np.zeros((1, 1, 16), dtype=np.uint8)
    blocks[0, 0, 0] = 0x72  # low nibble 2 -> 1.0 (element 0), high nibble 7 -> 6.0 (element 1)
    got = np.array(mxfp4.dequantize(blocks, np.full((1, 1), 127, np.uint8)))
    assert got[0, :3].tolist() == [1.0, 6.0, 0.0]


def test_pack_then_unpack_round_trips():
    rng = np.random.default_rng(1)
    values = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -.5, -1, -1.5, -2, -3, -4, -6, 0], np.float32)
    group_scale = 2.0 ** rng.integers(-8, 8, size=(3, 8, 2, 1))
    exact = (rng.choice(values, size=(3, 8, 2, 32)) * group_scale)
    exact[..., 0] = 6 * group_scale[..., 0]  # every group holds its largest value, so the scale is canonical
    exact = exact.reshape(3, 8, 64)
    blocks, scales = mxfp4.quantize(mx.array(exact.astype(np.float32)))
    assert blocks.shape == (3, 8, 2, 16) and scales.shape == (3, 8, 2)
    assert np.array_equal(np.array(mxfp4.dequantize(blocks, scales)), exact)
    blocks2, scales2 = mxfp4.quantize(mxfp4.dequantize(blocks, scales))
    assert np.array_equal(blocks2, blocks) and np.array_equal(scales2, scales)


def test_blocks_and_mlx_words_hold_the_same_bytes():
    blocks = np.random.default_rng(2).integers(0, 256, size=(2, 5, 3, 16), dtype=np.uint8)
    words = mxfp4.blocks_to_mlx(blocks)
    assert words.dtype == np.uint32 and words.shape == (2, 5, 12)
    assert np.array_equal(mxfp4.mlx_to_blocks(words), blocks)
    assert words[0, 0, 0] == int.from_bytes(blocks[0, 0, 0, :4].tobytes(), "little")
