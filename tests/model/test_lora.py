"""Adapters on a loaded model: applied, removed, applied again, the base never changed."""

from __future__ import annotations

import json

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from relief_mlx.model.load import build_model, read_weights
from relief_mlx.model.lora import apply_adapter, remove_adapter

KEYS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.experts.gate_proj"]


def _model(path):
    model = build_model(json.loads((path / "config.json").read_text()), read_weights(path))
    mx.eval(model.parameters())
    return model


def _random_adapter(model_dir, out):
    model = _model(model_dir)
    lora = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": KEYS}
    model.freeze()
    linear_to_lora_layers(model, len(model.model.layers), lora)
    mx.random.seed(0)
    weights = {k: mx.random.normal(v.shape) * 0.1 for k, v in tree_flatten(model.trainable_parameters())}
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": len(model.model.layers), "lora_parameters": lora}))
    return out


def test_remove_adapter_restores_the_base_model(mini_mlx_f32, tmp_path):
    adapter = _random_adapter(mini_mlx_f32, tmp_path / "adapter")
    model = _model(mini_mlx_f32)
    tokens = mx.array([[200006, 1000, 2000, 3000, 4000]])
    base = model(tokens)
    weights_before = dict(tree_flatten(model.parameters()))

    apply_adapter(model, adapter)
    adapted = model(tokens)
    assert mx.abs(adapted - base).max().item() > 1e-3  # the random adapter changes the logits
    assert remove_adapter(model) == len(KEYS) * len(model.model.layers)
    assert not any("lora" in k for k, _ in tree_flatten(model.parameters()))
    assert mx.array_equal(model(tokens), base)
    after = dict(tree_flatten(model.parameters()))
    assert set(after) == set(weights_before)
    assert all(mx.array_equal(after[k], v) for k, v in weights_before.items())

    apply_adapter(model, adapter)  # and it applies again to the same model
    assert mx.allclose(model(tokens), adapted, rtol=1e-5, atol=1e-5)
