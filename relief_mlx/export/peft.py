"""`relief export --format peft`: the adapter as PEFT writes one (`adapter_model.safetensors` +
`adapter_config.json`), for `PeftModel.from_pretrained` on the Hugging Face checkpoint.

Attention LoRA maps one to one: PEFT's `lora_A.weight` (r, in) is mlx-lm's `lora_a` (in, r)
transposed, `lora_B.weight` (out, r) is `lora_b` (r, out) transposed, and PEFT's scaling
`lora_alpha / r` is mlx-lm's `scale`, so `lora_alpha = scale * r`.

Expert LoRA goes through PEFT's `target_parameters` (its `ParamWrapper`, peft >= 0.17): a LoRA
per expert on transformers' 3-D `gate_up_proj` (E, H, 2I) and `down_proj` (E, I, H), stored as
`lora_A.weight` (r * E, in) with expert e's rows at e*r..e*r+r-1, and `lora_B.weight` (out, r * E)
with expert e's rank k in column k*E + e. MLX trains gate and up apart; on the interleaved
`gate_up_proj` they are one LoRA of rank 2r (A stacked, B block-diagonal on the even/odd rows),
given its own rank and alpha in `rank_pattern`/`alpha_pattern`. Two wrapped parameters of one
experts module nest: gate_up_proj's wrapper is the inner one (`experts.base_layer.lora_A`).
A LoRA on the router (a bare parameter pair in transformers) has no PEFT form here: refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from ..errors import ReliefError
from ..io import MANIFEST, write_json
from .fuse import Adapter

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _expert_factors(a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
    """Per-expert A (E, R, in) and B (E, out, R) -> PEFT's lora_A (R*E, in) and lora_B (out, R*E)."""
    e, r, n_in = a.shape
    return a.reshape(e * r, n_in), b.transpose(1, 2, 0).reshape(b.shape[1], r * e)


def _gate_up(gate: tuple[mx.array, mx.array] | None, up: tuple[mx.array, mx.array] | None) -> tuple[mx.array, mx.array]:
    """gate_proj and up_proj LoRAs -> one LoRA of gate_up_proj (rows interleaved: 2j gate, 2j+1 up),
    A (E, R, H) and B (E, 2I, R), R = r per projection present."""
    parts = [(p, row) for p, row in ((gate, 0), (up, 1)) if p is not None]
    e, r, _ = parts[0][0][0].shape
    i = parts[0][0][1].shape[1]
    a = mx.concatenate([p[0] for p, _ in parts], axis=1)
    b = mx.zeros((e, 2 * i, r * len(parts)), dtype=parts[0][0][1].dtype)
    for k, (p, row) in enumerate(parts):
        b[:, row::2, k * r:(k + 1) * r] = p[1]
    return a, b


def peft_tensors(adapter: Adapter) -> tuple[dict[str, mx.array], dict]:
    """PEFT's tensors and the config entries that locate them: target_modules, target_parameters,
    rank_pattern."""
    tensors, modules, parameters, ranks = {}, [], [], {}
    experts: dict[str, dict[str, tuple[mx.array, mx.array]]] = {}
    for module, (a, b) in sorted(adapter.lora.items()):
        if module.endswith(".mlp.router"):
            raise ReliefError(f"{adapter.path}: the LoRA on {module} has no PEFT form (transformers' router is "
                              "not a Linear); use --format hf, which merges it")
        if a.ndim == 3:
            prefix, proj = module.rsplit(".", 1)
            experts.setdefault(prefix, {})[proj] = (a, b)
            continue
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.T
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.T
        modules.append(module)
    for prefix, projs in experts.items():
        wrapped = []  # in PEFT's nesting order: gate_up_proj (inner) first
        if "gate_proj" in projs or "up_proj" in projs:
            wrapped.append(("gate_up_proj", _gate_up(projs.get("gate_proj"), projs.get("up_proj"))))
        if "down_proj" in projs:
            wrapped.append(("down_proj", projs["down_proj"]))
        for depth, (param, (a, b)) in enumerate(wrapped):
            where = f"{PREFIX}{prefix}" + ".base_layer" * (len(wrapped) - 1 - depth)
            tensors[f"{where}.lora_A.weight"], tensors[f"{where}.lora_B.weight"] = _expert_factors(a, b)
            parameters.append(f"{prefix}.{param}")
            if a.shape[1] != adapter.rank:
                ranks[f"{prefix}.{param}"] = a.shape[1]
    return tensors, {"target_modules": modules, "target_parameters": parameters or None, "rank_pattern": ranks}


def _base_name(base: Path) -> str | None:
    """The Hugging Face checkpoint the MLX base was converted from (its manifest's source)."""
    manifest = base / MANIFEST
    return json.loads(manifest.read_text()).get("source") if manifest.is_file() else None


def export_peft(tmp: Path, base: Path, adapter: Adapter | None) -> dict:
    """Write the PEFT adapter into `tmp`."""
    if adapter is None:
        raise ReliefError("--format peft writes an adapter: pass --adapter (a fused model has none left to export)")
    tensors, targets = peft_tensors(adapter)
    mx.save_safetensors(str(tmp / WEIGHTS), tensors, metadata={"format": "pt"})
    dropout = adapter.config.get("lora_parameters", {}).get("dropout", 0.0)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _base_name(base),
        "r": adapter.rank,
        "lora_alpha": adapter.scale * adapter.rank,  # PEFT scales by lora_alpha / r; mlx-lm by `scale`
        "rank_pattern": targets["rank_pattern"],
        "alpha_pattern": {k: adapter.scale * r for k, r in targets["rank_pattern"].items()},
        "lora_dropout": 0.0 if targets["target_parameters"] else dropout,  # PEFT's ParamWrapper takes none
        "target_modules": targets["target_modules"],
        "target_parameters": targets["target_parameters"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    write_json(tmp / CONFIG, config)
    return {"base_model_name_or_path": config["base_model_name_or_path"], "tensors": len(tensors),
            "target_modules": len(targets["target_modules"]),
            "target_parameters": len(targets["target_parameters"] or [])}
