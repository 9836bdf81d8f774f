"""`relief export --format peft`, proven by PEFT on transformers' checkpoint: the same logits as
relief's base + adapter, attention LoRA and expert LoRA (through `target_parameters`)."""

import json

import pytest
from export_helpers import errors, random_ids, relief_logits

from relief_mlx.export import export

torch = pytest.importorskip("torch")
IDS = random_ids(256)  # past the 128-token sliding window


@pytest.fixture(scope="module")
def hf_model(mini_hf):
    from transformers import GptOssForCausalLM

    return GptOssForCausalLM.from_pretrained(mini_hf, dtype=torch.float32)


@pytest.mark.parametrize("which", ["qv_adapter", "expert_adapter"])
def test_peft_model_computes_base_plus_adapter(which, request, mini_mlx, mini_hf, hf_model, tmp_path):
    from peft import PeftModel

    adapter = request.getfixturevalue(which)
    result = export(mini_mlx, tmp_path / "peft", "peft", adapter=adapter)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(mini_hf.resolve())
    assert config["lora_alpha"] / config["r"] == 2.0  # mlx-lm's scale = alpha / rank = 8 / 4
    model = PeftModel.from_pretrained(hf_model, tmp_path / "peft", adapter_name="relief")
    incompatible = model.load_adapter(tmp_path / "peft", adapter_name="again")  # the same file, checked
    assert not incompatible.unexpected_keys and not [k for k in incompatible.missing_keys if "lora_" in k]
    model.set_adapter("relief")
    with torch.no_grad():
        got = model(torch.tensor([IDS])).logits.numpy()
    assert errors(got, relief_logits(mini_mlx, IDS, adapter)).max() < 1e-4
    if which == "expert_adapter":
        assert result["target_parameters"] == 4  # gate_up_proj and down_proj of layers 2 and 3
        assert config["rank_pattern"] == {f"model.layers.{i}.mlp.experts.gate_up_proj": 8 for i in (2, 3)}
        # PEFT 0.21 warns these keys "matched no targeted module" (it checks them against modules
        # only) but builds gate_up_proj's LoRA with them: rank 8 = gate's 4 + up's 4
        experts = model.base_model.model.model.layers[2].mlp.experts
        assert experts.base_layer.parameter_name == "gate_up_proj" and experts.base_layer.r["relief"] == 8
        assert experts.parameter_name == "down_proj" and experts.r["relief"] == 4
    model.unload()
