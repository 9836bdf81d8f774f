"""A bench result as a terminal table, a JSON file and a PNG chart (matplotlib)."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..io import atomic_path, write_json
from .memory import GIB, MIB, decode_share
from .stats import overlaps, summarize

RUNNER_COLORS = {"relief": "#2a6f97", "mlx-lm": "#e07a1f"}


def _num(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _stat(s: dict) -> str:
    return f"{_num(s['median'])} ({_num(s['min'])}-{_num(s['max'])})"


def _gib(b: int) -> str:
    return f"{b / GIB:.2f} GiB"


def _targets(shape: dict) -> str:
    return "+".join(t.split(".")[-1] for t in shape["targets"])


def headline(result: dict) -> list[str]:
    """What was measured, on what: model, machine, bandwidth."""
    m, machine = result["model"], result["machine"]
    versions = machine["versions"]
    cpu = machine["cpu"]
    return [
        f"model      {m['source']}: {m['architecture']['num_hidden_layers']} layers, {m['dtype']} weights, "
        f"{m['experts']} experts, {_gib(m['weights_bytes'])} in memory",
        f"machine    {cpu['model']}, {cpu['usable_cores']} of {cpu['cores']} cores, {machine['backend']} backend, "
        f"mlx {versions.get('mlx')}, mlx-lm {versions.get('mlx-lm')}",
        f"bandwidth  {bandwidth_summary(result['bandwidth'])}",
    ]


def bandwidth_summary(bw: dict) -> str:
    """The limit, how it was read, the other kernels' figures and the advertised one."""
    kernels = bw["kernels_gbps"]
    sizes = sorted({s for group in bw["sizes_bytes"].values() for s in group})
    cache = bw["last_level_cache_bytes"]
    where = f"last-level cache {cache / MIB:g} MiB" if cache else "last-level cache unknown"
    if cache and sizes[0] <= cache:
        where += ": the arrays fit in it, so this is the cache's speed, not the memory's"
    others = ", ".join(f"{name} {_num(k['best'])}" for name, k in kernels.items() if name != bw["limit_kernel"])
    nominal = (f"; advertised {bw['nominal_gbps']:g} GB/s ({bw['chip']})" if bw.get("nominal_gbps")
               else f"; no advertised figure known for {bw['chip']}")
    return (f"{_num(bw['limit_gbps'])} GB/s read limit ({bw['limit_kernel']}, best of {bw['trials']} trials on "
            f"{sizes[0] / MIB:g}-{sizes[-1] / MIB:g} MiB arrays, {where}); other reads GB/s: {others}{nominal}")


def bytes_line(row: dict, arch: dict) -> str:
    """What one decoded token reads, by component: the figure the share of the limit rests on."""
    b = {k: v / 1e6 for k, v in row["bytes_per_token"].items()}
    p, g = row["prompt_tokens"], row["generated_tokens"]
    small = b["norms"] + b["router"] + b["embedding_row"]
    return (f"decode {g} after {p} reads {b['total']:.4g} MB/token (mean over the run): lm_head {b['lm_head']:.3g}, "
            f"attention {b['attention']:.3g}, experts {b['experts']:.3g} (top {arch['num_experts_per_tok']} of "
            f"{arch['num_local_experts']} in each of {arch['num_hidden_layers']} layers), KV cache {b['kv_cache']:.3g} "
            f"({p + 1}-{p + g} tokens of context), norms + router + embedding row {small:.3g}")


