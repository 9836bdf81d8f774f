"""Convert a Hugging Face gpt-oss checkpoint to an MLX checkpoint folder, shard by shard.

Reads: `config.json`, `*.safetensors` (published MXFP4 layout, or a bf16 fine-tune saved by
transformers, whose experts are `(E, in, out)`), tokenizer files.
Writes (atomically, all or nothing): `config.json` with MLX's `quantization` entry when the
experts stay MXFP4, `model-0000K-of-0000N.safetensors` in mlx-lm's names (`gate_proj`,
`up_proj`, `down_proj` split from the interleaved `gate_up_proj`: row 2j is gate j, row
2j+1 is up j), the tokenizer files, and `relief-manifest.json` (source, revision, sha256 of
every input and output shard, options, versions). `mlx_lm.load` reads the result as it is.

Each output shard holds what one input shard held, so peak memory is about one shard. The
tensor mapping is `layout.hf_to_mlx`; `relief export` writes back with its inverse.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from .. import choices, hub
from ..errors import ReliefError
from ..io import MANIFEST, atomic_dir, sha256, write_json, write_manifest
from .layout import DTYPES, hf_to_mlx, mlx_config
from .presets import tensor_plan
from .safetensors_header import read_header

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
Progress = Callable[[int, int, str], None]
"""`progress(done, total, item)` of long work (convert, synth, a bench's model build): the CLI draws a bar."""


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise ReliefError(f"{path} is not a checkpoint folder: it has no config.json")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ReliefError(f"{file} is not valid JSON (line {e.lineno}); download it again") from e
    if config.get("model_type") != "gpt_oss":
        raise ReliefError(f"{file} has model_type {config.get('model_type')!r}; "
                          "relief-mlx converts only 'gpt_oss' checkpoints")
    return normalize_rope(config)


def normalize_rope(config: dict) -> dict:
    """transformers >= 5 saves `rope_parameters` (with rope_theta inside) where the published
    config has `rope_scaling` and `rope_theta`; mlx-lm reads only the latter, and without them
    the model would silently run with no YaRN."""
    if "rope_parameters" not in config:
        return config
    config = dict(config)
    params = dict(config.pop("rope_parameters"))
    config["rope_theta"] = params.pop("rope_theta", config.get("rope_theta"))
    if params.get("rope_type", "default") != "default":
        config["rope_scaling"] = params
    return config


def source_shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ReliefError(f"{path} holds no *.safetensors files; is it a checkpoint folder?")
    return shards


def expected_tensors(config: dict, layout: str) -> dict[str, tuple[int, ...]]:
    """name -> shape of every source tensor, in the MXFP4 layout or transformers' bf16 layout."""
    expected = {}
    for name, shape, _ in tensor_plan(config):
        if layout == "bf16" and name.endswith(("_blocks", "_scales")):
            if name.endswith("_blocks"):  # transformers keeps (E, in, out)
                out, inp = shape[1], shape[2] * 32
                expected[name.removesuffix("_blocks")] = (shape[0], inp, out)
            continue
        expected[name] = shape
    return expected


def check_source(config: dict, shards: list[Path]) -> str:
    """Validate names and shapes from the headers alone; return the layout, 'mxfp4' or 'bf16'."""
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for shard in shards:
        for name, (_, shape) in read_header(shard).items():
            found[name] = (shape, shard)
    layout = "mxfp4" if any(n.endswith("_blocks") for n in found) else "bf16"
    for name, shape in expected_tensors(config, layout).items():
        if name not in found:
            raise ReliefError(f"tensor {name} is missing from the checkpoint; "
                              "the download is incomplete or the config does not match it")
        if found[name][0] != shape:
            raise ReliefError(
                f"tensor {name} in {found[name][1].name} has shape {found[name][0]}, but config.json implies {shape}; "
                "the shards and config.json come from different models"
            )
    return layout


def convert(src: str | Path, out: str | Path, revision: str | None = None, experts: str = "auto",
            dtype: str = "bfloat16", overwrite: bool = False, progress: Progress | None = None) -> Path:
    """Convert `src` (folder or Hub id) to an MLX checkpoint at `out`. Returns `out`."""
    if experts not in choices.EXPERT_FORMATS or dtype not in DTYPES:
        raise ReliefError(f"--experts must be one of {', '.join(choices.EXPERT_FORMATS)} and --dtype one of "
                          f"{', '.join(DTYPES)}")
    path, source = hub.resolve(src, revision)
    config = read_config(path)
    shards = source_shards(path)
    layout = check_source(config, shards)
    if not (path / "tokenizer.json").is_file():
        raise ReliefError(f"{path} has no tokenizer.json; copy the tokenizer files of the source model into it")
    experts = ("mxfp4" if layout == "mxfp4" else "bfloat16") if experts == "auto" else experts
    total = sum(len(read_header(s)) for s in shards)
    done, pending, outputs = 0, {}, {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for k, shard in enumerate(shards):
            try:
                loaded = mx.load(str(shard))
            except (RuntimeError, ValueError) as e:
                raise ReliefError(f"could not read {shard}: {e}; download it again") from e
            pending |= loaded
            tensors = hf_to_mlx(pending, layout, experts, DTYPES[dtype])
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            mx.save_safetensors(str(tmp / name), dict(sorted(tensors.items())), metadata={"format": "mlx"})
            outputs[name] = sorted(tensors)
            done += len(loaded)
            if progress:
                progress(done, total, shard.name)
        if pending:
            raise ReliefError(f"tensors {sorted(pending)[:3]} have no matching blocks/scales/bias; "
                              "the checkpoint is incomplete")
        weight_map = {t: f for f, names in outputs.items() for t in names}
        write_json(tmp / "model.safetensors.index.json",
                   {"metadata": {"format": "mlx"}, "weight_map": dict(sorted(weight_map.items()))})
        write_json(tmp / "config.json", mlx_config(config, experts))
        for f in TOKENIZER_FILES:
            if (path / f).is_file():
                shutil.copyfile(path / f, tmp / f)
        write_manifest(tmp, {
            "format": "relief-mlx/1",
            **source,
            "layout": layout,
            "options": {"experts": experts, "dtype": dtype},
            "inputs": {s.name: sha256(s) for s in shards},
        }, files=list(outputs))
    return Path(out)


def verify(src: str | Path, out: str | Path, layers: int = 2, tokens: int = 160, seed: int = 0) -> dict:
    """Run `tokens` random tokens through the first `layers` layers (plus embeddings and head)
    of the converted model and of a float32 reference built from the source tensors by
    `reference.py`, which shares no code with this module's mapping (its own reader, MXFP4
    decoder and gate/up split); return the worst relative logit error, the argmax agreement and
    whether the error is within tolerance (`ok`).

    The sequence is longer than the 128-token sliding window, so both attention types and the
    window are exercised; truncating depth keeps memory small even for gpt-oss-20b. MXFP4 and
    bf16 values are exact in float32, so a faithful conversion differs only by the order of
    float32 sums (~1e-6); float16 rounds every weight.
    """
    import numpy as np

    from ..model.load import build_model, read_weights
    from .reference import reference_weights

    path, _ = hub.resolve(src)
    source_config = read_config(path)
    shards = source_shards(path)
    check_source(source_config, shards)
    n = min(layers, source_config["num_hidden_layers"])
    truncated = {"num_hidden_layers": n, "layer_types": source_config.get("layer_types", [])[:n] or None}
    reference_config = {k: v for k, v in source_config.items() if k != "quantization_config"} | truncated
    reference = build_model(reference_config, {k: mx.array(v) for k, v in reference_weights(path, shards, n).items()},
                            mx.float32)
    out = Path(out)
    converted = {k: v for k, v in read_weights(out).items()
                 if not k.startswith("model.layers.") or int(k.split(".")[2]) < n}
    model = build_model(json.loads((out / "config.json").read_text()) | truncated, converted, mx.float32)
    ids = mx.array(np.random.default_rng(seed).integers(0, source_config["vocab_size"] - 1100, size=(1, tokens)))
    want, got = reference(ids), model(ids)
    error = float((mx.max(mx.abs(got - want), axis=-1) / mx.max(mx.abs(want), axis=-1)).max())
    manifest = out / MANIFEST
    lossy = manifest.is_file() and json.loads(manifest.read_text())["options"].get("dtype") == "float16"
    tolerance = 2e-2 if lossy else 1e-3
    return {
        "layers": n,
        "tokens": tokens,
        "max_relative_error": error,
        "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
        "tolerance": tolerance,
        "ok": error <= tolerance,
    }
