"""`relief demo`: the whole pipeline on the embedded default, end to end.

synth a `mini` gpt-oss in the Hub layout -> convert it -> train LoRA with recipes/mini.toml on
the bundled dataset -> answer a held-out disaster-response question with and without the
adapter -> `relief eval` of both on a few test items (few tokens each). Each step writes its own
folder under `out` and is skipped when that folder is already complete (the eval resumes), so
an interrupted demo continues where it stopped and nothing is overwritten.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from .checkpoint.convert import convert
from .checkpoint.synth import synth
from .io import MANIFEST

Say = Callable[[str], None]
QUESTION = ("A flash flood displaced 600 people into a school gym tonight. I'm the shelter manager. "
            "What do I set up first?")


def run_demo(out: str | Path, recipe: str | Path, say: Say, train_event=None, max_tokens: int = 64,
             overrides: tuple[str, ...] = (), eval_items: int = 4, eval_event=None) -> dict:
    """Run every step; returns what each produced (paths, loss curve, answers, eval summary).
    `recipe` is a file or a bundled recipe (`recipes/mini.toml` works from any folder);
    `overrides` are `--set section.key=value` on top of it."""
    from .eval.run import EvalConfig, evaluate
    from .generate.engine import Engine, GenerateConfig, answer
    from .recipe import load_recipe
    from .train import train

    out = Path(out)
    hf, model, adapter = out / "mini-hf", out / "mini", out / "adapter"
    # read first: a bad recipe or --set fails before anything is written
    resolved = load_recipe(recipe, (*overrides, f"model.path={model}", f"output.dir={adapter}"))

    if not (hf / "model.safetensors.index.json").is_file():
        say(f"1/5 synth: a random-weight gpt-oss (preset mini) in the Hub layout -> {hf}")
        synth("mini", hf)
    if not (model / MANIFEST).is_file():
        # MLX's CPU gather_mm runs only in float32; GPUs keep the MXFP4 experts as published.
        cpu = mx.default_device() == mx.cpu
        say(f"2/5 convert: experts {'float32 (CPU backend)' if cpu else 'MXFP4'} -> {model}")
        convert(hf, model, experts="float32" if cpu else "auto", dtype="float32" if cpu else "bfloat16")
    if not (adapter / "summary.json").is_file():
        say(f"3/5 train: {recipe} on the bundled dataset -> {adapter}")
        train(resolved, resume=adapter if (adapter / "checkpoint").exists() else None, on_event=train_event)
    summary = json.loads((adapter / "summary.json").read_text())

    say(f"4/5 generate: {QUESTION!r}")
    config = GenerateConfig(max_tokens=max_tokens, reasoning="low")
    messages = [{"role": "user", "content": QUESTION}]
    answers = {}
    for name, adapter_dir in (("base", None), ("adapter", adapter)):
        engine = Engine.load(model, adapter=adapter_dir)
        reply = answer(engine, messages, config)
        text = reply.final or engine.harmony.decode(reply.tokens)
        answers[name] = {"text": text, "final_channel": bool(reply.final),
                         "decode_tps": reply.decode_tps, "tokens": reply.generated_tokens}

    say(f"5/5 eval: base vs adapter on {eval_items} test items, {max_tokens} tokens each -> {out / 'eval'}")
    report = evaluate(EvalConfig(model=str(model), adapters=(str(adapter),), data=resolved.data, out=str(out / "eval"),
                                 limit=eval_items, max_tokens=max_tokens, batch_size=eval_items), eval_event)
    return {"checkpoint": str(model), "adapter": str(adapter), "summary": summary, "answers": answers,
            "eval": {"sentences": report.summary["sentences"], "report": str(report.files["report"])}}