def measurement_errors(result: dict) -> list[str]:
    """Every decode figure that read more than the bandwidth limit: the measurement is wrong."""
    return [row["bandwidth_error"] for rows in result["generation"]["runners"].values()
            for row in rows["decode"] if row.get("bandwidth_error")]


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per figure, a `median (min-max)` column per runner, ratios last."""
    runners = list(result["generation"]["runners"])
    gen = result["generation"]["runners"]
    ratios = result.get("ratios")
    header = ["figure", *runners] + (["relief/mlx-lm"] if ratios else [])
    rows: list[list[str]] = []

    def add(label: str, cells: list[str], ratio: float | dict | None = None) -> None:
        if isinstance(ratio, dict):
            ratio = f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"
        elif ratio is not None:
            ratio = f"{ratio:.2f}x"
        rows.append([label, *cells] + ([ratio or ""] if ratios else []))

    for i, row in enumerate(gen[runners[0]]["prefill"]):
        r = ratios["prefill"][i] if ratios else {}
        p = row["prompt_tokens"]
        add(f"prefill {p} tok/s", [_stat(gen[n]["prefill"][i]["tokens_per_s"]) for n in runners], r.get("tokens_per_s"))
        add("  time to first token s", [_stat(gen[n]["prefill"][i]["ttft_s"]) for n in runners])
        add("  peak memory", [_gib(gen[n]["prefill"][i]["peak_memory_bytes"]) for n in runners], r.get("peak_memory"))
    for i, row in enumerate(gen[runners[0]]["decode"]):
        r = ratios["decode"][i] if ratios else {}
        g, p = row["generated_tokens"], row["prompt_tokens"]
        add(f"decode {g} after {p} tok/s", [_stat(gen[n]["decode"][i]["tokens_per_s"]) for n in runners],
            r.get("tokens_per_s"))
        add("  share of bandwidth limit", [_share(gen[n]["decode"][i]) for n in runners])
        add("  peak memory", [_gib(gen[n]["decode"][i]["peak_memory_bytes"]) for n in runners], r.get("peak_memory"))
        add("  bandwidth limit tok/s", [f"{_num(row['ceiling_tokens_per_s'])} "
                                        f"({row['bytes_per_token']['total'] / 1e6:.0f} MB/token)"] * len(runners))
    training = result.get("training")
    if training:
        t, s = training["runners"], training["shape"]
        r = ratios.get("training", {}) if ratios else {}
        label = f"LoRA r{s['rank']} {_targets(s)} {s['batch_size']}x{s['seq']} tok/s"
        add(label, [_stat(t[n]["tokens_per_s"]) for n in runners], r.get("tokens_per_s"))
        add("  peak memory", [_gib(t[n]["peak_memory_bytes"]) for n in runners], r.get("peak_memory"))
    return header, rows


def _share(row: dict) -> str:
    return "ERROR" if row["bandwidth_fraction"] is None else f"{row['bandwidth_fraction']:.0%}"


def format_table(result: dict) -> str:
    """The headline and a column-aligned table of every figure."""
    header, rows = table_rows(result)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = headline(result) + [""]
    for r in [header, *rows]:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines + [""] + footnotes(result))


def footnotes(result: dict) -> list[str]:
    """How to read the table: statistics, the bytes behind each share, measurement errors."""
    trials = result["config"]["trials"]
    arch = result["model"]["architecture"]
    decode = next(iter(result["generation"]["runners"].values()))["decode"]
    runs = f" in {result['runs']} runs (processes)" if result.get("runs") else ""
    lines = [f"median (min-max) of {trials} trials{runs}; tok/s ratios trial by trial (runners alternate), "
             "above 1x is faster; memory ratios below 1x are leaner"]
    lines += [bytes_line(row, arch) for row in decode]
    lines += [f"MEASUREMENT ERROR: {e}" for e in measurement_errors(result)]
    return lines + memory_lines(result)


def memory_lines(result: dict) -> list[str]:
    """relief's LoRA step memory: the forecast (`relief_mlx.memory`) and each part measured alone."""
    memory = (result.get("training") or {}).get("memory")
    if not memory:
        return []
    parts = ("weights", "activations", "loss_head", "lora_state")
    forecast, measured = memory["forecast"], memory["measured"]
    row = lambda d: "  ".join(f"{k.replace('_', ' ')} {d[k] / GIB:.2f}" for k in parts)  # noqa: E731
    return ["", "relief LoRA step memory, GiB",
            f"  forecast   {forecast['total'] / GIB:.2f}: {row(forecast)}",
            f"  measured   peak {measured['peak'] / GIB:.2f}; each part alone: {row(measured)}; "
            f"allocator cache {measured['allocator_cache'] / GIB:.2f}"]


