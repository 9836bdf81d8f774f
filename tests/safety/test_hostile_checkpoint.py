"""Checkpoints from strangers: every hostile file is refused in one line naming the file and the
field, before MLX maps a byte of it; nothing in a model folder is executed; only safetensors are
read. Each reader relief has is tried: a model shard (`load`), a source shard (`convert`), an
adapter, a training checkpoint, config.json, the shard index, the tokenizer files."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from harness import clone, one_line_error, recipe_file, relief

import relief_mlx
from relief_mlx.checkpoint.convert import convert
from relief_mlx.errors import ReliefError
from relief_mlx.model.load import load as load_model
from relief_mlx.model.lora import apply_adapter, remove_adapter
from relief_mlx.recipe import load_recipe
from relief_mlx.train import state, train


def safetensors(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


T = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
DEEP = b"[" * 100_000 + b"]" * 100_000
# name -> bytes of a file that claims to be safetensors (each refused by `read_header`)
HEADERS = {
    "empty file": b"",
    "shorter than its length field": b"\x01\x02\x03",
    "length field 2**63": struct.pack("<Q", 2**63) + b"{}",
    "length field beyond the file": struct.pack("<Q", 1000) + b"{}",
    "length field of zero": struct.pack("<Q", 0) + bytes(16),
    "header not UTF-8": safetensors(b"\xff\xfe\xfd\xfc"),
    "header not JSON": safetensors(b"{tensor: 1}"),
    "header a JSON list": safetensors([T]),
    "header nested 100,000 deep": safetensors(DEEP),
    "tensor entry not an object": safetensors({"t": 5}, bytes(16)),
    "unknown dtype": safetensors({"t": T | {"dtype": "F128"}}, bytes(16)),
    "no dtype": safetensors({"t": {"shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16)),
    "negative dimension": safetensors({"t": T | {"shape": [-2, -2]}}, bytes(16)),
    "shape a string": safetensors({"t": T | {"shape": "2x2"}}, bytes(16)),
    "boolean dimension": safetensors({"t": T | {"shape": [True, 4]}}, bytes(16)),
    "float dimension": safetensors({"t": T | {"shape": [2.0, 2]}}, bytes(16)),
    "no data_offsets": safetensors({"t": {"dtype": "F32", "shape": [2, 2]}}, bytes(16)),
    "three data_offsets": safetensors({"t": T | {"data_offsets": [0, 8, 16]}}, bytes(16)),
    "reversed data_offsets": safetensors({"t": T | {"data_offsets": [16, 0]}}, bytes(16)),
    "negative data_offsets": safetensors({"t": T | {"data_offsets": [-16, 0]}}, bytes(16)),
    "overlapping tensors": safetensors({"a": T, "b": T | {"data_offsets": [8, 24]}}, bytes(24)),
    "a gap between tensors": safetensors({"a": T, "b": T | {"data_offsets": [20, 36]}}, bytes(36)),
    "two tensors on the same bytes": safetensors({"a": T, "b": T}, bytes(16)),
    "offsets past the end of the file": safetensors({"t": T | {"shape": [4, 4], "data_offsets": [0, 64]}},
                                                    bytes(16)),
    "bytes after the last tensor": safetensors({"t": T}, bytes(32)),
    "dtype that lies about the size": safetensors({"t": T | {"dtype": "F16"}}, bytes(16)),
    "shape that lies about the size": safetensors({"t": T | {"shape": [3, 3]}}, bytes(16)),
    "shape whose size overflows 64 bits": safetensors({"t": T | {"shape": [2**62, 2**62]}}, bytes(16)),
    "random bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "all zeros": bytes(4096),
}


def refused(error: ReliefError, file: Path) -> str:
    """The message of a refusal: one line that names `file`."""
    message = str(error)
    assert "\n" not in message and str(file) in message, message
    return message


@pytest.fixture(scope="module")
def model(mini_mlx_f32):
    from relief_mlx.model.load import build_model, read_config, read_weights

    return build_model(read_config(mini_mlx_f32), read_weights(mini_mlx_f32))


@pytest.fixture(scope="module")
def trained(mini_mlx_f32, tiny_data, tmp_path_factory) -> Path:
    """A finished 2-step run with a checkpoint (its adapter was trained on `mini_mlx_f32`)."""
    folder = tmp_path_factory.mktemp("trained")
    recipe = recipe_file(folder, mini_mlx_f32, tiny_data, folder / "run", "train.iterations=2")
    return train(load_recipe(recipe)).run_dir


# ---------------------------------------------------------------- safetensors headers, in every reader


@pytest.mark.parametrize("name", list(HEADERS))
@pytest.mark.survives("hostile checkpoint", "a model shard whose safetensors header lies (relief load, generate)")
def test_a_hostile_model_shard_is_refused_naming_it(name, mini_mlx_f32, tmp_path):
    shard = sorted(mini_mlx_f32.glob("model-*.safetensors"))[-1].name
    folder = clone(mini_mlx_f32, tmp_path / "model", {shard: HEADERS[name]})
    with pytest.raises(ReliefError) as e:
        relief_mlx.load(folder)
    refused(e.value, folder / shard)


@pytest.mark.parametrize("name", list(HEADERS))
@pytest.mark.survives("hostile checkpoint", "a source shard whose safetensors header lies (relief convert)")
def test_a_hostile_source_shard_is_refused_before_anything_is_written(name, mini_hf, tmp_path):
    shard = sorted(mini_hf.glob("model-*.safetensors"))[1].name
    folder = clone(mini_hf, tmp_path / "hf", {shard: HEADERS[name]})
    with pytest.raises(ReliefError) as e:
        convert(folder, tmp_path / "out")
    refused(e.value, folder / shard)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", list(HEADERS))
@pytest.mark.survives("hostile checkpoint", "adapter weights whose safetensors header lies")
def test_hostile_adapter_weights_are_refused_before_the_model_changes(name, model, trained, tmp_path):
    folder = clone(trained, tmp_path / "adapter", {"adapters.safetensors": HEADERS[name]})
    before = len(dict(model.named_modules()))
    with pytest.raises(ReliefError) as e:
        apply_adapter(model, folder)
    refused(e.value, folder / "adapters.safetensors")
    assert remove_adapter(model) == 0 and len(dict(model.named_modules())) == before  # no LoRA layer was added


@pytest.mark.parametrize("name", list(HEADERS))
@pytest.mark.survives("hostile checkpoint", "a training checkpoint's optimizer file whose header lies (no manifest)")
def test_a_hostile_optimizer_file_is_refused_on_resume(name, trained, tmp_path):
    run = tmp_path / "run"
    clone(trained, run, {"checkpoint": None})
    clone(trained / "checkpoint", run / "checkpoint", {"optimizer.safetensors": HEADERS[name],
                                                        "relief-manifest.json": None})  # as an older run wrote it
    with pytest.raises(ReliefError) as e:
        state.read_checkpoint(run)
    refused(e.value, run / "checkpoint" / "optimizer.safetensors")


@pytest.mark.survives("hostile checkpoint", "the refusals above through the command line: one line, exit 1")
def test_the_command_line_prints_a_hostile_shard_as_one_line(mini_mlx_f32, tmp_path):
    shard = sorted(mini_mlx_f32.glob("model-*.safetensors"))[0].name
    folder = clone(mini_mlx_f32, tmp_path / "model", {shard: HEADERS["length field 2**63"]})
    line = one_line_error(relief("generate", "--model", str(folder), "--prompt", "hi", "--max-tokens", "1"))
    assert f"{folder / shard} is not a valid safetensors file: its header length field says" in line, line


# ---------------------------------------------------------------- torn files, found by the manifest


TORN = {
    "optimizer.safetensors cut in half (the regression: a traceback on resume)":
        ("optimizer.safetensors", lambda b: b[: len(b) // 2], "does not match its sha256"),
    "one byte of adapters.safetensors changed (same size, valid header)":
        ("adapters.safetensors", lambda b: b[:-1] + bytes([b[-1] ^ 1]), "does not match its sha256"),
    "state.json cut short": ("state.json", lambda b: b[:10], "does not match its sha256"),
    "state.json removed": ("state.json", lambda b: None, "is missing (listed in"),
    "the manifest cut in half": ("relief-manifest.json", lambda b: b[: len(b) // 2], "is not valid JSON"),
}


@pytest.mark.parametrize("name", list(TORN))
@pytest.mark.survives("torn file", "a torn or changed file of a training checkpoint, found by its checksum manifest")
def test_a_torn_checkpoint_file_is_named_by_the_manifest(name, trained, tmp_path):
    file, tear, expect = TORN[name]
    run = tmp_path / "run"
    clone(trained, run, {"checkpoint": None})
    clone(trained / "checkpoint", run / "checkpoint", {file: tear((trained / "checkpoint" / file).read_bytes())})
    with pytest.raises(ReliefError, match=rf"{re.escape(expect)}.*no complete copy is left to resume from: start "
                                          r"the run over with `relief train .*recipe.toml --overwrite`") as e:
        state.read_checkpoint(run)
    assert "\n" not in str(e.value) and "checkpoint" in str(e.value)


@pytest.mark.survives("torn file", "a damaged checkpoint beside a complete copy left by a crash: the copy is used")
def test_a_damaged_checkpoint_gives_way_to_a_complete_copy_with_a_warning(trained, tmp_path):
    from relief_mlx.errors import ReliefWarning

    run = tmp_path / "run"
    clone(trained, run, {"checkpoint": None})
    clone(trained / "checkpoint", run / "checkpoint",
          {"optimizer.safetensors": (trained / "checkpoint" / "optimizer.safetensors").read_bytes()[:100]})
    clone(trained / "checkpoint", run / f".checkpoint.partial-{_dead_pid()}-x", {})
    with pytest.warns(ReliefWarning, match=r"optimizer.safetensors does not match its sha256 .* took its place"):
        state.recover(run)
    assert state.read_checkpoint(run)[0]["progress"]["step"] == 2


@pytest.mark.survives("torn file", "a truncated shard of a converted model: named on load")
def test_a_truncated_model_shard_is_named(mini_mlx_f32, tmp_path):
    shard = sorted(mini_mlx_f32.glob("model-*.safetensors"))[1]
    folder = clone(mini_mlx_f32, tmp_path / "model", {shard.name: shard.read_bytes()[: shard.stat().st_size // 3]})
    with pytest.raises(ReliefError, match=rf"{folder / shard.name} is truncated \(\d[\d,]* bytes, its header "
                                          r"describes"):
        relief_mlx.load(folder)


def _dead_pid() -> int:
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


# ---------------------------------------------------------------- config.json


def _config(mini: Path, **changes) -> bytes:
    config = json.loads((mini / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key)
        else:
            config[key] = value
    return json.dumps(config).encode()


CONFIGS = {
    "not JSON": lambda m: b"{hidden_size: 128",
    "not UTF-8": lambda m: b"\xff\xfe{}",
    "a JSON list": lambda m: b"[1, 2]",
    "nested 100,000 deep": lambda m: DEEP,
    "model_type llama": lambda m: _config(m, model_type="llama"),
    "no model_type": lambda m: _config(m, model_type=...),
    "hidden_size 0": lambda m: _config(m, hidden_size=0),
    "hidden_size -128": lambda m: _config(m, hidden_size=-128),
    "hidden_size 128.5": lambda m: _config(m, hidden_size=128.5),
    "hidden_size a string": lambda m: _config(m, hidden_size="128"),
    "hidden_size true": lambda m: _config(m, hidden_size=True),
    "no num_hidden_layers": lambda m: _config(m, num_hidden_layers=...),
    "heads not a multiple of the key-value heads": lambda m: _config(m, num_key_value_heads=3),
    "more experts per token than experts": lambda m: _config(m, num_experts_per_tok=64),
    "layer_types of the wrong length": lambda m: _config(m, layer_types=["full_attention"]),
    "an unknown layer type": lambda m: _config(m, layer_types=["cross_attention"] * 4),
    "sliding_window 0": lambda m: _config(m, sliding_window=0),
    "negative rope_theta": lambda m: _config(m, rope_theta=-1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.survives("hostile checkpoint", "a config.json that is not gpt-oss's or whose sizes do not fit (load)")
def test_a_hostile_config_is_refused_on_load_naming_the_field(name, mini_mlx_f32, tmp_path):
    folder = clone(mini_mlx_f32, tmp_path / "model", {"config.json": CONFIGS[name](mini_mlx_f32)})
    with pytest.raises(ReliefError) as e:
        relief_mlx.load(folder)
    refused(e.value, folder / "config.json")


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.survives("hostile checkpoint", "a config.json that is not gpt-oss's or whose sizes do not fit (convert)")
def test_a_hostile_config_is_refused_by_convert_naming_the_field(name, mini_hf, tmp_path):
    folder = clone(mini_hf, tmp_path / "hf", {"config.json": CONFIGS[name](mini_hf)})
    with pytest.raises(ReliefError) as e:
        convert(folder, tmp_path / "out")
    refused(e.value, folder / "config.json")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the shard index


INDEXES = {
    "an absolute path": "/etc/passwd",
    "an absolute path to another model's shard": "/tmp/other/model.safetensors",
    "a path that climbs out with ..": "../other-model/model-00001-of-00002.safetensors",
    "a path that climbs out from a subfolder": "sub/../../model.safetensors",
    "a Windows path": "..\\\\other\\\\model.safetensors",
    "a file that is not safetensors": "config.json",
    "a pickle": "pytorch_model.bin",
}


@pytest.mark.parametrize("name", list(INDEXES))
@pytest.mark.survives("hostile checkpoint", "a shard index naming a file outside the checkpoint folder")
def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(name, mini_hf, tmp_path):
    """Regression: index paths were joined unchecked, so convert read other models' shards (or /etc/passwd)."""
    index = json.loads((mini_hf / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = INDEXES[name]
    folder = clone(mini_hf, tmp_path / "hf", {"model.safetensors.index.json": json.dumps(index).encode()})
    with pytest.raises(ReliefError, match=r"weight_map names the shard .* which is not a .safetensors file inside "):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"not json", b'{"weight_map": ["a"]}', b'{"weight_map": {"t": 5}}',
                                     b'{"weight_map": {}}'], ids=["not JSON", "a list", "not a file name", "empty"])
