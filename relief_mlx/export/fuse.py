"""`relief fuse`: the LoRA merged into the weights, and the merge every export shares.

Each touched weight becomes `W + scale * B @ A`, the delta computed and added in float32 and cast
once to the weight's dtype (or `dtype`: float32 keeps the delta exactly; one bf16 rounding loses
~1.5% of a trained-size delta and more of a small one, reported per module as `delta_error`).
A quantized weight the adapter touches (gpt-oss's MXFP4 experts) is
never silently re-quantized: MXFP4 keeps 3 bits per value and a shared exponent per 32, far
coarser than a LoRA delta, so mlx-lm's fuse (which re-quantizes) hands back the base model
(mlx-lm #1172). Three explicit choices instead:

  dequantize    (default) exactly the touched projections become dense (`dtype`, default the
                layer's bias dtype); config.json marks them `false` in `quantization` (mlx-lm's
                per-module form), the untouched ones stay MXFP4, bit for bit
  keep-adapter  the touched quantized projections stay as they are and their LoRA is written as
                an adapter folder `DIR/adapter` (load with `--adapter DIR/adapter`)
  requantize    re-quantized with the measured loss; refused unless the caller accepts it

`fuse` ends by running the fused model and the base model with the adapter on the same tokens
(past the 128-token window) and refuses to finish, leaving nothing at `out`, when the logits
differ by more than `TOLERANCE` of the merged weights' dtype.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import hub
from ..checkpoint.convert import TOKENIZER_FILES
from ..checkpoint.layout import DTYPES, mlx_quantization
from ..errors import ReliefError
from ..io import atomic_dir, write_json, write_manifest
from ..model.load import build_model, read_weights
from ..model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_adapter

QUANTIZED = ("dequantize", "keep-adapter", "requantize")
KEPT_ADAPTER = "adapter"
# The largest median over positions of the relative logit error, max |fused - (base + adapter)| /
# max |base + adapter| at a position, allowed when the merged weights are stored in this dtype.
# float32 storage adds only summation-order noise (~4e-6 on mini). One bf16 rounding of each merged
# weight moves the median by 0.007-0.06 on the random mini model (12 adapters measured; the max
# over positions reaches 0.9 where a rounding flips an expert choice), while a lost delta moves it
# by the adapter's own effect (0.16-0.62 there). Below that effect the check cannot tell rounding
# from loss: `notes` says so, and `dtype="float32"` merges exactly.
TOLERANCE = {mx.float32: 1e-4, mx.float16: 2e-2, mx.bfloat16: 1e-1}
CHECK_TOKENS = 256
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter in mlx-lm's format, checked against a base model."""

    path: Path
    config: dict
    scale: float
    rank: int
    lora: dict[str, tuple[mx.array, mx.array]]  # module -> (lora_a, lora_b) in mlx-lm's layouts

    def delta(self, module: str) -> mx.array:
        """`scale * B @ A` in float32, shaped like the module's weight: (out, in) or (E, out, in)."""
        a, b = (t.astype(mx.float32) for t in self.lora[module])
        if a.ndim == 2:  # LoRALinear: a (in, r), b (r, out)
            return self.scale * (a @ b).T
        return self.scale * (b @ a)  # LoRASwitchLinear: a (E, r, in), b (E, out, r)


@dataclass(frozen=True)
class Merged:
    """What happened to one module the adapter touches."""

    module: str
    kind: str  # dense, dequantized, requantized, kept (its LoRA stays an adapter)
    dtype: str
    bytes_before: int
    bytes_after: int
    delta_size: float  # ||delta|| / ||W||
    delta_error: float  # ||stored delta - delta|| / ||delta||: 0 = kept exactly, 1 = as if dropped
    delta_kept: float  # <stored delta, delta> / ||delta||^2: the share of the delta along itself that survives


def quant_params(quantization: dict, module: str) -> dict:
    """group_size, bits and mode of a quantized module: its own entry, else the defaults."""
    entry = quantization.get(module)
    source = entry if isinstance(entry, dict) else quantization
    return {k: source[k] for k in ("group_size", "bits", "mode") if k in source}


def _weight_shape(weights: dict[str, mx.array], module: str, quantization: dict) -> tuple[int, ...]:
    """The logical (..., out, in) shape of a module's weight, packed or not."""
    shape = weights[f"{module}.weight"].shape
    if f"{module}.scales" in weights:
        group = quant_params(quantization, module).get("group_size", 64)
        shape = (*shape[:-1], weights[f"{module}.scales"].shape[-1] * group)
    return tuple(shape)


