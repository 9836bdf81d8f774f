"""`relief eval`: answer a test split with the base model and each adapter, score, compare.

The model is loaded once; the variants (the base, then each adapter) take turns on it
(`apply_adapter` / `remove_adapter`, every adapter applied and removed once up front, so one for
another model fails before any work). Each variant runs the same items:
1. teacher-forced loss on exactly the tokens training trains (`data.tokenize` with the recipe's
   data settings, `train.data.micro_batch`, `train.loss`'s head), `batch_size` examples per
   forward pass, one loss sum per example;
2. greedy answers through `generate.batch.answer_prompts` (the loop `relief generate --prompts`
   uses), parsed by Harmony; only the final channel is scored (`score.score`), the analysis is
   kept in the record.
Every answered item is appended to OUT/examples.partial.jsonl at once (one complete JSON record
per line, flushed and fsynced). A rerun into the same OUT skips every item whose record is there
(same model, adapter weights, settings and conversation: its `key`) and drops a torn last line;
records of other settings stay in the file, unused. Then the records are scored again (so an
edited key_facts list needs no new answers), compared (`compare`: paired bootstrap) and written
by `report.write` as examples.jsonl, summary.json, report.md and coverage.png.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .. import hub
from ..data.dataset import Example, load_dataset, tokenize
from ..data.harmony import HarmonyTokenizer, RenderOptions, render_prompt
from ..data.scoring import scoring_problems
from ..errors import ReliefError
from ..io import atomic_path
from ..model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_adapter, remove_adapter
from ..recipe import DataSection, EvalSection, Recipe
from .score import score

Event = Callable[[str, dict], None]
PARTIAL = "examples.partial.jsonl"
ORIGINAL_SAMPLES_PER_S = 0.008  # the PyTorch pipeline's validation speed, for comparison
MIN_PAIRED = 5  # fewer paired items than this: no significance claim
RESAMPLES = 2000
ARCHITECTURE = ("hidden_size", "num_hidden_layers", "num_local_experts", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation; each field is a `relief eval` option (the [eval] recipe section sets the same)."""

    model: str
    """Converted checkpoint folder or Hub id."""
    adapters: tuple[str, ...] = ()
    """LoRA adapters compared with the base: run folders, best/ or checkpoint/ folders, weights files."""
    data: DataSection = field(default_factory=DataSection)
    """Where the split is, and how conversations render (reasoning effort, date, max_length, mask)."""
    split: str = EvalSection.split
    out: str = "runs/eval"
    """Folder of the report; an interrupted eval into it resumes."""
    limit: int = EvalSection.limit
    categories: tuple[str, ...] = ()
    batch_size: int = EvalSection.batch_size
    max_tokens: int = EvalSection.max_tokens
    seed: int = EvalSection.seed

    def __post_init__(self) -> None:
        for name, least in (("limit", 0), ("batch_size", 1), ("max_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise ReliefError(f"{name.replace('_', '-')} {value!r} is not valid; "
                                  f"use a whole number, {least} or more")


@dataclass(frozen=True)
class Item:
    """One test conversation: the prompt to answer and what its answer is scored on."""

    id: str
    where: str
    """file:line"""
    category: str
    messages: list[dict]
    """The conversation up to its last user message (the prompt)."""
    reference: str
    """The dataset's answer."""
    facts: dict[str, Any]
    """key_facts, must_not (and rubric) of the line."""
    example: Example | None
    """Its tokens and training mask; None when the length policy dropped it."""


@dataclass(frozen=True)
class Variant:
    name: str
    """"base", or a short name of the adapter."""
    source: str | None
    """The adapter as given."""
    folder: Path | None
    """The folder `apply_adapter` reads."""
    fingerprint: str = ""


@dataclass(frozen=True)
class EvalResult:
    out: Path
    summary: dict
    files: dict[str, Path]


# ---------------------------------------------------------------- the whole evaluation


def evaluate(config: EvalConfig, on_event: Event | None = None, loaded: tuple[Any, Any] | None = None) -> EvalResult:
    """Answer, score and compare; write the report into `config.out`. `loaded` is a `(model,
    tokenizer)` already in memory (the trainer's), used instead of loading `config.model`."""
    from ..generate.engine import DEFAULT_CONTEXT, Engine, adapter_folder, stop_ids
    from ..model.load import build_model, read_weights
    from ..train.state import model_fingerprint
    from .report import write

    emit = on_event or (lambda kind, data: None)
    model_dir, _ = hub.resolve(config.model)
    model_config = _read_json(model_dir / "config.json")
    harmony = HarmonyTokenizer.from_any(loaded[1]) if loaded is not None else HarmonyTokenizer.from_dir(model_dir)
    items = load_items(config, harmony)  # bad data fails here, before the model is loaded
    with tempfile.TemporaryDirectory(prefix="relief-eval-") as scratch:
        folders = []
        for i, source in enumerate(config.adapters):
            (Path(scratch) / str(i)).mkdir()
            folders.append(adapter_folder(source, Path(scratch) / str(i)))
            check_base_model(model_dir, source, folders[-1])
        model = loaded[0] if loaded is not None else build_model(model_config, read_weights(model_dir))
        remove_adapter(model)  # the trainer's own LoRA layers, when it hands its model over
        mx.eval(model.parameters())
        # mlx-lm's tokenizer wrapper is not needed (and takes seconds to build): Harmony does it all
        engine = Engine(model, harmony, model_config.get("max_position_embeddings", DEFAULT_CONTEXT),
                        stop_ids(model_dir))
        base_fp = _digest({"model": model_fingerprint(model_dir, model), **_settings(config),
                           "dtype": str(model.model.embed_tokens.weight.dtype)})
        variants = [Variant("base", None, None, base_fp)]
        for name, source, folder in zip(_names(config.adapters), config.adapters, folders, strict=True):
            check_adapter(model, source, folder)
            weights = hashlib.sha256((folder / ADAPTER_WEIGHTS).read_bytes()).hexdigest()
            variants.append(Variant(name, source, folder, _digest({"base": base_fp, "adapter": weights})))
        out = Path(config.out)
        done = _read_partial(out / PARTIAL, emit)
        emit("start", {"items": len(items), "variants": [v.name for v in variants], "out": str(out),
                       "resumed": sum(_key(v, i) in done for v in variants for i in items)})
        for variant in variants:
            todo = [i for i in items if _key(variant, i) not in done]
            if todo:
                _run_variant(engine, variant, todo, config, out / PARTIAL, done, emit)
        remove_adapter(model)
    # two variants with the same weights share their records
    records = [rescore(done[_key(v, i)] | {"variant": v.name}, i) for v in variants for i in items]
    summary = summarize(config, variants, items, records)
    files = write(out, summary, records)
    emit("done", {"summary": summary, "files": {k: str(v) for k, v in files.items()}})
    return EvalResult(out, summary, files)


def _run_variant(engine, variant: Variant, items: list[Item], config: EvalConfig, partial: Path,
                 done: dict[str, dict], emit: Event) -> None:
    """Teacher-forced losses, then answers, of `items` under `variant`; each record appended as it is done."""
    from ..generate.batch import answer_prompts
    from ..generate.engine import GenerateConfig

    model = engine.model
    remove_adapter(model)
    if variant.folder is not None:
        apply_adapter(model, variant.folder)
    mx.eval(model.parameters())
    model.eval()
    emit("variant", {"name": variant.name, "items": len(items)})

    tic = time.perf_counter()
    losses = teacher_forced(model, [i.example for i in items], config.batch_size, config.data.max_length)
    tf_s = (time.perf_counter() - tic) / len(items)  # per item
    emit("teacher_forced", {"name": variant.name, "items": len(items), "seconds": tf_s * len(items)})

    options = _render_options(config.data)
    prompts = [render_prompt(i.messages, options, engine.harmony) for i in items]
    order = np.argsort([len(p) for p in prompts], kind="stable").tolist()  # similar lengths share a batch
    generation = GenerateConfig(max_tokens=config.max_tokens, reasoning=config.data.reasoning_effort)
    answers = answer_prompts(engine, [prompts[k] for k in order], generation, config.batch_size)
    with open(partial, "a", encoding="utf-8") as f:
        for count, (index, reply) in enumerate(answers, start=1):
            k = order[index]
            record = _record(variant, items[k], reply, losses[k], tf_s)
            if not reply.final:  # what came instead of an answer (random weights: no Harmony at all)
                record["raw"] = engine.harmony.decode(reply.tokens)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            done[record["key"]] = record
            emit("answer", {"name": variant.name, "done": count, "total": len(items), "id": items[k].id,
                            "tokens": reply.generated_tokens, "decode_tps": reply.decode_tps})


# ---------------------------------------------------------------- items and adapters


def load_items(config: EvalConfig, tokenizer: Any) -> list[Item]:
    """The split's items (categories and limit applied), checked: each needs key_facts."""
    data = config.data
    dataset = load_dataset(data.path)
    if config.split not in dataset.splits:
        raise ReliefError(f"{data.path} has no {config.split} split (it has {', '.join(dataset.splits)}); "
                          "pass --split with one of those")
    records = dataset.splits[config.split]
    for record in records:
        problems = scoring_problems(record.key_facts, record.must_not, record.rubric)
        if record.key_facts is None or problems:
            problem = problems[0] if problems else "has no key_facts"
            raise ReliefError(f"{record.where} {problem}; eval scores every {config.split} item on its key_facts: "
                              "add them (schema: datasets/emergency_relief/README.md) or pass another --split")
    present = sorted({r.category or config.split for r in records})
    unknown = [c for c in config.categories if c not in present]
    if unknown:
        raise ReliefError(f"unknown category {unknown[0]!r}; the {config.split} split of {data.path} has "
                          f"{', '.join(present)}")
    chosen = [k for k, r in enumerate(records) if not config.categories or (r.category or config.split)
              in config.categories]
    chosen = _spread(chosen, [records[k].category or config.split for k in chosen], config.limit)
    tokenized = tokenize([records[k] for k in chosen], data.max_length, _render_options(data), data.mask, tokenizer)
    examples = {id(e.record): e for e in tokenized.examples}
    items = []
    for k in chosen:
        record = records[k]
        item_id = f"{record.category or config.split}-{record.line}"
        last_user = max(n for n, m in enumerate(record.messages) if m["role"] == "user")
        items.append(Item(item_id, record.where, record.category or config.split, record.messages[:last_user + 1],
                          record.messages[-1]["content"],
                          {"key_facts": record.key_facts, "must_not": record.must_not or [],
                           "rubric": record.rubric or []},
                          examples.get(id(record))))
    return items


def _spread(indices: list[int], categories: list[str], limit: int) -> list[int]:
    """At most `limit` of `indices` (0: all), taken in turn from each category, in file order."""
    if not limit or limit >= len(indices):
        return indices
    queues: dict[str, list[int]] = {}
    for index, category in zip(indices, categories, strict=True):
        queues.setdefault(category, []).append(index)
    picked: list[int] = []
    while len(picked) < limit:
        for queue in queues.values():
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return sorted(picked)


def _names(adapters: Sequence[str]) -> list[str]:
    """Short unique names: the folder's name, or parent/name for best/, checkpoint/ and files."""
    names: list[str] = []
    for source in adapters:
        p = Path(source).expanduser()
        name = f"{p.parent.name}/{p.name}" if p.name in ("best", "checkpoint") or p.is_file() else p.name
        name = name or str(p)
        while name in names or name == "base":
            name += "'"
        names.append(name)
    return names


def check_base_model(model_dir: Path, source: str, folder: Path) -> None:
    """Raise (one line) when the adapter's recorded `base_model` is a folder here whose
    architecture differs from the model's (a Hub id or a folder not here is left to `check_adapter`)."""
    base = _read_json(folder / ADAPTER_CONFIG).get("base_model")
    theirs = Path(str(base)).expanduser() / "config.json" if base else None
    if theirs is None or not theirs.is_file() or theirs.parent.resolve() == model_dir.resolve():
        return
    mine, other = _read_json(model_dir / "config.json"), _read_json(theirs)
    differs = next((k for k in ARCHITECTURE if mine.get(k) != other.get(k)), None)
    if differs:
        raise ReliefError(f"adapter {source} was trained on {base} ({differs} {other.get(differs)}), not on "
                          f"{model_dir} ({differs} {mine.get(differs)}); pass the model it was trained for")


def check_adapter(model, source: str, folder: Path) -> None:
    """Apply and remove the adapter once: every tensor must have its place and shape in `model`."""
    try:
        apply_adapter(model, folder)
    except ReliefError as e:
        raise ReliefError(f"adapter {source}: {e}") from None
    finally:
        remove_adapter(model)


# ---------------------------------------------------------------- teacher-forced loss


def teacher_forced(model, examples: Sequence[Example | None], batch_size: int,
                   max_length: int) -> list[tuple[float, int] | None]:
    """(summed loss, trained tokens) of each example (None for None), `batch_size` per forward pass."""
    from ..train.data import eval_order, micro_batch
    from ..train.loss import cross_entropy_value, hidden_states

    present = [k for k, e in enumerate(examples) if e is not None]
    kept = [examples[k] for k in present]
    out: list[tuple[float, int] | None] = [None] * len(examples)
    for indices in eval_order([len(e.tokens) for e in kept], batch_size):
        mb = micro_batch(kept, indices, max_length, pad_multiple=1)
        h = hidden_states(model, mx.array(mb.inputs))  # (B, T-1, D)
        h = h.reshape(-1, h.shape[-1])[mx.array(mb.positions)]  # (K, D)
        targets, weights = mx.array(mb.targets), mx.array(mb.weights)
        rows = mb.positions[:mb.trained] // mb.inputs.shape[1]  # the row of each trained position
        bounds = np.searchsorted(rows, np.arange(len(indices) + 1)).tolist()
        sums = [cross_entropy_value(model.lm_head, h[a:b], targets[a:b], weights[a:b], 128)
                for a, b in zip(bounds, bounds[1:], strict=False)]
        mx.eval(sums)
        for index, total, a, b in zip(indices, sums, bounds, bounds[1:], strict=False):
            out[present[index]] = (total.item(), b - a)
    return out


# ---------------------------------------------------------------- records


def _record(variant: Variant, item: Item, reply, loss: tuple[float, int] | None, tf_s: float) -> dict:
    finished = any(m.channel == "final" and m.complete for m in reply.messages)
    loss_sum, trained = loss if loss is not None else (None, 0)
    return {
        "key": _key(variant, item), "variant": variant.name, "id": item.id, "category": item.category,
        "where": item.where, "prompt": item.messages[-1]["content"],
        "turns": sum(m["role"] == "user" for m in item.messages), "reference": item.reference,
        "answer": reply.final, "analysis": reply.analysis, "finished": finished,
        "finish_reason": reply.finish_reason, "prompt_tokens": reply.prompt_tokens,
        "generated_tokens": reply.generated_tokens,
        # its prompt and generated tokens at its batch's speeds: its share of the batch's time
        "time_s": _share(reply.prompt_tokens, reply.prefill_tps) + _share(reply.generated_tokens, reply.decode_tps),
        "decode_tps": reply.decode_tps,
        "loss": loss_sum / trained if trained else None, "loss_sum": loss_sum, "trained_tokens": trained,
        "tf_time_s": tf_s,
    }


def _share(tokens: int, per_s: float) -> float:
    return tokens / per_s if per_s > 0 else 0.0


def rescore(record: dict, item: Item) -> dict:
    """`record` with its score on `item`'s current key_facts and must_not."""
    return record | score(record["answer"], item.facts, record["finished"]).to_dict()


def _key(variant: Variant, item: Item) -> str:
    return _digest({"variant": variant.fingerprint, "messages": item.messages,
                    "tokens": item.example.tokens.tolist() if item.example is not None else None})


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


def _settings(config: EvalConfig) -> dict:
    d = config.data
    return {"max_tokens": config.max_tokens, "reasoning": d.reasoning_effort, "current_date": d.current_date,
            "max_length": d.max_length, "mask": d.mask}


def _render_options(data: DataSection) -> RenderOptions:
    return RenderOptions(reasoning_effort=data.reasoning_effort, current_date=data.current_date)


def _read_partial(path: Path, emit: Event) -> dict[str, dict]:
    """Records of an earlier run by key. A torn last line (or any unreadable one) is dropped and
    the file rewritten without it, so that appending starts on a fresh line."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        return {}
    data = path.read_bytes()
    good = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and "key" in record:
            good.append(record)
    dropped = len([line for line in data.splitlines() if line.strip()]) - len(good)
    if dropped or (data and not data.endswith(b"\n")):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good), encoding="utf-8")
        emit("dropped", {"lines": dropped, "path": str(path)})
    return {r["key"]: r for r in good}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ReliefError(f"{path} does not exist; pass a folder written by `relief convert` or `relief train`")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- statistics


def paired_bootstrap(base: Sequence[float], other: Sequence[float], seed: int,
                     weights: Sequence[float] | None = None) -> dict:
    """The (weighted) mean of `other - base` over paired items, with a 95% percentile bootstrap
    interval (`RESAMPLES` resamples of the items, seeded) and what it says: "higher", "lower",
    "no significant difference" (the interval covers 0) or "too few items" (under `MIN_PAIRED`)."""
    a, b = np.asarray(base, np.float64), np.asarray(other, np.float64)
    w = np.ones_like(a) if weights is None else np.asarray(weights, np.float64)
    n = len(a)
    if n == 0:
        return {"n": 0, "base": None, "other": None, "difference": None, "ci95": None, "verdict": "no paired items"}
    draws = np.random.default_rng(seed).integers(0, n, (RESAMPLES, n))  # (R, n) item indices
    means = ((b - a)[draws] * w[draws]).sum(axis=1) / w[draws].sum(axis=1)  # (R,)
    low, high = np.percentile(means, [2.5, 97.5]).tolist()
    if n < MIN_PAIRED:
        verdict = "too few items"
    elif low <= 0 <= high:
        verdict = "no significant difference"
    else:
        verdict = "higher" if low > 0 else "lower"
    return {"n": n, "base": float(np.average(a, weights=w)), "other": float(np.average(b, weights=w)),
            "difference": float(np.average(b - a, weights=w)), "ci95": [low, high], "verdict": verdict}


def metrics(records: Sequence[dict]) -> dict:
    """Scores and losses of one variant's records (one per item)."""
    trained = sum(r["trained_tokens"] for r in records)
    loss = sum(r["loss_sum"] for r in records if r["trained_tokens"]) / trained if trained else None
    return {
        "items": len(records),
        "coverage": float(np.mean([r["coverage"] for r in records])) if records else 0.0,
        "facts_matched": sum(len(r["matched"]) for r in records),
        "facts": sum(len(r["matched"]) + len(r["missed"]) for r in records),
        "violations": sum(len(r["violations"]) for r in records),
        "items_with_violations": sum(bool(r["violations"]) for r in records),
        "refusals": sum(r["refusal"] for r in records),
        "empty": sum(r["empty"] for r in records),
        "unfinished": sum(r["unfinished"] for r in records),
        "mean_words": float(np.mean([r["words"] for r in records])) if records else 0.0,
        "loss": loss, "perplexity": math.exp(loss) if loss is not None and loss < 700 else None,
        "trained_tokens": trained,
        "generated_tokens": sum(r["generated_tokens"] for r in records),
        "answer_time_s": sum(r["time_s"] for r in records),
        "teacher_forced_samples_per_s": len(records) / sum(r["tf_time_s"] for r in records) if records else None,
    }


def _compare(base: list[dict], other: list[dict], seed: int) -> dict:
    """Paired differences, other - base: coverage and violation (0/1) per item, and the loss per
    trained token (items weighted by their trained tokens, the same for both)."""
    pairs = [(b, o) for b, o in zip(base, other, strict=True) if b["trained_tokens"] and o["trained_tokens"]]
    return {
        "coverage": paired_bootstrap([r["coverage"] for r in base], [r["coverage"] for r in other], seed),
        "violation": paired_bootstrap([bool(r["violations"]) for r in base], [bool(r["violations"]) for r in other],
                                      seed),
        "loss": paired_bootstrap([b["loss"] for b, _ in pairs], [o["loss"] for _, o in pairs], seed,
                                 weights=[b["trained_tokens"] for b, _ in pairs]),
    }


def summarize(config: EvalConfig, variants: Sequence[Variant], items: Sequence[Item], records: list[dict]) -> dict:
    """Per variant, overall and per category; each adapter against the base; summary sentences."""
    by = {(r["variant"], r["id"]): r for r in records}
    categories = sorted({i.category for i in items})

    def rows(variant: Variant, category: str | None = None) -> list[dict]:
        return [by[variant.name, i.id] for i in items if category is None or i.category == category]

    base = variants[0]
    comparisons = {}
    for v in variants[1:]:
        comparisons[v.name] = {"overall": _compare(rows(base), rows(v), config.seed),
                               "by_category": {c: _compare(rows(base, c), rows(v, c), config.seed)
                                               for c in categories}}
        comparisons[v.name]["sentence"] = sentence(v.name, metrics(rows(base)), metrics(rows(v)),
                                                   comparisons[v.name]["overall"])
    return {
        "model": config.model, "data": config.data.path, "split": config.split,
        "items": len(items), "categories": categories,
        "settings": {**_settings(config), "batch_size": config.batch_size, "seed": config.seed,
                     "limit": config.limit, "only_categories": list(config.categories), "greedy": True},
        "variants": [{"name": v.name, "adapter": v.source} for v in variants],
        "overall": {v.name: metrics(rows(v)) for v in variants},
        "by_category": {c: {v.name: metrics(rows(v, c)) for v in variants} for c in categories},
        "comparisons": comparisons,
        "original_samples_per_s": ORIGINAL_SAMPLES_PER_S,
        "sentences": [c["sentence"] for c in comparisons.values()],
    }


def _verdict(c: dict, unit: str, scale: float, digits: int) -> str:
    if c["difference"] is None:
        return "no paired items"
    low, high = (x * scale for x in c["ci95"])
    words = {"higher": "significantly higher", "lower": "significantly lower",
             "too few items": f"too few items ({c['n']}) to tell"}.get(c["verdict"], c["verdict"])
    return (f"{c['difference'] * scale:+.{digits}f}{unit}, 95% CI {low:+.{digits}f} to {high:+.{digits}f}: "
            f"{words}")


def sentence(name: str, base: dict, other: dict, comparison: dict) -> str:
    """One line saying what the adapter changed, and whether the data can tell."""
    text = (f"{name} vs base on {base['items']} items: key-fact coverage {other['coverage']:.1%} vs "
            f"{base['coverage']:.1%} ({_verdict(comparison['coverage'], ' points', 100, 1)}); must_not "
            f"violations in {other['items_with_violations']} vs {base['items_with_violations']} items "
            f"({_verdict(comparison['violation'], ' points', 100, 1)})")
    if other["loss"] is not None and base["loss"] is not None:
        text += (f"; teacher-forced loss {other['loss']:.3f} vs {base['loss']:.3f} "
                 f"({_verdict(comparison['loss'], '', 1, 3)})")
    return text + "."


# ---------------------------------------------------------------- after training


def after_training(recipe: Recipe, run: Path, model, tokenizer, on_event: Event | None = None) -> dict:
    """The [eval] section's evaluation of a finished run: base vs RUN/best (else RUN) on the
    model the trainer holds, into RUN/eval/; returns the report's path and summary sentences.
    Its events reach `on_event` as ("eval", {"kind": kind, ...})."""
    section = recipe.eval
    adapter = run / "best" if (run / "best" / ADAPTER_WEIGHTS).is_file() else run
    config = EvalConfig(model=recipe.model.path, adapters=(str(adapter),), data=recipe.data, split=section.split,
                        out=str(run / "eval"), limit=section.limit, categories=section.categories,
                        batch_size=section.batch_size, max_tokens=section.max_tokens, seed=section.seed)
    emit = (lambda kind, e: on_event("eval", {"kind": kind, **e})) if on_event else None
    result = evaluate(config, emit, loaded=(model, tokenizer))
    return {"report": str(result.files["report"]), "sentences": result.summary["sentences"]}


def check_before_training(recipe: Recipe, tokenizer) -> None:
    """Fail before training, not after it, when [eval] cannot run: no split, no key_facts, unknown category."""
    section = recipe.eval
    load_items(EvalConfig(model=recipe.model.path, data=recipe.data, split=section.split,
                          categories=section.categories, limit=section.limit), tokenizer)
