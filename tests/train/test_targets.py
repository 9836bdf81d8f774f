"""LoRA targets by pattern, counted from a config alone, applied with mlx-lm's layers."""

from __future__ import annotations

import pytest
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

from relief_mlx.checkpoint.presets import hf_config
from relief_mlx.errors import ReliefError
from relief_mlx.recipe import LoraSection
from relief_mlx.train.targets import apply_lora, count_trainable, lora_summary, trainable_parameters


def test_seed_run_counts_match_the_seed_report():
    config = hf_config("gpt-oss-20b")
    lora = LoraSection(targets=("self_attn.q_proj", "self_attn.v_proj"), rank=8, alpha=16)
    summary = lora_summary(config, _recipe(lora))
    assert summary["trainable"] == 1_990_656
    assert summary["total"] == 20_916_747_840
    assert f"{summary['percent']:.4f}" == "0.0095"


@pytest.mark.parametrize("targets,layers", [
    (("self_attn.q_proj", "self_attn.v_proj"), -1),
    (("self_attn.*",), 2),
    (("mlp.experts.*",), -1),
    (("mlp.router", "self_attn.o_proj"), 1),
])
def test_count_from_config_equals_the_built_model(mini_model, targets, layers):
    model = mini_model
    lora = LoraSection(targets=targets, layers=layers, rank=3)
    apply_lora(model, lora)
    assert count_trainable(model) == trainable_parameters(hf_config("mini"), lora) > 0


def test_experts_get_one_lora_per_expert_even_when_mxfp4(mini_mlx):
    from train_helpers import build

    model = build(mini_mlx)  # MXFP4 experts: QuantizedSwitchLinear
    config = apply_lora(model, LoraSection(targets=("mlp.experts.gate_proj",), rank=2))
    layer = model.layers[0].mlp.experts.gate_proj
    assert isinstance(layer, LoRASwitchLinear)
    assert layer.lora_a.shape == (8, 2, 128)  # (experts, rank, in)
    assert not isinstance(model.layers[0].mlp.router, LoRALinear)  # router untouched
    assert config["lora_parameters"] == {"rank": 2, "scale": 8.0, "dropout": 0.0,
                                         "keys": ["mlp.experts.gate_proj"]}


def test_default_targets_are_the_attention_projections_only(mini_model):
    config = apply_lora(mini_model, LoraSection())
    assert config["lora_parameters"]["keys"] == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    assert config["lora_parameters"]["scale"] == 2.0  # alpha 16 / rank 8, as PEFT


def test_a_pattern_that_matches_nothing_names_it_and_the_choices():
    with pytest.raises(ReliefError, match=r"'self_attn\.qproj' matches no module.*self_attn\.q_proj"):
        trainable_parameters(hf_config("mini"), LoraSection(targets=("self_attn.q_proj", "self_attn.qproj")))


def _recipe(lora):
    from relief_mlx.recipe import ModelSection, Recipe

    return Recipe(model=ModelSection(path="x"), lora=lora)