def read_adapter(path: str | Path, weights: dict[str, mx.array], config: dict) -> Adapter:
    """The adapter at `path`, each tensor checked against the base `weights`: a tensor with no place
    in the model, another rank than adapter_config.json's, or another shape is an error."""
    path = Path(path)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise ReliefError(f"{path} is not an adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    adapter_config = json.loads(config_file.read_text())
    if adapter_config.get("fine_tune_type", "lora") != "lora":
        raise ReliefError(f"{config_file}: fine_tune_type {adapter_config['fine_tune_type']!r} cannot be fused; "
                          "only 'lora'")
    params = adapter_config.get("lora_parameters", {})
    if not {"rank", "scale"} <= set(params):
        raise ReliefError(f"{config_file} needs lora_parameters.rank and .scale (mlx-lm's adapter format)")
    rank, tensors = int(params["rank"]), mx.load(str(weights_file))
    quantization = config.get("quantization") or {}
    lora = {}
    for name in sorted(tensors):
        module, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise ReliefError(f"{weights_file}: tensor {name} is not a LoRA tensor (lora_a/lora_b); "
                              "only LoRA adapters can be fused")
        if f"{module}.weight" not in weights:
            raise ReliefError(f"{weights_file}: tensor {name} has no place in this model; "
                              "the adapter was trained for another model")
        if leaf == "lora_b":
            continue
        a, b = tensors[name], tensors.get(f"{module}.lora_b")
        if b is None:
            raise ReliefError(f"{weights_file}: {module} has lora_a but no lora_b; the file is incomplete")
        if a.ndim == 2:  # LoRALinear: a (in, r), b (r, out)
            ranks, shape = (a.shape[1], b.shape[0]), (b.shape[1], a.shape[0])
        else:  # LoRASwitchLinear: a (E, r, in), b (E, out, r)
            ranks, shape = (a.shape[1], b.shape[2]), (a.shape[0], b.shape[1], a.shape[2])
        if ranks != (rank, rank):
            raise ReliefError(f"{weights_file}: tensor {name} has rank {ranks[0]}, but {config_file.name} says "
                              f"rank {rank}; use the adapter_config.json the adapter was trained with")
        if shape != (expected := _weight_shape(weights, module, quantization)):
            raise ReliefError(f"{weights_file}: {module} updates a {shape} weight, the model's is {expected}; "
                              "the adapter was trained for another model")
        lora[module] = (a, b)
    if not lora:
        raise ReliefError(f"{weights_file} holds no LoRA tensors; pass a trained adapter")
    return Adapter(path, adapter_config, float(params["scale"]), rank, lora)


def _measure(module: str, kind: str, before: mx.array, stored: mx.array, delta: mx.array,
             bytes_before: int, bytes_after: int) -> Merged:
    kept = stored.astype(mx.float32) - before
    norm = mx.sum(delta * delta)
    size = mx.sqrt(norm / mx.sum(before * before))
    error = mx.sqrt(mx.sum((kept - delta) ** 2) / norm)
    share = mx.sum(kept * delta) / norm
    return Merged(module, kind, str(stored.dtype).removeprefix("mlx.core."), bytes_before, bytes_after,
                  float(size), float(error), float(share))


def _merge_module(out: dict[str, mx.array], module: str, delta: mx.array, quantization: dict,
                  quantized: str, dtype: mx.Dtype | None) -> Merged:
    """Merge `delta` into `out`'s tensors of `module`, in place; return what was done."""
    weight, scales, biases = (f"{module}.{leaf}" for leaf in ("weight", "scales", "biases"))
    nbytes = sum(out[k].nbytes for k in (weight, scales, biases) if k in out)
    if scales not in out:  # dense: merged in its own dtype, or `dtype`
        before = out[weight].astype(mx.float32)
        out[weight] = (before + delta).astype(dtype or out[weight].dtype)
        mx.eval(out[weight])
        return _measure(module, "dense", before, out[weight], delta, nbytes, nbytes)
    q = quant_params(quantization, module)
    before = mx.dequantize(out[weight], out[scales], out.get(biases), **q, dtype=mx.float32)
    if quantized == "keep-adapter":  # the weights stay; the LoRA (float32) keeps the delta exactly
        return _measure(module, "kept", before, before + delta, delta, nbytes, nbytes)
    if quantized == "requantize":
        packed = mx.quantize(before + delta, **q)  # (w, scales), plus biases in affine mode
        out |= dict(zip((weight, scales, biases), packed, strict=False))
        stored = mx.dequantize(*packed, **q, dtype=mx.float32)
        mx.eval(stored)
        return _measure(module, "requantized", before, stored, delta, nbytes, nbytes)
    target = dtype or (out[f"{module}.bias"].dtype if f"{module}.bias" in out else mx.bfloat16)
    out[weight] = (before + delta).astype(target)
    out.pop(scales)
    out.pop(biases, None)
    mx.eval(out[weight])
    return _measure(module, "dequantized", before, out[weight], delta, nbytes, out[weight].nbytes)


def merge(weights: dict[str, mx.array], adapter: Adapter | None, config: dict, quantized: str = "dequantize",
          dtype: mx.Dtype | None = None) -> tuple[dict[str, mx.array], list[Merged]]:
    """`weights` (MLX names: one shard or the whole model) with every module of `adapter` whose
    weight is among them merged; the others pass through untouched."""
    if quantized not in QUANTIZED:
        raise ReliefError(f"quantized modules can be handled as one of {', '.join(QUANTIZED)}, not {quantized!r}")
    out, records = dict(weights), []
    quantization = config.get("quantization") or {}
    for module in sorted(adapter.lora) if adapter else []:
        if f"{module}.weight" in out:
            records.append(_merge_module(out, module, adapter.delta(module), quantization, quantized, dtype))
    return out, records


def model_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise ReliefError(f"{path} has no config.json; pass a folder written by `relief convert` or `relief fuse`")
    return json.loads(file.read_text())


def base_and_adapter(model: str | Path, adapter: str | Path | None) -> tuple[Path, dict, dict, Adapter | None]:
    """The base folder, its config and (lazy) weights, and the checked adapter."""
    path, _ = hub.resolve(model)
    config = model_config(path)
    weights = read_weights(path)
    return path, config, weights, (read_adapter(adapter, weights, config) if adapter is not None else None)


def requantize_loss(records: list[Merged]) -> dict:
    """What re-quantization does to the delta, over every re-quantized module."""
    requantized = [r for r in records if r.kind == "requantized"]
    return {"modules": len(requantized),
            "delta_error": float(np.mean([r.delta_error for r in requantized])) if requantized else 0.0,
            "delta_error_max": max((r.delta_error for r in requantized), default=0.0),
            "delta_kept": float(np.mean([r.delta_kept for r in requantized])) if requantized else 1.0}


def check_requantize(weights: dict[str, mx.array], adapter: Adapter, config: dict, accepted: bool) -> dict:
    """Measure what re-quantizing the touched quantized modules does to the delta; refuse unless accepted."""
    loss = requantize_loss(merge(weights, adapter, config, "requantize")[1])
    if loss["modules"] and not accepted:
        raise ReliefError(
            f"re-quantizing the {loss['modules']} quantized projections the adapter touches stores their delta "
            f"with a relative error of {loss['delta_error']:.2f} on average, up to {loss['delta_error_max']:.2f} "
            "(0 = kept exactly, 1 = as if dropped); pass --accept-requantize-loss to write that anyway, "
            "or drop --requantize (they are then dequantized) or use --keep-adapter-for-experts")
    return loss


def rounding_notes(records: list[Merged], limit: float = 0.05) -> list[str]:
    """A note when storing merged weights in their dtype loses more than `limit` of a delta."""
    lossy = [r for r in records if r.kind in ("dense", "dequantized") and r.delta_error > limit]
    if not lossy:
        return []
    worst = max(lossy, key=lambda r: r.delta_error)
    return [f"storing {len(lossy)} merged modules in {worst.dtype} loses more than {limit:.0%} of their delta "
            f"(up to {worst.delta_error:.0%}, {worst.module}): a small delta does not survive one rounding; "
            "merge with --dtype float32 to keep it"]


def _logits(path: Path, adapter: Path | None, ids: mx.array) -> tuple[mx.array, mx.array | None]:
    """Logits of the model at `path` in float32, without and (if given) with `adapter`."""
    model = build_model(model_config(path), read_weights(path), mx.float32)
    plain = model(ids)
    mx.eval(plain)
    if adapter is None:
        return plain, None
    apply_adapter(model, adapter)
    adapted = model(ids)
    mx.eval(adapted)
    return plain, adapted


def relative_errors(got: mx.array, want: mx.array) -> np.ndarray:
    """max |got - want| / max |want| at each position of (1, L, V) logits."""
    return np.array(mx.max(mx.abs(got - want), axis=-1) / mx.max(mx.abs(want), axis=-1)).reshape(-1)


def check_fused(base: Path, adapter: Path, fused: Path, fused_adapter: Path | None = None,
                tokens: int = CHECK_TOKENS, seed: int = 0) -> dict:
    """Run `tokens` random tokens through base + adapter and through the fused model (+ its kept
    adapter); return the median and worst relative logit error, the argmax agreement and, for
    scale, how far the adapter moves the base model's logits (median)."""
    vocab = model_config(base)["vocab_size"]
    ids = mx.array(np.random.default_rng(seed).integers(0, vocab - 1100, size=(1, tokens)))  # no special tokens
    plain, want = _logits(base, adapter, ids)
    got, with_kept = _logits(fused, fused_adapter, ids)
    got = with_kept if with_kept is not None else got
    errors = relative_errors(got, want)
    return {"tokens": tokens, "median_relative_error": float(np.median(errors)),
            "max_relative_error": float(errors.max()),
            "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
            "adapter_effect": float(np.median(relative_errors(plain, want)))}


def tolerance(records: list[Merged]) -> float:
    """The loosest TOLERANCE among the dtypes the merged weights are stored in."""
    dtypes = {DTYPES.get(r.dtype, mx.float32) for r in records if r.kind in ("dense", "dequantized")}
    return max((TOLERANCE[d] for d in dtypes), default=TOLERANCE[mx.float32])


def _write_kept_adapter(folder: Path, adapter: Adapter, modules: list[str]) -> None:
    """The LoRA of `modules` as an mlx-lm adapter folder: same rank, scale and layers, fewer keys."""
    folder.mkdir()
    tensors = {f"{m}.{leaf}": t for m in modules for leaf, t in zip(("lora_a", "lora_b"), adapter.lora[m], strict=True)}
    mx.save_safetensors(str(folder / ADAPTER_WEIGHTS), tensors)
    keys = sorted({m.split(".", 3)[3] for m in modules})  # model.layers.N.<key>
    config = dict(adapter.config)
    config["lora_parameters"] = config["lora_parameters"] | {"keys": keys}
    write_json(folder / ADAPTER_CONFIG, config)


def verdict(check: dict, limit: float, loss: dict | None, reference: str, out: str | Path) -> list[str]:
    """Refuse a check beyond `limit` (unless a re-quantization loss was accepted); else the notes
    a reader of the result needs."""
    error = check["median_relative_error"]
    if error > limit and not loss:
        raise ReliefError(f"the logits of {out} differ from {reference} by {error:.2e} (median relative error), "
                          f"more than the {limit:.0e} allowed; nothing was written: report this with both folders")
    notes = []
    if loss:
        notes.append(f"re-quantized with the loss accepted: the delta stored with a relative error of "
                     f"{loss['delta_error']:.2f}, logits {error:.2e} from base + adapter")
    if check["adapter_effect"] < 3 * limit:
        notes.append(f"the adapter moves the logits by {check['adapter_effect']:.2e}, close to the {limit:.0e} "
                     "allowed for this dtype: the check cannot tell rounding from a lost delta; "
                     "merge with --dtype float32 to check tightly")
    return notes


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def fuse(model: str | Path, adapter: str | Path, out: str | Path, quantized: str = "dequantize",
         dtype: str | None = None, accept_requantize_loss: bool = False, overwrite: bool = False,
         tokens: int = CHECK_TOKENS, eval_summary: Path | None = None, progress: Progress | None = None) -> dict:
    """Write `model` with `adapter` merged to the MLX folder `out` (atomically) and check it; returns
    what was merged, the check and the tolerance it passed."""
    from .card import write_card

    base, config, weights, lora = base_and_adapter(model, adapter)
    target = DTYPES[dtype] if dtype else None
    loss = check_requantize(weights, lora, config, accept_requantize_loss) if quantized == "requantize" else None
    records, index = [], {}
    shards = sorted(base.glob("model*.safetensors"))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for k, shard in enumerate(shards):
            tensors, merged = merge(mx.load(str(shard)), lora, config, quantized, target)
            mx.save_safetensors(str(tmp / shard.name), dict(sorted(tensors.items())), metadata={"format": "mlx"})
            index |= {name: shard.name for name in tensors}
            records += merged
            if progress:
                progress(k + 1, len(shards), shard.name)
        write_json(tmp / "model.safetensors.index.json",
                   {"metadata": {"format": "mlx"}, "weight_map": dict(sorted(index.items()))})
        dense = [r.module for r in records if r.kind == "dequantized"]
        write_json(tmp / "config.json", mlx_quantization(config, dense))
        copy_tokenizer(base, tmp)
        kept = [r.module for r in records if r.kind == "kept"]
        if kept:
            _write_kept_adapter(tmp / KEPT_ADAPTER, lora, kept)
        check = check_fused(base, lora.path, tmp, tmp / KEPT_ADAPTER if kept else None, tokens)
        limit = tolerance(records)
        result = {"base": str(base), "adapter": str(lora.path), "quantized": quantized,
                  "merged": [asdict(r) for r in records], "requantize_loss": loss, "check": check,
                  "tolerance": limit, "kept_adapter": KEPT_ADAPTER if kept else None,
                  "notes": verdict(check, limit, loss, f"{base} + {lora.path}", out) + rounding_notes(records)}
        write_card(tmp, str(out), "mlx", base, lora, result, eval_summary=eval_summary)
        write_manifest(tmp, {"format": "relief-mlx-fuse/1", **{k: result[k] for k in
                                                               ("base", "adapter", "quantized", "check", "tolerance")}})
    return result | {"out": str(out)}
