"""`relief export --format hf`, proven by transformers (torch, CPU): the exported checkpoint gives
relief's base + adapter logits, with MXFP4 experts kept where untouched and dense where touched."""

import json

import mlx.core as mx
import numpy as np
import pytest
from export_helpers import errors, random_ids, relief_logits

from relief_mlx.export import export

torch = pytest.importorskip("torch")
IDS = random_ids(256)  # past the 128-token sliding window


def _transformers_logits(folder, ids=IDS):
    from transformers import GptOssForCausalLM

    model, info = GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()


def _hf_tensors(folder) -> dict[str, mx.array]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in mx.load(str(f)).items()}


@pytest.mark.slow
def test_mixed_mxfp4_and_dense_experts_load_in_transformers(mini_hf, mini_mlx, expert_adapter, tmp_path):
    """Expert LoRA on layers 2-3: those experts are dense (float32 merge: exact), 0-1 stay MXFP4."""
    out = tmp_path / "hf"
    result = export(mini_mlx, out, "hf", adapter=expert_adapter, dtype="float32")
    assert result["mxfp4_expert_layers"] == [0, 1] and result["dense_expert_layers"] == [2, 3]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["modules_to_not_convert"][-2:] == ["model.layers.2.mlp.experts",
                                                                           "model.layers.3.mlp.experts"]
    want = relief_logits(mini_mlx, IDS, expert_adapter)
    assert errors(_transformers_logits(out), want).max() < 1e-4
    exported, source = _hf_tensors(out), _hf_tensors(mini_hf)
    for leaf in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"):
        name = f"model.layers.1.mlp.experts.{leaf}"  # untouched: the very bytes that came in
        assert np.array_equal(np.array(exported[name]), np.array(source[name]))
    assert exported["model.layers.3.mlp.experts.down_proj"].shape == (8, 128, 128)


@pytest.mark.slow
def test_attention_only_adapter_keeps_every_expert_mxfp4(mini_hf, mini_mlx, qv_adapter, tmp_path):
    """Default dtype: q/v merged in bf16 (the checkpoint's dtype), within the bf16 tolerance."""
    out = tmp_path / "hf"
    result = export(mini_mlx, out, "hf", adapter=qv_adapter)
    assert result["mxfp4_expert_layers"] == [0, 1, 2, 3]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["modules_to_not_convert"] == json.loads(
        (mini_hf / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "README.md"):
        assert (out / name).is_file()
    e = errors(_transformers_logits(out), relief_logits(mini_mlx, IDS, qv_adapter))
    assert np.median(e) < 0.1  # fuse.TOLERANCE for bf16 merges


def test_a_fused_model_exports_without_an_adapter(mini_mlx, mini_mlx_f32, tmp_path):
    """A model with no adapter maps back to the very tensors of the HF checkpoint (mini_mlx_f32's
    experts are dense: written in transformers' (E, in, out) layout, no quantization_config)."""
    result = export(mini_mlx_f32, tmp_path / "hf", "hf")
    assert result["merged"] == [] and result["mxfp4_expert_layers"] == []
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    exported = _hf_tensors(tmp_path / "hf")
    assert exported["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 128, 256)
    assert errors(_transformers_logits(tmp_path / "hf", IDS[:130]), relief_logits(mini_mlx_f32, IDS[:130])).max() < 1e-4