@pytest.mark.survives("hostile checkpoint", "a shard index that is not a table of tensor -> file")
def test_a_malformed_shard_index_is_refused(content, mini_hf, tmp_path):
    folder = clone(mini_hf, tmp_path / "hf", {"model.safetensors.index.json": content})
    with pytest.raises(ReliefError) as e:
        convert(folder, tmp_path / "out")
    refused(e.value, folder / "model.safetensors.index.json")


# ---------------------------------------------------------------- nothing executed, only safetensors read


MARKER_CODE = "import pathlib; pathlib.Path({marker!r}).write_text('code from the model folder ran')\n"


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (MARKER_CODE.format(marker=self.marker),))


def _booby_trap(folder: Path, marker: Path, auto_map: bool) -> None:
    """Code that would write `marker` if anything imported or unpickled it."""
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    for name in ("modeling_gpt_oss.py", "tokenization_evil.py", "configuration_gpt_oss.py"):
        (folder / name).write_text(MARKER_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_gpt_oss.GptOss", "AutoConfig": "configuration_gpt_oss.C"}
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    if auto_map:
        tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        (folder / "tokenizer_config.json").unlink()
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))


@pytest.mark.survives("hostile checkpoint", "a model folder with a pickle and Python code beside its safetensors")
def test_code_and_pickles_in_a_model_folder_never_run(mini_hf, mini_mlx_f32, tmp_path):
    marker = tmp_path / "ran"
    hf = clone(mini_hf, tmp_path / "hf", {})
    _booby_trap(hf, marker, auto_map=False)
    out = convert(hf, tmp_path / "converted", experts="float32", dtype="float32")
    model = clone(mini_mlx_f32, tmp_path / "model", {})
    _booby_trap(model, marker, auto_map=False)
    loaded, tokenizer = relief_mlx.load(model)  # mlx-lm's tokenizer wrapper too: transformers reads the folder
    assert tokenizer.encode("hi") and not marker.exists()
    assert not (out / "pytorch_model.bin").exists() and not marker.exists()


