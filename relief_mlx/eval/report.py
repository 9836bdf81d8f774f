"""An evaluation's files, each written atomically into OUT:

- examples.jsonl: one record per item and variant (prompt, answer, analysis, matched and missed
  facts, violations, tokens, time, teacher-forced loss);
- summary.json: what `run.summarize` computed (per variant, per category, comparisons);
- report.md: the summary sentences, an overall table, a table per category, the ten answers
  that changed most between the base and each adapter, every must_not violation quoted;
- coverage.png: key-fact coverage per category, one bar per variant.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from ..io import atomic_path, write_json, write_text

FILES = {"examples": "examples.jsonl", "summary": "summary.json", "report": "report.md", "chart": "coverage.png"}
CHANGED = 10  # answers shown per adapter
QUOTE = 600  # characters of an answer shown in the report


def write(out: str | Path, summary: dict, records: list[dict]) -> dict[str, Path]:
    """Write the four files; returns their paths by kind."""
    out = Path(out)
    paths = {kind: out / name for kind, name in FILES.items()}
    with atomic_path(paths["examples"]) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    write_json(paths["summary"], summary)
    write_text(paths["report"], markdown(summary, records))
    plot(summary, paths["chart"])
    return paths


def event_line(kind: str, e: dict) -> str | None:
    """One progress line for an event of `run.evaluate` (None: nothing to say)."""
    if kind == "start":
        resumed = f", {e['resumed']} answers already in {e['out']}" if e["resumed"] else ""
        return f"eval: {e['items']} items x {len(e['variants'])} variants ({', '.join(e['variants'])}){resumed}"
    if kind == "teacher_forced":
        return f"eval {e['name']}: teacher-forced loss of {e['items']} items in {e['seconds']:.1f} s"
    if kind == "answer":
        return (f"eval {e['name']}: {e['done']}/{e['total']} {e['id']} ({e['tokens']} tokens, "
                f"{e['decode_tps']:.1f} tokens/s)")
    if kind == "dropped":
        return f"eval: dropped {e['lines']} unreadable line(s) of {e['path']} (an interrupted write)"
    if kind == "done":
        return "\n".join([*e["summary"]["sentences"], f"eval report -> {e['files']['report']}"])
    return None


# ---------------------------------------------------------------- Markdown


def _cell(value) -> str:
    """A table cell: numbers formatted, Markdown table syntax escaped, one line."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3f}"
    return " ".join(str(value).replace("|", "\\|").split())


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _ci(c: dict, scale: float = 100, digits: int = 1, unit: str = " pts") -> str:
    """A difference, its 95% interval and the verdict; shares in percentage points by default."""
    if c["difference"] is None:
        return "-"
    low, high = (x * scale for x in c["ci95"])
    return f"{c['difference'] * scale:+.{digits}f}{unit} ({low:+.{digits}f} to {high:+.{digits}f}) {c['verdict']}"


def _quote(text: str) -> list[str]:
    text = text.strip() or "(empty)"
    text = text if len(text) <= QUOTE else text[:QUOTE] + " [...]"
    return ["> " + (line.replace("|", "\\|") or " ") for line in text.splitlines()]


def markdown(summary: dict, records: list[dict]) -> str:
    """The report as Markdown."""
    names = [v["name"] for v in summary["variants"]]
    adapters = names[1:]
    s = summary["settings"]
    lines = [f"# relief eval: {summary['split']} split of {summary['data']}", "",
             f"Model `{summary['model']}`; " + (", ".join(f"`{v['name']}` = `{v['adapter']}`"
                                                       for v in summary["variants"][1:]) or "no adapter") + ".",
             f"{summary['items']} items in {len(summary['categories'])} categories; greedy answers of at most "
             f"{s['max_tokens']} tokens, reasoning {s['reasoning']}; bootstrap seed {s['seed']}. Only the final "
             "channel is scored; coverage is the share of an item's key facts its answer states, averaged "
             "over items.", ""]
    if summary["sentences"]:
        lines += ["## Summary", ""] + [f"- {t}" for t in summary["sentences"]] + [""]
    lines += ["## Overall", ""] + _overall(summary) + [""]
    tf = ", ".join(f"{n} {summary['overall'][n]['teacher_forced_samples_per_s']:.2f}" for n in names)
    lines += [f"Teacher-forced loss on the tokens training trains, samples/s: {tf} (the original PyTorch "
              f"pipeline validated at {summary['original_samples_per_s']} samples/s).", ""]
    lines += ["## By category", ""] + _by_category(summary) + [""]
    by = {(r["variant"], r["id"]): r for r in records}
    ids = list(dict.fromkeys(r["id"] for r in records))
    for name in adapters:
        lines += [f"## Answers that changed most: {name} vs base", ""] + _changed(by, ids, name)
    lines += ["## must_not violations", ""]
    violations = [(r, v) for r in records for v in r["violations"]]
    lines += [f"- `{r['variant']}` on `{r['id']}` ({r['category']}): {v['claim']}: \"{_cell(v['quote'])}\""
              for r, v in violations] or ["None."]
    lines += ["", f"![key-fact coverage by category]({FILES['chart']})", ""]
    return "\n".join(lines)


