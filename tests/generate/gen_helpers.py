"""Helpers of the generation tests: fresh mini models, random LoRA adapters, a scripted
stand-in model that "predicts" an exact token stream, and hand-built Harmony token lists."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

VOCAB = 201_088


def build_mini(path: Path):
    from relief_mlx.model.load import build_model, read_weights

    model = build_model(json.loads((path / "config.json").read_text()), read_weights(path))
    mx.eval(model.parameters())
    return model


def write_random_adapter(model_dir: Path, out: Path, rank: int = 8, seed: int = 0,
                         keys: tuple[str, ...] = ("self_attn.q_proj", "self_attn.v_proj", "mlp.router")) -> Path:
    """An mlx-lm format LoRA adapter for `model_dir` with random A and B (B is zero at init)."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = build_mini(model_dir)
    n_layers = len(model.model.layers)
    lora = {"rank": rank, "scale": 2.0, "dropout": 0.0, "keys": list(keys)}
    model.freeze()
    linear_to_lora_layers(model, n_layers, lora)
    mx.random.seed(seed)
    weights = {k: (mx.random.normal(v.shape) * 0.1 if k.endswith("lora_b") else v)
               for k, v in tree_flatten(model.trainable_parameters())}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": n_layers, "lora_parameters": lora}))
    return out


class _Body:
    def __init__(self, owner: ScriptedModel):
        self.owner = owner

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:  # prefill chunks
        self.owner.fed[-1] += tokens[0].tolist()
        return mx.zeros((1, tokens.shape[1], 1))


class ScriptedModel:
    """Quacks like the gpt-oss Model for the loop: every forward pass 'predicts' the next token
    of `script` (a one-hot logit), then `filler` forever. `fed[i]` holds every token given to
    the model during generation i (prompt first)."""

    def __init__(self, script: list[int], filler: int = 11):
        self.script = list(script)
        self.filler = filler
        self.calls = 0
        self.fed: list[list[int]] = []
        self.model = _Body(self)

    def make_cache(self) -> list:
        self.fed.append([])
        return []

    def lm_head(self, hidden: mx.array) -> mx.array:
        token = self.script[self.calls] if self.calls < len(self.script) else self.filler
        self.calls += 1
        return mx.where(mx.arange(VOCAB) == token, 30.0, 0.0)[None]  # (1, V)

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:  # one token
        self.fed[-1] += tokens[0].tolist()
        return self.lm_head(mx.zeros((1, 1, 1)))[:, None, :]


def harmony_ids(tok, *parts) -> list[int]:
    """Token ids from parts: ints are special ids, strings are encoded as text."""
    out: list[int] = []
    for p in parts:
        out += [p] if isinstance(p, int) else tok.encode(p)
    return out


class BigramModel:
    """Quacks like the gpt-oss Model for one sequence or a batch: each row's next token is
    `table[its current token]` (else `filler`), a one-hot logit. No caches, so any batch works."""

    def __init__(self, table: dict[int, int], filler: int = 11):
        self.table, self.filler = table, filler
        self.model = lambda tokens, cache=None: mx.zeros((*tokens.shape, 1))  # prefill chunks

    def make_cache(self) -> list:
        return []

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:  # (B, 1) -> (B, 1, V)
        following = mx.array([self.table.get(t, self.filler) for t in tokens[:, -1].tolist()])
        return mx.where(mx.arange(VOCAB)[None] == following[:, None], 30.0, 0.0)[:, None, :]


def cycle(tokens: list[int]) -> dict[int, int]:
    """The bigram table that walks `tokens` round and round (each id may appear once)."""
    assert len(set(tokens)) == len(tokens)
    return {a: b for a, b in zip(tokens, tokens[1:] + tokens[:1], strict=True)}
