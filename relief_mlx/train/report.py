"""Text for the trainer's events: a progress line per step, and the end-of-run summary.

Pure functions from the event dicts `train(on_event=...)` emits to strings; `cli.py` prints.
"""

from __future__ import annotations

BAR = 20


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def step_line(e: dict) -> str:
    """`step 12/300 [###.......] loss 8.214 | 1,234 tok/s | peak 0.80 GB | ETA 3m12s`"""
    filled = round(BAR * e["step"] / e["total"])
    skipped = " (skipped: NaN/inf)" if e["skipped"] else ""
    return (f"step {e['step']}/{e['total']} [{'#' * filled}{'.' * (BAR - filled)}] "
            f"loss {e['loss']:.4f}{skipped} | lr {e['lr']:.2e} | {e['tokens_per_s']:,.0f} tok/s | "
            f"peak {e['peak_memory_gb']:.2f} GB | ETA {duration(e['eta_s'])}")


def event_line(kind: str, e: dict) -> str | None:
    """One line for an event that is not a step (None for events that print nothing)."""
    if kind == "start":
        counts = e["data"]["train"]
        resumed = f", resuming at step {e['start_step']}" if e["start_step"] else ""
        return (f"training {e['trainable']:,} LoRA parameters on {counts['examples']} examples "
                f"({counts['trained_tokens']:,} trained tokens; {counts['dropped']} dropped as too long) "
                f"for {e['steps']} steps on {e['world']} rank(s){resumed} -> {e['run']}")
    if kind == "forecast":
        from ..memory import GIB, describe

        limit = e["available_bytes"]
        room = f" of {limit / GIB:.1f} GiB ({e['available_source']})" if limit else ""
        return f"memory forecast ({e['dtype']}): {describe(e['parts'])}{room}"
    if kind == "load":
        return f"loading {e['model']} ..."
    if kind == "compile":
        return (f"step {e['step']}: compiling the micro-step (mx.compile traces each new padded shape; "
                "the first step can take a minute on a CPU) ...")
    if kind == "validation":
        mark = " (best so far)" if e["best"] else f" (best {e['best_loss']:.4f})"
        return f"step {e['step']}: validation loss {e['val_loss']:.4f}{mark}"
    if kind == "skip":
        return f"step {e['step']}: NaN/inf loss or gradient, update skipped"
    if kind == "checkpoint":
        return f"step {e['step']}: checkpoint -> {e['path']}"
    if kind == "eval":  # [eval] after training
        from ..eval.report import event_line as eval_line

        return eval_line(e["kind"], e)
    return None


def summary_lines(s: dict) -> list[str]:
    curve = " ".join(f"{loss:.3f}" for _, loss in s["loss_curve"])
    lines = [
        f"{s['status']}: {s['steps']}/{s['total_steps']} steps, loss {s['train_loss_first']:.4f} -> "
        f"{s['train_loss_last']:.4f}",
        f"loss curve: {curve}",
    ]
    if s["best_val_loss"] is not None:
        lines.append(f"best validation loss {s['best_val_loss']:.4f} at step {s['best_step']} -> {s['best_adapter']}")
    if s["skipped_steps"]:
        lines.append(f"{s['skipped_steps']} step(s) skipped for NaN/inf")
    lines.append(
        f"time {duration(s['train_time_s'])} training ({duration(s['wall_time_s'])} in all), "
        f"{s['tokens_per_s']:,.0f} tokens/s ({s['trained_tokens_per_s']:,.0f} trained/s), "
        f"peak memory {s['peak_memory_gb']:.2f} GB"
    )
    return lines
