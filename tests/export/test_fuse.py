"""`relief fuse`: the fused model computes what base + adapter computes; MXFP4 experts the adapter
touches are dequantized (exactly those), kept as an adapter, or re-quantized only on request."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from export_helpers import errors, random_ids, relief_logits

import relief_mlx
from relief_mlx.errors import ReliefError
from relief_mlx.export.fuse import TOLERANCE, fuse
from relief_mlx.io import MANIFEST, sha256

IDS = random_ids(256)  # past the 128-token sliding window


@pytest.fixture(scope="module")
def fused(mini_mlx, expert_adapter, tmp_path_factory):
    """`mini_mlx` + the expert adapter, fused with float32 merges (an exact merge: a tight check)."""
    return fuse(mini_mlx, expert_adapter, tmp_path_factory.mktemp("fused") / "f32", dtype="float32")


def _safetensors(folder) -> dict[str, mx.array]:
    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in mx.load(str(f)).items()}


def test_fused_model_computes_base_plus_adapter(mini_mlx, expert_adapter, fused):
    out = fused["out"]
    want = relief_logits(mini_mlx, IDS, expert_adapter)
    got = relief_logits(Path(out), IDS)
    assert errors(got, want).max() < 1e-4
    assert errors(relief_logits(mini_mlx, IDS), want).max() > 0.1  # the adapter does change the model
    assert fused["check"]["median_relative_error"] < TOLERANCE[mx.float32]


def test_exactly_the_touched_experts_are_dequantized(mini_mlx, fused):
    """Layers 2-3 carry expert LoRA: their experts become dense; layers 0-1 keep MXFP4 bit for bit."""
    base, out = _safetensors(mini_mlx), _safetensors(Path(fused["out"]))
    config = json.loads((Path(fused["out"]) / "config.json").read_text())
    for layer in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            if layer < 2:
                assert np.array_equal(np.array(out[f"{name}.weight"]), np.array(base[f"{name}.weight"]))
                assert np.array_equal(np.array(out[f"{name}.scales"]), np.array(base[f"{name}.scales"]))
                assert name not in config["quantization"]
            else:
                assert out[f"{name}.weight"].dtype == mx.float32 and f"{name}.scales" not in out
                assert config["quantization"][name] is False
    kinds = {(m["module"].split(".")[2], m["kind"]) for m in fused["merged"] if ".mlp.experts." in m["module"]}
    assert kinds == {("2", "dequantized"), ("3", "dequantized")}


def test_mlx_lm_and_relief_load_the_mixed_folder(fused):
    import mlx_lm
    from mlx.utils import tree_map
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    out = fused["out"]
    theirs, tokenizer = mlx_lm.load(out)
    ours, _ = relief_mlx.load(out, dtype=mx.float32)
    for model in (theirs, ours):
        assert isinstance(model.model.layers[0].mlp.experts.gate_proj, QuantizedSwitchLinear)
        assert type(model.model.layers[3].mlp.experts.gate_proj) is SwitchLinear
    theirs.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                           theirs.parameters()))
    ids = mx.array([tokenizer.encode("Shelter capacity check")])
    # position 0 only: later positions differ by mlx-lm's YaRN rounding (tests/model/test_reference.py)
    np.testing.assert_allclose(np.array(theirs(ids))[:, 0], np.array(ours(ids))[:, 0], rtol=1e-4, atol=1e-4)


def test_card_and_manifest(fused):
    out = Path(fused["out"])
    card = (out / "README.md").read_text()
    assert "## Base model" in card and "Not a substitute for trained responders" in card
    assert "dequantized: 6 modules (float32)" in card
    manifest = json.loads((out / MANIFEST).read_text())
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert sorted(manifest["outputs"]) == files
    assert all(sha256(out / f) == digest for f, digest in manifest["outputs"].items())


def test_bf16_merge_stays_within_its_stated_tolerance(mini_mlx, qv_adapter, tmp_path):
    result = fuse(mini_mlx, qv_adapter, tmp_path / "bf16")
    assert {m["dtype"] for m in result["merged"]} == {"bfloat16"}
    assert result["tolerance"] == TOLERANCE[mx.bfloat16]
    want = relief_logits(mini_mlx, IDS, qv_adapter)
    e = errors(relief_logits(tmp_path / "bf16", IDS), want)
    assert 1e-4 < np.median(e) < TOLERANCE[mx.bfloat16]  # one bf16 rounding of W + delta: not exact, close
    assert max(m["delta_error"] for m in result["merged"]) < 0.05


def test_keep_adapter_for_experts(mini_mlx, expert_adapter, tmp_path):
    """Attention is fused, the MXFP4 experts stay untouched and their LoRA stays an adapter."""
    out = tmp_path / "kept"
    result = fuse(mini_mlx, expert_adapter, out, quantized="keep-adapter", dtype="float32")
    assert _safetensors(out).keys() == _safetensors(mini_mlx).keys()
    kept = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert kept["lora_parameters"]["keys"] == ["mlp.experts.down_proj", "mlp.experts.gate_proj", "mlp.experts.up_proj"]
    want = relief_logits(mini_mlx, IDS, expert_adapter)
    assert errors(relief_logits(out, IDS, out / "adapter"), want).max() < 1e-4
    assert result["kept_adapter"] == "adapter"


def test_requantizing_touched_experts_is_refused_without_accepting_the_loss(mini_mlx, expert_adapter, tmp_path):
    with pytest.raises(ReliefError, match=r"relative error of \d+\.\d\d on average.*--accept-requantize-loss"):
        fuse(mini_mlx, expert_adapter, tmp_path / "rq", quantized="requantize")
    assert not (tmp_path / "rq").exists() and not list(tmp_path.iterdir())
    result = fuse(mini_mlx, expert_adapter, tmp_path / "rq", quantized="requantize", accept_requantize_loss=True)
    loss = result["requantize_loss"]
    assert loss["modules"] == 6 and loss["delta_error"] > 0.1  # measured 0.81 with this adapter
    assert any("re-quantized with the loss accepted" in note for note in result["notes"])


def test_a_lost_delta_is_caught_and_nothing_is_written(mini_mlx, qv_adapter, tmp_path, monkeypatch):
    """mlx-lm #1172's failure (the fused model is the base model) must not pass the check."""
    from relief_mlx.export import fuse as module

    monkeypatch.setattr(module.Adapter, "delta", lambda self, name: mx.zeros((1,)))
    with pytest.raises(ReliefError, match="differ from"):
        fuse(mini_mlx, qv_adapter, tmp_path / "lost", dtype="float32")
    assert not list(tmp_path.iterdir())
