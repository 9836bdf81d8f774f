"""The HF <-> MLX mapping: HF -> MLX -> HF is the identity, bit for bit, in both source layouts."""

import json

import mlx.core as mx
import numpy as np
import pytest

from relief_mlx.checkpoint.layout import hf_config, hf_to_mlx, mlx_quantization, mlx_to_hf
from relief_mlx.checkpoint.mxfp4 import dequantize


def _hf_tensors(path) -> dict[str, mx.array]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in mx.load(str(f)).items()}


def _assert_bit_identical(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        # compare the bytes: bf16 has no numpy dtype, and NaN-free equality is not enough for "bit exact"
        assert np.array_equal(np.array(got[name].view(mx.uint8)), np.array(value.view(mx.uint8))), name


def test_mxfp4_checkpoint_round_trips_bit_exactly(mini_hf):
    source = _hf_tensors(mini_hf)
    pending = dict(source)
    mlx = hf_to_mlx(pending, "mxfp4", "mxfp4", mx.bfloat16)
    assert not pending
    assert mlx["model.layers.0.mlp.experts.gate_proj.weight"].dtype == mx.uint32
    back = mlx_to_hf(dict(mlx))
    _assert_bit_identical(back, source)


def test_transformers_bf16_layout_round_trips_bit_exactly(mini_hf):
    """A fine-tune saved by transformers: dense experts (E, in, out), built here with numpy."""
    source = {}
    for name, value in _hf_tensors(mini_hf).items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            scales = np.array(_hf_tensors(mini_hf)[name.replace("_blocks", "_scales")])
            dense = np.array(dequantize(np.array(value), scales)).transpose(0, 2, 1)  # (E, out, in) -> (E, in, out)
            source[name.removesuffix("_blocks")] = mx.array(dense).astype(mx.bfloat16)
        else:
            source[name] = value
    pending = dict(source)
    mlx = hf_to_mlx(pending, "bf16", "bfloat16", mx.bfloat16)
    assert not pending
    _assert_bit_identical(mlx_to_hf(dict(mlx)), source)


def test_dense_experts_use_transformers_orientation_by_value():
    """mini's down_proj is square (hidden == intermediate), so a missing transpose keeps the shape:
    check with values that transformers' `x @ down_proj[e]` equals MLX's `W[e] @ x`, and that
    gate j / up j land on rows 2j / 2j+1."""
    rng = np.random.default_rng(0)
    e, n = 2, 8
    weights = {f"m.mlp.experts.{p}.{leaf}": mx.array(rng.normal(size=(e, n) if leaf == "bias" else (e, n, n)),
                                                       dtype=mx.float32)
               for p in ("gate_proj", "up_proj", "down_proj") for leaf in ("weight", "bias")}
    hf = mlx_to_hf(dict(weights))
    x = rng.normal(size=n).astype(np.float32)
    down, mlx_down = np.array(hf["m.mlp.experts.down_proj"]), np.array(weights["m.mlp.experts.down_proj.weight"])
    np.testing.assert_allclose(x @ down[1], mlx_down[1] @ x, rtol=1e-5)
    gate_up = np.array(hf["m.mlp.experts.gate_up_proj"])  # (E, in, 2I): column 2j is gate j
    gate, up = (np.array(weights[f"m.mlp.experts.{p}.weight"]) for p in ("gate_proj", "up_proj"))
    np.testing.assert_allclose(x @ gate_up[1][:, 2 * 3], gate[1, 3] @ x, rtol=1e-5)
    np.testing.assert_allclose(x @ gate_up[1][:, 2 * 3 + 1], up[1, 3] @ x, rtol=1e-5)
    bias = np.array(hf["m.mlp.experts.gate_up_proj_bias"])
    assert bias[1, 7] == np.array(weights["m.mlp.experts.up_proj.bias"])[1, 3]


def test_an_incomplete_projection_waits_in_pending():
    weights = {"m.mlp.experts.gate_proj.weight": mx.zeros((1, 2, 2)), "m.mlp.experts.gate_proj.bias": mx.zeros((1, 2)),
               "m.norm.weight": mx.ones((2,))}
    pending = dict(weights)
    out = mlx_to_hf(pending)
    assert list(out) == ["m.norm.weight"] and sorted(pending) == sorted(weights)[:2]


@pytest.mark.parametrize("mxfp4_layers", [[0, 1, 2, 3], [0, 2], []])
def test_hf_config_lists_dense_expert_layers_as_not_converted(mini_mlx, mxfp4_layers):
    config = hf_config(json.loads((mini_mlx / "config.json").read_text()), mxfp4_layers)
    assert "quantization" not in config
    if not mxfp4_layers:
        assert "quantization_config" not in config
        return
    skipped = config["quantization_config"]["modules_to_not_convert"]
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert [s for s in skipped if s.endswith(".mlp.experts")] == [
        f"model.layers.{i}.mlp.experts" for i in range(4) if i not in mxfp4_layers]


def test_mlx_quantization_marks_dense_modules(mini_mlx):
    config = json.loads((mini_mlx / "config.json").read_text())
    marked = mlx_quantization(config, ["model.layers.1.mlp.experts.up_proj"])
    assert marked["quantization"]["model.layers.1.mlp.experts.up_proj"] is False
    assert marked["quantization"]["mode"] == "mxfp4"
    assert "model.layers.1.mlp.experts.up_proj" not in config["quantization"]  # the input is not changed
