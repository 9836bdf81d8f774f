"""`relief convert`: faithful, deterministic, atomic, and loud about bad input."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from relief_mlx import load
from relief_mlx.checkpoint.convert import TOKENIZER_FILES, convert, sha256, verify
from relief_mlx.cli import cli


@pytest.mark.parametrize("tokens", [130, 257])
def test_converted_model_matches_a_float_reference_from_the_hf_tensors(mini_hf, mini_mlx, tokens):
    result = verify(mini_hf, mini_mlx, layers=4, tokens=tokens, seed=tokens)
    assert result["layers"] == 4
    assert result["max_relative_error"] < 1e-4  # MXFP4 kernels vs dense float32 of the same values
    assert result["argmax_agreement"] == 1.0


def test_verify_fails_a_conversion_with_gate_and_up_swapped(mini_hf, tmp_path, monkeypatch):
    """Regression: verify built its reference through the converter's own mapping, so a mapping
    bug showed on both sides and passed."""
    from relief_mlx.checkpoint import layout

    real = layout._split_gate_up

    def swapped(prefix, suffix, value, axis):
        parts = real(prefix, suffix, value, axis)
        gate, up = (f"{prefix}.{p}.{suffix}" for p in ("gate_proj", "up_proj"))
        return {gate: parts[up], up: parts[gate]}

    monkeypatch.setattr(layout, "_split_gate_up", swapped)
    code, output = _run("convert", mini_hf, "--out", tmp_path / "swapped", "--verify")
    assert code == 1, output
    error = output.splitlines()[-1]
    assert error.startswith("error: verification failed: the logits of ") and "tolerance 1e-03" in error
    assert "Traceback" not in output


def test_verify_fails_a_transposed_down_projection(mini_hf, mini_mlx_f32, tmp_path):
    broken = shutil.copytree(mini_mlx_f32, tmp_path / "transposed")
    name = "model.layers.1.mlp.experts.down_proj.weight"  # (E, 128, 128) in mini: the shape hides it
    for shard in broken.glob("model*.safetensors"):
        tensors = mx.load(str(shard))
        if name in tensors:
            tensors[name] = tensors[name].swapaxes(-1, -2)
            mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})
    result = verify(mini_hf, broken, layers=2)
    assert not result["ok"] and result["max_relative_error"] > 1e-2
    assert verify(mini_hf, mini_mlx_f32, layers=2)["ok"]


def test_reference_decodes_mxfp4_from_the_table_by_hand():
    from relief_mlx.checkpoint.reference import dequantize_mxfp4

    blocks = np.zeros((1, 1, 1, 16), np.uint8)
    blocks[0, 0, 0, 0] = 0x7 | (0xA << 4)  # element 0: code 7 (6.0); element 1: code 10 (-1.0)
    blocks[0, 0, 0, 15] = 0x1 << 4  # element 31: code 1 (0.5)
    scales = np.array([[[128]]], np.uint8)  # 2 ** (128 - 127)
    want = np.zeros(32, np.float32)
    want[[0, 1, 31]] = [12.0, -2.0, 1.0]
    np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales)[0, 0], want)


def test_same_input_gives_byte_identical_shards(mini_hf, mini_mlx, tmp_path):
    again = convert(mini_hf, tmp_path / "again")
    manifest = json.loads((mini_mlx / "relief-manifest.json").read_text())
    assert manifest["outputs"] == json.loads((again / "relief-manifest.json").read_text())["outputs"]
    for name, digest in manifest["outputs"].items():
        assert (again / name).read_bytes() == (mini_mlx / name).read_bytes()
        assert sha256(mini_mlx / name) == digest
    for name, digest in manifest["inputs"].items():
        assert sha256(mini_hf / name) == digest
    assert manifest["options"] == {"experts": "mxfp4", "dtype": "bfloat16"}


def test_mlx_lm_loads_the_converted_folder_as_it_is(mini_mlx):
    import mlx_lm
    from mlx.utils import tree_map

    model, tokenizer = mlx_lm.load(str(mini_mlx))
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    ours, _ = load(mini_mlx, dtype=mx.float32)
    ids = mx.array([tokenizer.encode("Shelter capacity check")])
    # position 0 only: later positions differ by mlx-lm's YaRN rounding (see tests/model/test_reference.py)
    np.testing.assert_allclose(np.array(model(ids))[:, 0], np.array(ours(ids))[:, 0], rtol=1e-4, atol=1e-4)


def test_transformers_bf16_fine_tune_layout_converts_to_the_same_model(mini_hf, mini_mlx_f32, tmp_path):
    """A fine-tune saved by transformers keeps experts as (E, in, out) bf16; both layouts agree."""
    torch = pytest.importorskip("torch")
    from transformers import GptOssForCausalLM

    saved = tmp_path / "tf-bf16"
    GptOssForCausalLM.from_pretrained(mini_hf, dtype=torch.bfloat16).save_pretrained(saved)
    for f in TOKENIZER_FILES:
        if not (saved / f).exists():
            shutil.copy(mini_hf / f, saved / f)
    converted = convert(saved, tmp_path / "from-bf16", experts="float32", dtype="float32")
    assert json.loads((converted / "relief-manifest.json").read_text())["layout"] == "bf16"
    a, _ = load(converted)
    b, tokenizer = load(mini_mlx_f32)
    ids = mx.array([list(range(1000, 1200))])
    assert np.array_equal(np.array(a(ids)), np.array(b(ids)))


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output.strip()


@pytest.fixture
def broken(mini_hf, tmp_path):
    """A writable copy of the mini checkpoint to damage."""
    return shutil.copytree(mini_hf, tmp_path / "broken")


def _assert_one_line_error(code, output, *words):
    assert code == 1, output
    assert output.startswith("error: ") and "\n" not in output and "Traceback" not in output
    for word in words:
        assert word in output


def test_missing_shard(broken, tmp_path):
    (broken / "model-00001-of-00002.safetensors").unlink()
    _assert_one_line_error(*_run("convert", broken, "--out", tmp_path / "o"), "model-00001-of-00002", "missing")
    assert not (tmp_path / "o").exists()


def test_truncated_shard(broken, tmp_path):
    shard = broken / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    _assert_one_line_error(*_run("convert", broken, "--out", tmp_path / "o"), "truncated", "download it again")


def test_wrong_shape_names_the_tensor(broken, tmp_path):
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] = 256
    (broken / "config.json").write_text(json.dumps(config))
    _assert_one_line_error(*_run("convert", broken, "--out", tmp_path / "o"), "model.embed_tokens.weight", "shape")


def test_unknown_model_type(broken, tmp_path):
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(config))
    _assert_one_line_error(*_run("convert", broken, "--out", tmp_path / "o"), "llama", "gpt_oss")


def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes").mkdir()
    _assert_one_line_error(*_run("convert", tmp_path / "notes", "--out", tmp_path / "o"), "config.json")


def test_existing_output_is_left_untouched(mini_hf, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _assert_one_line_error(*_run("convert", mini_hf, "--out", out), "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_unreachable_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    _assert_one_line_error(*_run("convert", "openai/gpt-oss-20b", "--out", tmp_path / "o"), "openai/gpt-oss-20b", "Hub")


def test_interrupted_conversion_leaves_no_folder(mini_hf, tmp_path, monkeypatch):
    import relief_mlx.checkpoint.convert as conv

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "write_json", fail)  # dies after every shard is written
    with pytest.raises(KeyboardInterrupt):
        convert(mini_hf, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())


def test_peak_memory_stays_near_one_shard(mini_hf, tmp_path):
    shards = [p.stat().st_size for p in mini_hf.glob("*.safetensors")]
    mx.reset_peak_memory()
    convert(mini_hf, tmp_path / "o")
    assert mx.get_peak_memory() < 1.1 * max(shards) < 0.6 * sum(shards)