def markdown(result: dict) -> str:
    """The table as Markdown (what the README shows), headline lines first."""
    header, rows = table_rows(result)
    lines = [f"- {line.split(maxsplit=1)[0]}: {line.split(maxsplit=1)[1]}" for line in headline(result)] + [""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(c.replace("  ", "&nbsp;&nbsp;", 1) if c.startswith("  ") else c for c in r) + " |"
              for r in rows]
    return "\n".join(lines + [""] + [f"- {line.strip()}" for line in footnotes(result) if line.strip()])


def write(result: dict, path: str | Path) -> Path:
    write_json(path, result)
    return Path(path)


CHART_DPI = 130
PANEL_INCHES = (4.6, 4.2)


def plot(result: dict, path: str | Path) -> Path:
    """A PNG: prefill tok/s by prompt length, decode tok/s by generated tokens (with the
    bandwidth limit) and LoRA step tok/s, one bar per runner with its min-max; 546 pixels high,
    598 wide per panel (three with training, else two)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    gen = result["generation"]["runners"]
    training = result.get("training")
    panels = 3 if training else 2
    fig = Figure(figsize=(PANEL_INCHES[0] * panels, PANEL_INCHES[1]), layout="constrained")
    axes = fig.subplots(1, panels)
    _bars(axes[0], gen, "prefill", "prompt_tokens", "prompt tokens", "prefill tokens/s")
    _bars(axes[1], gen, "decode", "generated_tokens", "generated tokens", "decode tokens/s (share of the limit)")
    ceiling = [row["ceiling_tokens_per_s"] for row in next(iter(gen.values()))["decode"]]
    axes[1].axhline(min(ceiling), color="0.4", linestyle="--", linewidth=1, label="bandwidth limit")
    axes[1].legend(fontsize=8)
    if training:
        _training_bars(axes[2], training)
    m, machine = result["model"], result["machine"]
    runs = f" in {result['runs']} runs" if result.get("runs") else ""
    fig.suptitle(f"{m['source']}, {m['dtype']}, {m['experts']} experts | {machine['cpu']['model']}, "
                 f"{machine['backend']} backend, mlx {machine['versions'].get('mlx')} | "
                 f"median of {result['config']['trials']} trials{runs}, whiskers min-max", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=CHART_DPI)
    return Path(path)


def _bars(ax, gen: dict, phase: str, key: str, xlabel: str, ylabel: str) -> None:
    runners = list(gen)
    width = 0.8 / len(runners)
    for j, name in enumerate(runners):
        rows = gen[name][phase]
        xs = [i + (j - (len(runners) - 1) / 2) * width for i in range(len(rows))]
        med = [r["tokens_per_s"]["median"] for r in rows]
        err = [[m - r["tokens_per_s"]["min"] for m, r in zip(med, rows, strict=True)],
               [r["tokens_per_s"]["max"] - m for m, r in zip(med, rows, strict=True)]]
        bars = ax.bar(xs, med, width, yerr=err, capsize=3, label=name, color=RUNNER_COLORS.get(name))
        if phase == "decode":  # each bar's share of the bandwidth limit
            ax.bar_label(bars, [_share(r) for r in rows], fontsize=7, padding=2)
    ax.set_xticks(range(len(gen[runners[0]][phase])), [str(r[key]) for r in gen[runners[0]][phase]])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def _training_bars(ax, training: dict) -> None:
    t, s = training["runners"], training["shape"]
    names = list(t)
    med = [t[n]["tokens_per_s"]["median"] for n in names]
    err = [[m - t[n]["tokens_per_s"]["min"] for m, n in zip(med, names, strict=True)],
           [t[n]["tokens_per_s"]["max"] - m for m, n in zip(med, names, strict=True)]]
    ax.bar(names, med, 0.6, yerr=err, capsize=3, color=[RUNNER_COLORS.get(n) for n in names])
    ax.set_ylabel("LoRA training tokens/s")
    ax.set_xlabel(f"rank {s['rank']}, {_targets(s)}, "
                  f"batch {s['batch_size']} x {s['seq']} tokens")


def pool_runs(results: list[dict]) -> dict:
    """Several results of one command (each its own process) as one: every timed figure and
    trial-by-trial ratio summarizes the trials of all runs, other numbers are the runs' median,
    the bandwidth is the run with the highest limit (STREAM's best trial), and every decode
    share is taken again against it."""
    pooled = _pool(results)
    pooled["bandwidth"] = max((r["bandwidth"] for r in results), key=lambda bw: bw["limit_gbps"])
    pooled["config"]["trials"] = sum(r["config"]["trials"] for r in results)
    pooled["runs"] = len(results)
    for runner, rows in pooled["generation"]["runners"].items():
        for row in rows["decode"]:
            row.pop("bandwidth_error", None)
            row |= decode_share(row, pooled["bandwidth"]["limit_gbps"],
                                f"{runner} decode of {row['generated_tokens']} tokens")
    return pooled


def _pool(values: list):
    first = values[0]
    if isinstance(first, dict) and {"median", "trials"} <= first.keys():  # a `summarize` result
        return summarize([t for v in values for t in v["trials"]])
    if isinstance(first, dict):
        return {k: _pool([v.get(k) for v in values]) for k in first}
    if isinstance(first, list) and first and isinstance(first[0], dict):
        return [_pool(list(rows)) for rows in zip(*values, strict=True)]
    if isinstance(first, (int, float)) and not isinstance(first, bool) and None not in values:
        return statistics.median(values)
    return first


def agreement(a: dict, b: dict) -> list[dict]:
    """For two results of the same command, every timed figure: {"figure", "a", "b", "agree"}, where
    a and b are the two runs' summaries and agree says whether their min-max ranges overlap."""
    pairs = []
    for name, runs in a["generation"]["runners"].items():
        other = b["generation"]["runners"][name]
        for phase, key in (("prefill", "prompt_tokens"), ("decode", "generated_tokens")):
            for x, y in zip(runs[phase], other[phase], strict=True):
                pairs.append((f"{name} {phase} {x[key]} tok/s", x["tokens_per_s"], y["tokens_per_s"]))
    if a.get("training") and b.get("training"):
        for name, x in a["training"]["runners"].items():
            pairs.append((f"{name} LoRA step tok/s", x["tokens_per_s"], b["training"]["runners"][name]["tokens_per_s"]))
    if a.get("ratios") and b.get("ratios"):
        for phase, key in (("prefill", "prompt_tokens"), ("decode", "generated_tokens")):
            for x, y in zip(a["ratios"][phase], b["ratios"][phase], strict=True):
                pairs.append((f"relief/mlx-lm {phase} {x[key]}", x["tokens_per_s"], y["tokens_per_s"]))
        if a["ratios"].get("training") and b["ratios"].get("training"):
            pairs.append(("relief/mlx-lm LoRA step", a["ratios"]["training"]["tokens_per_s"],
                          b["ratios"]["training"]["tokens_per_s"]))
    kernel = a["bandwidth"]["limit_kernel"]
    pairs.append((f"bandwidth ({kernel}) GB/s", a["bandwidth"]["kernels_gbps"][kernel],
                  b["bandwidth"]["kernels_gbps"][kernel]))
    return [{"figure": f, "a": x, "b": y, "agree": overlaps(x, y)} for f, x, y in pairs]