@pytest.mark.parametrize("command", ["load", "convert"])
@pytest.mark.survives("hostile checkpoint", "tokenizer_config.json naming tokenizer code in the folder (auto_map)")
def test_a_tokenizer_that_asks_for_its_own_code_is_refused(command, mini_hf, mini_mlx_f32, tmp_path):
    marker = tmp_path / "ran"
    folder = clone(mini_hf if command == "convert" else mini_mlx_f32, tmp_path / "m", {})
    _booby_trap(folder, marker, auto_map=True)
    with pytest.raises(ReliefError, match=r"tokenizer_config.json: auto_map names tokenizer code shipped in the "
                                          r"folder; relief never runs code from a model folder"):
        convert(folder, tmp_path / "out") if command == "convert" else relief_mlx.load(folder)
    assert not marker.exists()


TOKENIZERS = {
    "tokenizer.json not JSON": ("tokenizer.json", b"{not json"),
    "tokenizer.json empty": ("tokenizer.json", b""),
    "tokenizer.json a JSON list": ("tokenizer.json", b"[]"),
    "tokenizer.json of another vocabulary": ("tokenizer.json", json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": None, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"a": 0, "<unk>": 1}, "unk_token": "<unk>"}}).encode()),
    "tokenizer_config.json not JSON": ("tokenizer_config.json", b"{"),
    "tokenizer_class a path": ("tokenizer_config.json", b'{"tokenizer_class": "../../evil"}'),
    "chat_template_type a module path": ("tokenizer_config.json", b'{"chat_template_type": "os.path"}'),
}


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.survives("hostile checkpoint", "tokenizer files that are not JSON, not gpt-oss's, or name code (convert)")
def test_convert_refuses_a_tokenizer_it_would_otherwise_copy(name, mini_hf, tmp_path):
    """Regression: convert copied a non-JSON tokenizer.json and exited 0."""
    file, content = TOKENIZERS[name]
    folder = clone(mini_hf, tmp_path / "hf", {file: content})
    with pytest.raises(ReliefError) as e:
        convert(folder, tmp_path / "out")
    refused(e.value, folder / file)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.survives("hostile checkpoint", "tokenizer files that are not JSON, not gpt-oss's, or name code (load)")
def test_load_refuses_a_tokenizer_in_one_line(name, mini_mlx_f32, tmp_path):
    file, content = TOKENIZERS[name]
    folder = clone(mini_mlx_f32, tmp_path / "model", {file: content})
    with pytest.raises(ReliefError) as e:
        load_model(folder, wrapper=False)
    refused(e.value, folder / file) if file == "tokenizer_config.json" else refused(e.value, folder)


# ---------------------------------------------------------------- adapters


def _adapter_config(trained: Path, **changes) -> bytes:
    config = json.loads((trained / "adapter_config.json").read_text())
    for key, value in changes.items():
        target = config["lora_parameters"] if key in ("rank", "scale", "dropout", "keys") else config
        target[key] = value
    return json.dumps(config).encode()


ADAPTER_CONFIGS = {
    "not JSON (the regression: a traceback)": lambda t: b"{num_layers: 4",
    "a JSON list": lambda t: b"[]",
    "no lora_parameters": lambda t: b'{"num_layers": 4}',
    "lora_parameters a list": lambda t: b'{"num_layers": 4, "lora_parameters": [8, 2.0, 0.0]}',
    "rank 10**9": lambda t: _adapter_config(t, rank=10**9),
    "rank 0": lambda t: _adapter_config(t, rank=0),
    "rank a string": lambda t: _adapter_config(t, rank="4"),
    "num_layers 10**6": lambda t: _adapter_config(t, num_layers=10**6),
    "num_layers 0": lambda t: _adapter_config(t, num_layers=0),
    "dropout 1.5": lambda t: _adapter_config(t, dropout=1.5),
    "scale NaN": lambda t: _adapter_config(t, scale=float("nan")),
    "keys a string": lambda t: _adapter_config(t, keys="self_attn.q_proj"),
    "fine_tune_type dora": lambda t: _adapter_config(t, fine_tune_type="dora"),
    "rank 8 for weights of rank 4": lambda t: _adapter_config(t, rank=8),
}


@pytest.mark.parametrize("name", list(ADAPTER_CONFIGS))
@pytest.mark.survives("hostile checkpoint", "an adapter_config.json that is not JSON or does not match the model")
def test_a_hostile_adapter_config_is_refused_naming_the_field(name, model, trained, tmp_path):
    folder = clone(trained, tmp_path / "adapter", {"adapter_config.json": ADAPTER_CONFIGS[name](trained)})
    with pytest.raises(ReliefError) as e:
        apply_adapter(model, folder)
    remove_adapter(model)
    message = str(e.value)
    assert "\n" not in message and ("adapter_config.json" in message or "adapters.safetensors" in message), message


@pytest.mark.survives("hostile checkpoint", "an adapter trained on another base model of the same shapes")
def test_an_adapter_trained_on_another_base_of_the_same_shape_is_refused(trained, mini_mlx_f32, mini_mlx, tmp_path):
    """Regression: it was applied without a word (check base_model and a fingerprint)."""
    from relief_mlx.checkpoint.synth import synth

    other = convert(synth("mini", tmp_path / "other-hf", seed=1), tmp_path / "other", experts="float32",
                    dtype="float32")
    assert (other / "config.json").read_bytes() == (mini_mlx_f32 / "config.json").read_bytes()  # same shapes
    with pytest.raises(ReliefError, match=rf"adapter {trained} was trained on {mini_mlx_f32} \(weights "
                                          rf"[0-9a-f]{{12}}\), not on {other} \(weights [0-9a-f]{{12}}\): same "
                                          r"shapes, other weights"):
        relief_mlx.load(other, adapter=trained)
    load_model(mini_mlx_f32, adapter=trained, wrapper=False)  # its own base: fine
    load_model(mini_mlx, adapter=trained, wrapper=False)  # the same weights converted to MXFP4: fine too


@pytest.mark.survives("hostile checkpoint", "an adapter whose tensors name modules the model does not have")
def test_adapter_tensors_with_no_place_in_the_model_are_refused(model, trained, tmp_path):
    weights = {"model.layers.0.mlp.router.lora_a": mx.zeros((128, 4))}
    folder = tmp_path / "adapter"
    clone(trained, folder, {"adapters.safetensors": None})
    with open(folder / "adapters.safetensors", "wb") as f:
        mx.save_safetensors(f, weights)
    with pytest.raises(ReliefError, match="tensor model.layers.0.mlp.router.lora_a has no place in this model"):
        apply_adapter(model, folder)
    remove_adapter(model)


# ---------------------------------------------------------------- state.json


def _state(trained: Path, **progress) -> bytes:
    saved = json.loads((trained / "checkpoint" / "state.json").read_text())
    saved["progress"] |= progress
    return json.dumps(saved).encode()


STATES = {
    "not JSON": lambda t: b"{",
    "another format": lambda t: json.dumps({"format": "other/1"}).encode(),
    "a negative step (the regression: a traceback)": lambda t: _state(t, step=-3),
    "a step of 2.5": lambda t: _state(t, step=2.5),
    "a step of true": lambda t: _state(t, step=True),
    "an unknown progress field": lambda t: _state(t, rng="seed"),
    "an order naming example 10**9": lambda t: _state(t, order=[[10**9]]),
    "an order that is not a list of lists": lambda t: _state(t, order=[1, 2]),
    "losses not a list": lambda t: _state(t, losses="none"),
}


@pytest.mark.parametrize("name", list(STATES))
@pytest.mark.survives("hostile checkpoint", "a checkpoint state.json that is not JSON or holds impossible progress")
def test_a_hostile_state_json_is_refused_on_resume(name, trained, mini_mlx_f32, tiny_data, tmp_path):
    run = tmp_path / "run"
    clone(trained, run, {"checkpoint": None})
    clone(trained / "checkpoint", run / "checkpoint", {"state.json": STATES[name](trained),
                                                        "relief-manifest.json": None})
    with pytest.raises(ReliefError) as e:
        from relief_mlx.train import resume_recipe

        train(resume_recipe(run), resume=run)
    refused(e.value, run / "checkpoint" / "state.json")


@pytest.mark.survives("hostile checkpoint", "JSON files too large to be configs (a sparse 100 MB config.json)")
def test_a_json_file_too_large_for_its_kind_is_refused_unread(mini_mlx_f32, tmp_path):
    folder = clone(mini_mlx_f32, tmp_path / "model", {"config.json": b""})
    os.truncate(folder / "config.json", 100 * 2**20)
    with pytest.raises(ReliefError, match=r"config.json is 104,857,600 bytes, more than the 67,108,864 a JSON file"):
        relief_mlx.load(folder)
