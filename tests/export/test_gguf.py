"""`relief export --format gguf`, proven by real llama.cpp (llama-cpp-python, test extra).

llama.cpp rounds YaRN's correction range (as mlx-lm does; gpt-oss's config says `truncate: false`),
so its logits are compared with relief's model under the same rounding: that isolates the export.
In float32 they agree to ~1e-5 and greedy decoding is identical; with MXFP4 experts llama.cpp
quantizes the activations to 8 bits (Q8_0) for the expert matmuls and to bf16 for bf16 weights,
so there agreement is reported as argmax agreement and a looser tolerance.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from export_helpers import errors, random_ids, relief_logits

from relief_mlx.export import export
from relief_mlx.export.gguf import GGUF_NAME, MODELFILE

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
IDS = random_ids(300)  # past the 128-token sliding window


def _llama(path):
    # float32 K/V cache (llama.cpp's default is f16), every position's logits kept
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True,
                           n_threads=2, type_k=0, type_v=0, verbose=False)


def _llama_logits(llm, ids=IDS) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)])


def _llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def _relief_greedy(model_dir, adapter, prompt: list[int], n: int) -> list[int]:
    from relief_mlx.generate.loop import generate_tokens
    from relief_mlx.model.load import build_model, read_weights
    from relief_mlx.model.lora import apply_adapter

    config = json.loads((model_dir / "config.json").read_text())
    config["rope_scaling"] = config["rope_scaling"] | {"truncate": True}  # llama.cpp's YaRN
    model = build_model(config, read_weights(model_dir), mx.float32)
    apply_adapter(model, adapter)
    return [step.token for step in generate_tokens(model, prompt, max_tokens=n)]


@pytest.fixture(scope="module")
def f32_gguf(mini_mlx_f32, expert_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "f32"
    return out, export(mini_mlx_f32, out, "gguf", adapter=expert_adapter)


@pytest.mark.slow
def test_float32_gguf_matches_relief_in_llama_cpp(mini_mlx_f32, expert_adapter, f32_gguf):
    out, result = f32_gguf
    assert result["tensor_types"] == {"float32": 79}
    llm = _llama(out / GGUF_NAME)
    got = _llama_logits(llm)
    assert errors(got, relief_logits(mini_mlx_f32, IDS, expert_adapter, truncate_yarn=True)).max() < 1e-4
    # against relief's faithful YaRN the rounding shows from ~position 8 on (README: measured agreement)
    faithful = np.asarray(relief_logits(mini_mlx_f32, IDS, expert_adapter))[0]
    assert (got.argmax(-1) == faithful.argmax(-1)).mean() > 0.8
    prompt = IDS[:150]
    assert _llama_greedy(llm, prompt, 64) == _relief_greedy(mini_mlx_f32, expert_adapter, prompt, 64)


@pytest.mark.slow
def test_mxfp4_gguf_keeps_untouched_experts_and_runs_in_llama_cpp(mini_mlx, expert_adapter, tmp_path):
    out = tmp_path / "mxfp4"
    result = export(mini_mlx, out, "gguf", adapter=expert_adapter)
    assert result["tensor_types"]["MXFP4"] == 6  # gate, up, down of the untouched layers 0 and 1
    reader = gguf.GGUFReader(out / GGUF_NAME)
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.3.ffn_down_exps.weight"].tensor_type == gguf.GGMLQuantizationType.BF16  # touched
    # the MXFP4 bytes, decoded by gguf-py's own MXFP4 reference, are exactly the base model's experts
    base = {k: v for f in sorted(mini_mlx.glob("model*.safetensors")) for k, v in mx.load(str(f)).items()}
    for layer, proj, name in [(0, "gate_proj", "ffn_gate_exps"), (1, "down_proj", "ffn_down_exps")]:
        t = tensors[f"blk.{layer}.{name}.weight"]
        module = f"model.layers.{layer}.mlp.experts.{proj}"
        want = mx.dequantize(base[f"{module}.weight"], base[f"{module}.scales"], group_size=32, bits=4, mode="mxfp4",
                             dtype=mx.float32)
        assert t.tensor_type == gguf.GGMLQuantizationType.MXFP4
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape), np.array(want))
    llm = _llama(out / GGUF_NAME)
    got = _llama_logits(llm)
    want = np.asarray(relief_logits(mini_mlx, IDS, expert_adapter, truncate_yarn=True))[0]
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.75  # measured 0.87: 8-bit activations, bf16 merge
    assert np.median(errors(got, want)) < 0.1  # measured 0.035


def test_tokenizer_chat_template_and_modelfile(mini_mlx, f32_gguf, harmony_tokenizer):
    out, _ = f32_gguf
    llm = llama_cpp.Llama(model_path=str(out / GGUF_NAME), vocab_only=True, verbose=False)
    text = "Shelter for 1,500 people: 3.5 m² each — ¿dónde? 東京 🚑\n\tok"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == harmony_tokenizer.encode(text)
    harmony = "<|start|>user<|message|>Water per person?<|end|><|start|>assistant"
    start, message, end = 200006, 200008, 200007  # Harmony's special ids
    want = [start, *harmony_tokenizer.encode("user"), message, *harmony_tokenizer.encode("Water per person?"), end,
            start, *harmony_tokenizer.encode("assistant")]
    assert llm.tokenize(harmony.encode(), add_bos=False, special=True) == want
    assert llm.metadata["tokenizer.chat_template"] == (mini_mlx / "chat_template.jinja").read_text()
    assert llm.metadata["general.architecture"] == "gpt-oss"
    modelfile = (out / MODELFILE).read_text()
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "<|return|>"' in modelfile
    assert "<|start|>assistant" in modelfile and (out / "README.md").is_file()


def test_a_gguf_file_out_writes_the_file_and_its_companions_beside_it(mini_mlx_f32, qv_adapter, tmp_path):
    """`relief export --format gguf --out FILE.gguf` (the issue's form) into a folder that already
    holds other files: the GGUF loads in llama.cpp, and its Modelfile, card and manifest sit beside
    it named after its stem; nothing else in the folder is touched, and a second run is refused."""
    from click.testing import CliRunner

    from relief_mlx.cli import cli
    from relief_mlx.io import sha256

    (tmp_path / "README.md").write_text("someone else's\n")
    out = tmp_path / "relief.gguf"
    args = ["export", "--model", str(mini_mlx_f32), "--adapter", str(qv_adapter), "--format", "gguf",
            "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "relief.Modelfile", "relief.gguf", "relief.manifest.json", "relief.md"]
    assert (tmp_path / "README.md").read_text() == "someone else's\n"
    assert "FROM ./relief.gguf" in (tmp_path / "relief.Modelfile").read_text()
    assert "llama-cli -m " + str(out) in (tmp_path / "relief.md").read_text()
    manifest = json.loads((tmp_path / "relief.manifest.json").read_text())["outputs"]
    assert manifest == {name: sha256(tmp_path / name) for name in ("relief.Modelfile", "relief.gguf", "relief.md")}
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False)
    assert llm.n_vocab() == 201_088
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "already exists" in again.output and "--overwrite" in again.output
