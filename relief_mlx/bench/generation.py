"""Generation speed: prefill tokens/s and time to first token by prompt length, decode tokens/s
by generation length, peak memory of each phase; our loop on relief's model and mlx-lm's
`generate_step` on mlx-lm's model (the same weight arrays: `source.mlx_lm_model`).

Every runner is timed by the same harness from outside (the clock starts before the call and
reads each token as the runner hands it over), so neither loop's own timing is trusted. Trials
alternate between runners, and their order flips every trial (what one runner leaves behind,
such as MLX's buffer cache, helps or hurts the next alike), so a machine that slows down mid-run
penalizes both alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..checkpoint.presets import BOS_ID
from ..generate.loop import generate_tokens
from .stats import summarize

# (model, prompt (L,), max_tokens, prefill_chunk) -> token ids, greedy, no stop tokens
Runner = Callable[[nn.Module, mx.array, int, int], Iterator[int]]
Say = Callable[[str], None]
"""`say(message)`: what the bench is doing now, for a progress line."""


def relief_tokens(model: nn.Module, prompt: mx.array, max_tokens: int, chunk: int) -> Iterator[int]:
    """Our loop (`relief generate` without the Harmony layer)."""
    for step in generate_tokens(model, prompt, max_tokens=max_tokens, prefill_chunk=chunk):
        yield step.token


def mlx_lm_tokens(model: nn.Module, prompt: mx.array, max_tokens: int, chunk: int) -> Iterator[int]:
    """mlx-lm's `generate_step` as its `stream_generate` runs it (on its own stream, under the
    wired-memory limit; Metal only), without the detokenizer."""
    from mlx_lm.generate import generate_step, generation_stream, wired_limit

    with wired_limit(model, [generation_stream]):
        for token, _ in generate_step(prompt, model, max_tokens=max_tokens, prefill_step_size=chunk):
            yield token


RUNNERS: dict[str, Runner] = {"relief": relief_tokens, "mlx-lm": mlx_lm_tokens}


@dataclass(frozen=True)
class Run:
    """One timed generation."""

    ttft_s: float
    """From the call to the first token: prefill plus the first sample."""
    decode_s: float
    """From the first token to the last."""
    tokens: int
    prefill_peak: int
    """Peak memory (bytes) up to the first token."""
    decode_peak: int
    """Peak memory (bytes) after it."""


def timed_run(runner: Runner, model: nn.Module, prompt: mx.array, max_tokens: int, chunk: int) -> Run:
    """Time one generation. The clock stops when the last token is handed over: work a runner
    queues after it (mlx-lm computes one token past `max_tokens`) is waited for, not counted."""
    mx.synchronize()
    mx.reset_peak_memory()
    count, prefill_peak = 0, 0
    start = first = last = time.perf_counter()
    for _ in runner(model, prompt, max_tokens, chunk):
        last = time.perf_counter()
        count += 1
        if count == 1:
            first = last
            prefill_peak = mx.get_peak_memory()
            mx.reset_peak_memory()
    mx.synchronize()
    return Run(first - start, last - first, count, prefill_peak, mx.get_peak_memory())


def random_prompt(length: int, seed: int) -> mx.array:
    """`length` ordinary token ids (below the special tokens), the same for a given seed."""
    return mx.array(np.random.default_rng([seed, length]).integers(0, BOS_ID, size=length), dtype=mx.int32)


def bench_generation(models: dict[str, nn.Module], prompt_lengths: Sequence[int],
                     gen_lengths: Sequence[int], trials: int, chunk: int, seed: int = 0,
                     say: Say | None = None) -> dict[str, dict]:
    """{runner: {"prefill": [row per prompt length], "decode": [row per generation length]}},
    each runner ("relief", "mlx-lm") on its model.

    Prefill rows time a one-token generation after each prompt length; decode rows time the G
    tokens that follow the first one after the shortest prompt. Each runner first runs once
    per prompt length untimed (allocation, kernel compilation).
    """
    say = say or (lambda message: None)
    prompts = {p: random_prompt(p, seed) for p in prompt_lengths}
    decode_prompt = min(prompt_lengths)
    for name, model in models.items():
        say(f"generation: warm-up ({name})")
        for p in prompt_lengths:
            timed_run(RUNNERS[name], model, prompts[p], 2, chunk)

    out: dict[str, dict] = {name: {"prefill": [], "decode": []} for name in models}
    for p in prompt_lengths:
        say(f"generation: prefill {p} tokens x {trials} trials")
        runs = _trials(models, trials, prompts[p], 1, chunk)
        for name, rs in runs.items():
            out[name]["prefill"].append({
                "prompt_tokens": p,
                "tokens_per_s": summarize([p / r.ttft_s for r in rs]),
                "ttft_s": summarize([r.ttft_s for r in rs]),
                "peak_memory_bytes": max(r.prefill_peak for r in rs),
            })
    for g in gen_lengths:
        say(f"generation: decode {g} tokens after {decode_prompt} x {trials} trials")
        runs = _trials(models, trials, prompts[decode_prompt], g + 1, chunk)
        for name, rs in runs.items():
            out[name]["decode"].append({
                "prompt_tokens": decode_prompt,
                "generated_tokens": g,
                "tokens_per_s": summarize([g / r.decode_s for r in rs]),
                "peak_memory_bytes": max(r.decode_peak for r in rs),
            })
    return out


def _trials(models: dict[str, nn.Module], trials: int, prompt: mx.array, max_tokens: int,
            chunk: int) -> dict[str, list[Run]]:
    runners = list(models)
    runs: dict[str, list[Run]] = {name: [] for name in runners}
    for trial in range(trials):
        for name in runners if trial % 2 == 0 else runners[::-1]:  # neither always runs first
            run = timed_run(RUNNERS[name], models[name], prompt, max_tokens, chunk)
            if run.tokens != max_tokens:
                raise RuntimeError(f"{name} generated {run.tokens} tokens, asked for {max_tokens}")
            runs[name].append(run)
    return runs