def _overall(summary: dict) -> list[str]:
    header = ["variant", "items", "key-fact coverage", "facts matched", "must_not violations", "refusals",
              "empty", "unfinished", "mean words", "loss", "perplexity"]
    rows = []
    for name, m in summary["overall"].items():
        rows.append([name, m["items"], _pct(m["coverage"]), f"{m['facts_matched']}/{m['facts']}",
                     f"{m['violations']} in {m['items_with_violations']} items", m["refusals"], m["empty"],
                     m["unfinished"], f"{m['mean_words']:.1f}", m["loss"], m["perplexity"]])
    for name, c in summary["comparisons"].items():
        o = c["overall"]
        rows.append([f"{name} - base", o["coverage"]["n"], _ci(o["coverage"]), "", _ci(o["violation"]),
                     "", "", "", "", _ci(o["loss"], 1, 3, ""), ""])
    return _table(header, rows)


def _by_category(summary: dict) -> list[str]:
    names = list(summary["overall"])
    header = ["category", "items"] + [f"coverage {n}" for n in names]
    header += [f"{n} - base (95% CI)" for n in names[1:]] + [f"loss {n}" for n in names]
    header += [f"violations {n}" for n in names]
    rows = []
    for category, per in summary["by_category"].items():
        row = [category, per[names[0]]["items"]] + [_pct(per[n]["coverage"]) for n in names]
        row += [_ci(summary["comparisons"][n]["by_category"][category]["coverage"]) for n in names[1:]]
        row += [per[n]["loss"] for n in names] + [per[n]["violations"] for n in names]
        rows.append(row)
    return _table(header, rows)


def _change(base: dict, other: dict) -> tuple[float, float]:
    """How much an answer changed: in score (coverage and violations), then in text."""
    scored = abs(other["coverage"] - base["coverage"]) + abs(len(other["violations"]) - len(base["violations"]))
    text = [r["answer"] or r.get("raw", "") for r in (base, other)]
    return scored, 1 - difflib.SequenceMatcher(None, *text).ratio()


def _changed(by: dict, ids: list[str], name: str) -> list[str]:
    pairs = [(by["base", i], by[name, i]) for i in ids]
    pairs = sorted((p for p in pairs if any(_change(*p))), key=lambda p: _change(*p), reverse=True)
    lines = [] if pairs else ["No answer changed.", ""]
    for rank, (base, other) in enumerate(pairs[:CHANGED], start=1):
        gained = [f for f in other["matched"] if f not in base["matched"]]
        lost = [f for f in base["matched"] if f not in other["matched"]]
        lines += [f"### {rank}. `{base['id']}` ({base['category']}): coverage {_pct(base['coverage'])} -> "
                  f"{_pct(other['coverage'])}", "", f"Prompt: {_cell(base['prompt'])[:QUOTE]}", ""]
        if gained or lost:
            lines += [f"Facts gained: {'; '.join(gained) or 'none'}. Facts lost: {'; '.join(lost) or 'none'}.", ""]
        for label, r in (("base", base), (name, other)):
            state = "" if r["finished"] else f", unfinished ({r['finish_reason']})"
            shown = r["answer"] or (f"(no final answer; generated text: {r['raw']})" if r.get("raw") else "")
            lines += [f"**{label}** ({r['generated_tokens']} tokens{state}):", ""] + _quote(shown) + [""]
    return lines


# ---------------------------------------------------------------- chart


def plot(summary: dict, path: str | Path) -> Path:
    """A PNG: key-fact coverage per category and overall, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["overall"])
    groups = [*summary["categories"], "overall"]
    values = {n: [summary["by_category"][c][n]["coverage"] * 100 for c in summary["categories"]]
              + [summary["overall"][n]["coverage"] * 100] for n in names}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(groups) * max(len(names), 2)), 4.2), constrained_layout=True)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, values[name], width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("key-fact coverage (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(f"{summary['model']}: {summary['split']} split, {summary['items']} items, "
                 f"max {summary['settings']['max_tokens']} tokens", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)
