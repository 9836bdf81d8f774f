"""The README's export figures: each output of `relief fuse` / `relief export` run by the engine that
consumes it, against relief's base + adapter, on the mini model with an adapter on q/v and on
every expert of the last two layers (B random, as after training: the delta is a few % of W).

    python benchmarks/export.py              # -> benchmarks/results/export-mini-cpu.json

Needs the test extra (torch, transformers, peft, llama-cpp-python). Over 300 random tokens (past
the 128-token window): the relative logit error per position, max |got - want| / max |want|
(median and max), and the argmax agreement. llama.cpp rounds YaRN's correction range (gpt-oss's
config says not to), so it is compared with relief both as configured and under that rounding.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from relief_mlx.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()  # re-executes once with OpenBLAS preloaded on a Linux CPU, as `relief` does

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from relief_mlx.checkpoint.convert import convert  # noqa: E402
from relief_mlx.checkpoint.synth import synth  # noqa: E402
from relief_mlx.export import export  # noqa: E402
from relief_mlx.export.fuse import fuse  # noqa: E402
from relief_mlx.io import write_json  # noqa: E402
from relief_mlx.model.load import build_model, read_weights  # noqa: E402
from relief_mlx.model.lora import apply_adapter  # noqa: E402
from relief_mlx.recipe import LoraSection  # noqa: E402
from relief_mlx.train.targets import apply_lora  # noqa: E402

TOKENS = 300


def _adapter(model_dir: Path, out: Path) -> Path:
    model = build_model(json.loads((model_dir / "config.json").read_text()), read_weights(model_dir), mx.float32)
    mx.random.seed(1)
    config = apply_lora(model, LoraSection(targets=("self_attn.q_proj", "self_attn.v_proj", "mlp.experts.*"),
                                           rank=4, alpha=8.0, layers=2))
    weights = {k: mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v
               for k, v in tree_flatten(model.trainable_parameters())}
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _relief(model_dir: Path, ids: list[int], adapter: Path | None, truncate: bool = False) -> np.ndarray:
    config = json.loads((model_dir / "config.json").read_text())
    if truncate:
        config["rope_scaling"] = config["rope_scaling"] | {"truncate": True}
    model = build_model(config, read_weights(model_dir), mx.float32)
    if adapter:
        apply_adapter(model, adapter)
    return np.array(model(mx.array([ids])))[0]


def _compare(got: np.ndarray, want: np.ndarray) -> dict:
    errors = np.abs(got - want).max(-1) / np.abs(want).max(-1)
    return {"median_relative_error": float(np.median(errors)), "max_relative_error": float(errors.max()),
            "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean())}


def _torch(folder: Path, ids: list[int], base_hf: Path | None = None) -> np.ndarray:
    import torch
    from transformers import GptOssForCausalLM

    if base_hf is None:
        model = GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(GptOssForCausalLM.from_pretrained(base_hf, dtype=torch.float32), folder)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _llama(path: Path, ids: list[int], greedy: int) -> tuple[np.ndarray, list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, n_threads=2,
                type_k=0, type_v=0, verbose=False)  # float32 K/V cache
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)]).copy()
    llm.reset()
    llm.eval(ids[:150])
    tokens = []
    for _ in range(greedy):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(tokens[-1:])
    return logits, tokens


def _relief_greedy(model_dir: Path, adapter: Path, prompt: list[int], n: int, truncate: bool) -> list[int]:
    from relief_mlx.generate.loop import generate_tokens

    config = json.loads((model_dir / "config.json").read_text())
    config["rope_scaling"] = config["rope_scaling"] | {"truncate": truncate}
    model = build_model(config, read_weights(model_dir), mx.float32)
    apply_adapter(model, adapter)
    return [s.token for s in generate_tokens(model, prompt, max_tokens=n)]


def _same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export-mini-cpu.json")
    args = parser.parse_args()
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 200_000, size=TOKENS)]
    results: dict = {"tokens": TOKENS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf = synth("mini", work / "hf")
        mxfp4, f32 = convert(hf, work / "mxfp4"), convert(hf, work / "f32", experts="float32", dtype="float32")
        adapter = _adapter(mxfp4, work / "adapter")
        want = _relief(mxfp4, ids, adapter)
        results["adapter_effect"] = _compare(_relief(mxfp4, ids, None), want)
        for dtype in (None, "float32"):
            out = work / f"fused-{dtype}"
            fuse(mxfp4, adapter, out, dtype=dtype)
            results[f"fuse ({dtype or 'own dtype: bfloat16'})"] = _compare(_relief(out, ids, None), want)
            export(mxfp4, work / f"hf-{dtype}", "hf", adapter=adapter, dtype=dtype)
            got = _torch(work / f"hf-{dtype}", ids)
            results[f"hf in transformers ({dtype or 'bfloat16'} merge)"] = _compare(got, want)
        export(mxfp4, work / "peft", "peft", adapter=adapter)
        results["peft in PEFT"] = _compare(_torch(work / "peft", ids, base_hf=hf), want)
        for name, base in (("float32", f32), ("MXFP4 experts, bf16 merge", mxfp4)):
            export(base, work / f"gguf-{name}", "gguf", adapter=adapter)
            got, greedy = _llama(work / f"gguf-{name}" / "model.gguf", ids, 64)
            results[f"gguf in llama.cpp ({name}) vs relief"] = _compare(got, _relief(base, ids, adapter))
            results[f"gguf in llama.cpp ({name}) vs relief with llama.cpp's YaRN rounding"] = _compare(
                got, _relief(base, ids, adapter, truncate=True))
            for truncate in (False, True):
                same = _same_prefix(greedy, _relief_greedy(base, adapter, ids[:150], 64, truncate))
                results[f"gguf in llama.cpp ({name}): greedy tokens equal to relief's "
                        f"({'llama.cpp YaRN' if truncate else 'as configured'}), of 64"] = same
    for name, value in results.items():
        print(f"{name}: {value}")
    write_json(args.out, results)
    print(f"results -> {args.out}")


if __name__ == "__main__":
    main()
