"""Live `relief serve` processes on loopback for the server and page tests, and the checkpoints they serve.

`scripted_mlx` is the float32 mini checkpoint turned into a bigram model whose greedy answer is a
known Harmony message (`<|channel|>final<|message|>Hello world, stay safe.<|return|>`): attention
and expert outputs are zeroed, so the last hidden state is the current token's normalized
embedding, and lm_head rows point each scripted token at its successor. It lets tests check
content and stops end to end (a bigram chain cannot hold two messages: `<|message|>` would need two
successors; test_scheduler.py checks the analysis channel); the random `mini_mlx_f32` checks token
identity.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import openai
import pytest
from serve_helpers import KEY, Server, script_tokens

from relief_mlx.data.harmony import HarmonyTokenizer


@pytest.fixture(scope="session")
def scripted_mlx(mini_mlx_f32, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "scripted"
    shutil.copytree(mini_mlx_f32, out, ignore=shutil.ignore_patterns("model*.safetensors*"))
    weights = {}
    for f in sorted(Path(mini_mlx_f32).glob("model*.safetensors")):
        weights |= mx.load(str(f))
    for name in weights:
        if name.endswith(("self_attn.o_proj.weight", "self_attn.o_proj.bias", "experts.down_proj.weight",
                          "experts.down_proj.bias")):
            weights[name] = mx.zeros_like(weights[name])
    tok = HarmonyTokenizer.from_dir(out)
    chain = [tok.encode("assistant")[-1], *script_tokens(tok)]
    embed, norm = weights["model.embed_tokens.weight"], weights["model.norm.weight"]
    hidden = embed * mx.rsqrt(mx.mean(embed * embed, axis=-1, keepdims=True) + 1e-5) * norm  # (V, D)
    head = mx.zeros_like(weights["lm_head.weight"])
    for current, following in zip(chain, chain[1:], strict=False):
        h = hidden[current]
        head[following] = head[following] + 40 * h / mx.sum(h * h)  # logit 40 for the successor
    weights["lm_head.weight"] = head
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="session")
def scripted_adapter(scripted_mlx, tmp_path_factory) -> Path:
    """A random LoRA on o_proj (zero in the scripted model), so answers through it differ."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from relief_mlx.model.load import load_model

    model, _ = load_model(scripted_mlx)
    lora = {"rank": 4, "scale": 4.0, "dropout": 0.0, "keys": ["self_attn.o_proj"]}
    model.freeze()
    linear_to_lora_layers(model, len(model.model.layers), lora)
    mx.random.seed(1)
    weights = {k: mx.random.normal(v.shape) for k, v in tree_flatten(model.trainable_parameters())}
    out = tmp_path_factory.mktemp("adapter") / "scramble"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": len(model.model.layers), "lora_parameters": lora}))
    return out


@pytest.fixture(scope="session")
def scripted_server(scripted_mlx, scripted_adapter, tmp_path_factory):
    """The scripted model with an API key and one adapter ("scramble")."""
    log = tmp_path_factory.mktemp("serve") / "scripted.log"
    server = Server(["--model", str(scripted_mlx), "--adapter", f"scramble={scripted_adapter}", "--api-key", KEY,
                     "--max-tokens-limit", "256", "--max-batch", "4"], log)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mini_server(mini_mlx_f32, tmp_path_factory):
    """The random float32 mini model, no key: long, arbitrary token streams."""
    log = tmp_path_factory.mktemp("serve") / "mini.log"
    server = Server(["--model", str(mini_mlx_f32), "--max-batch", "8"], log)
    yield server
    server.stop()


@pytest.fixture
def client(scripted_server):
    return openai.OpenAI(base_url=scripted_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
