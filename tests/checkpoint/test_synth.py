"""`relief synth` writes the exact Hugging Face layout of gpt-oss, with sane random weights."""

import json

import mlx.core as mx
import numpy as np

from relief_mlx import load
from relief_mlx.checkpoint.presets import count_parameters, hf_config, tensor_plan
from relief_mlx.checkpoint.safetensors_header import read_header


def test_layout_matches_the_hub_checkpoint(mini_hf):
    config = json.loads((mini_hf / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert config["vocab_size"] == 201088 and config["rope_scaling"]["truncate"] is False
    assert json.loads((mini_hf / "generation_config.json").read_text())["eos_token_id"] == [200002, 199999, 200012]
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (mini_hf / f).is_file()
    index = json.loads((mini_hf / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 1 and shards[0] == "model-00000-of-00002.safetensors"
    found = {}
    for shard in shards:
        for name, (dtype, shape) in read_header(mini_hf / shard).items():
            assert index[name] == shard
            found[name] = (dtype, shape)
    plan = {name: ({"u8": "U8", "bf16": "BF16"}[dtype], shape) for name, shape, dtype in tensor_plan(config)}
    assert found == plan


def test_forward_pass_is_numerically_sane(mini_mlx):
    model, tokenizer = load(mini_mlx)
    ids = tokenizer.encode("Flood waters are rising near the shelter. What do we do first?")
    logits = model(mx.array([ids]))
    assert bool(mx.isfinite(logits).all())
    assert 0.3 < float(logits.std()) < 3.0  # weights are N(0, 1/fan_in): unit-scale logits


def test_real_size_preset_has_the_published_parameter_count():
    assert count_parameters(hf_config("gpt-oss-20b"))["total"] == 20_914_757_184


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, mini_hf):
    from relief_mlx.checkpoint.synth import synth

    again = synth("mini", tmp_path / "again", seed=0)
    other = synth("mini", tmp_path / "other", seed=1)
    name = "model-00001-of-00002.safetensors"
    assert (again / name).read_bytes() == (mini_hf / name).read_bytes()
    a, b = mx.load(str(mini_hf / name)), mx.load(str(other / name))
    key = next(k for k in a if k.endswith("q_proj.weight"))
    assert not np.array_equal(np.array(a[key].astype(mx.float32)), np.array(b[key].astype(mx.float32)))
