"""Adapters on the mini checkpoints for the export tests: LoRA with random, nonzero B (a fresh
LoRA has B = 0 and would change nothing), q/v-only and with every expert projection."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

QV = ("self_attn.q_proj", "self_attn.v_proj")
EXPERTS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.experts.*")


def write_adapter(model_dir: Path, out: Path, targets: tuple[str, ...], rank: int = 4, alpha: float = 8.0,
                  layers: int = -1, seed: int = 0, b_std: float = 0.05) -> Path:
    """An adapter in relief's format (what `relief train` writes), B ~ N(0, b_std^2): the delta is
    then a few percent of the weights, like a trained adapter's."""
    from relief_mlx.model.load import build_model, read_weights
    from relief_mlx.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from relief_mlx.recipe import LoraSection
    from relief_mlx.train.targets import apply_lora

    model = build_model(json.loads((model_dir / "config.json").read_text()), read_weights(model_dir), mx.float32)
    mx.random.seed(seed)
    config = apply_lora(model, LoraSection(targets=targets, rank=rank, alpha=alpha, layers=layers))
    weights = {k: mx.random.normal(v.shape) * b_std if k.endswith("lora_b") else v
               for k, v in tree_flatten(model.trainable_parameters())}
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / ADAPTER_WEIGHTS), weights)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def random_ids(n: int, seed: int = 0) -> list[int]:
    """Ordinary (non-special) token ids."""
    import numpy as np

    return [int(i) for i in np.random.default_rng(seed).integers(0, 200_000, size=n)]


def relief_logits(model_dir: Path, ids: list[int], adapter: Path | None = None, truncate_yarn: bool = False):
    """relief's float32 logits (1, L, V) of `ids`; `truncate_yarn` rounds YaRN's correction range
    as llama.cpp and mlx-lm do (gpt-oss's config says not to)."""
    from relief_mlx.model.load import build_model, read_weights
    from relief_mlx.model.lora import apply_adapter

    config = json.loads((model_dir / "config.json").read_text())
    if truncate_yarn:
        config["rope_scaling"] = config["rope_scaling"] | {"truncate": True}
    model = build_model(config, read_weights(model_dir), mx.float32)
    if adapter is not None:
        apply_adapter(model, adapter)
    logits = model(mx.array([ids]))
    mx.eval(logits)
    return logits


def errors(got, want):
    """Relative logit error at each position: max |got - want| / max |want|."""
    import numpy as np

    got, want = np.asarray(got, dtype=np.float32).reshape(-1, np.shape(want)[-1]), np.asarray(want).reshape(
        -1, np.shape(want)[-1])
    return np.abs(got - want).max(-1) / np.abs(want).max(-1)
