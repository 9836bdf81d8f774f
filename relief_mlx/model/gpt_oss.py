"""gpt-oss for MLX: mlx-lm's model definition with a YaRN rotary embedding that follows the config.

mlx-lm's `YarnRoPE` always rounds the correction range (floor/ceil). gpt-oss's config says
`truncate: false`, so the ramp between the correction dims (~8.09 and ~17.40 for head_dim 64)
must not be rounded; rounding shifts every frequency in that band and the error grows with
position (0.67 relative logit error at 127 tokens against transformers). The MoE block is
`moe.MLPBlock`: mlx-lm's, with the experts grouped by expert on the CPU (same values, far
faster there). Everything else, attention with sinks, the sliding window, top-k routing and
SwitchGLU experts, is mlx-lm's.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gpt_oss
from mlx_lm.models.gpt_oss import ModelArgs

from .moe import MLPBlock

__all__ = ["Model", "ModelArgs", "YarnRoPE"]


def _yarn_inv_freq(dims: int, base: float, factor: float, original_max: int,
                   beta_fast: float, beta_slow: float, truncate: bool) -> mx.array:
    """Inverse frequencies as transformers' `_compute_yarn_parameters` computes them."""

    def correction_dim(rotations: float) -> float:
        return dims * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp  # 1 keeps the original frequency, 0 interpolates it
    inv_freq = 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))
    return inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation


class YarnRoPE(nn.Module):
    """Half-split YaRN RoPE; cos and sin scaled by the attention factor 0.1 ln(factor) + 1."""

    def __init__(self, dims: int, base: float, scaling: dict):
        super().__init__()
        factor = float(scaling["factor"])
        self.dims = dims
        self.attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        inv_freq = _yarn_inv_freq(
            dims, base, factor,
            int(scaling.get("original_max_position_embeddings", 4096)),
            float(scaling.get("beta_fast", 32.0)),
            float(scaling.get("beta_slow", 1.0)),
            bool(scaling.get("truncate", True)),
        )
        self._freqs = 1.0 / inv_freq  # mx.fast.rope takes periods; a leading _ keeps it a constant

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        # rope is linear in x, so scaling x equals scaling cos and sin
        x = x * self.attention_factor
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0,
                            offset=offset, freqs=self._freqs)


class Model(gpt_oss.Model):
    """mlx-lm's gpt-oss `Model`, with the faithful YaRN above on every attention block and
    relief's MoE block (`moe.MLPBlock`: the same weights under the same names)."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        scaling = args.rope_scaling or {}
        for layer in self.model.layers:
            layer.mlp = MLPBlock(args)
            if scaling.get("rope_type", scaling.get("type")) == "yarn":
                layer.self_attn.rope = YarnRoPE(args.head_dim, args.rope_theta, scaling)
