"""The generation loop: prefill the prompt in chunks, then decode one token at a time.

`generate_tokens` is a generator of `Step`s (token id, log-probability, timings) and nothing
else: detokenizing, stop rules and Harmony parsing wrap it (`engine.py`); a caller stops by
no longer iterating. While the caller handles token n, token n+1 is already being computed
(`mx.async_eval`), as in mlx-lm's `generate_step`.

Caches are the model's own (`model.make_cache()`: mlx-lm's `KVCache` on full-attention layers,
`RotatingKVCache(128)` on sliding-window layers; attention sinks live in the attention
blocks). Prefill feeds all prompt tokens but the last in chunks and evaluates only the caches,
so the last layer's attention output and experts never run for those positions (MLX computes
what is asked for); the last prompt token then goes through like a decode step. The
full-vocabulary log-softmax is computed only when log-probabilities are asked for.

`generate_batch` decodes B prompts together, one forward pass per step for all of them. The
prompts are left-padded to the longest, so every row's last prompt token sits in the same
column and each step appends one column. mlx-lm's batch caches (`BatchKVCache`,
`BatchRotatingKVCache`, what the model's own caches `merge` into) know each row's padding: the
mask hides the pad columns and the RoPE offset of row b starts at minus its padding, so a row
sees the same positions and keys as alone. As in `generate_tokens`, step n+1 is queued before
step n is read. A finished row is then dropped from the caches (`filter`), from the queued step
and from the sampler, and costs nothing afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import ReliefError
from .sampling import Sampler, SamplingConfig

DEFAULT_PREFILL_CHUNK = 512


@dataclass(frozen=True)
class Step:
    """One generated token and the timings so far."""

    token: int
    logprob: float | None
    """log p(token) under the model, when `logprobs=True`."""
    n: int
    """Tokens generated so far, this one included (1 for the first)."""
    prompt_tokens: int
    prefill_s: float
    """Seconds from the call to the first token (prompt processing + first sample)."""
    decode_s: float
    """Seconds from the first token to this one."""

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens per second of the decode phase (the first token belongs to prefill)."""
        return (self.n - 1) / self.decode_s if self.decode_s > 0 else 0.0


def feed(model: nn.Module, tokens: Sequence[int] | mx.array, cache: list[Any], chunk: int) -> None:
    """Run `tokens` (ids (L,), or rows (B, L)) through the model into `cache`, `chunk` columns at a
    time, evaluating only the K/V: the last layer's output is never computed. Each chunk's
    activations go back to the OS (`mx.clear_cache`, as mlx-lm does), not into MLX's buffer
    cache, which on a 16-32 GB Mac would otherwise hold them beside a 13 GB model."""
    tokens = tokens if isinstance(tokens, mx.array) else mx.array(tokens, dtype=mx.int32)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    for start in range(0, tokens.shape[1], chunk):
        model.model(tokens[:, start:start + chunk], cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()


def prefill(model: nn.Module, prompt: mx.array, cache: list[Any], chunk: int) -> mx.array:
    """Feed `prompt` (L,) to the model, filling `cache`; return the logits (1, V) that predict
    the token after the prompt."""
    feed(model, prompt[:-1], cache, chunk)
    return decode(model, prompt[-1:], cache)


def decode(model: nn.Module, token: mx.array, cache: list[Any]) -> mx.array:
    """One token (1,) in, the logits (1, V) of the next one out; `cache` grows by one."""
    return model(token[None], cache=cache)[:, -1, :]


def generate_tokens(
    model: nn.Module,
    prompt: Sequence[int] | mx.array,
    *,
    max_tokens: int,
    sampling: SamplingConfig | None = None,
    logprobs: bool = False,
    cache: list[Any] | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[Step]:
    """Yield up to `max_tokens` tokens that continue `prompt` (token ids).

    `cache` defaults to a fresh `model.make_cache()`; pass one to keep it afterwards.
    Stop rules are the caller's: break out of the loop when a stop token arrives.
    """
    prompt = mx.array(prompt, dtype=mx.int32) if not isinstance(prompt, mx.array) else prompt
    if prompt.ndim != 1 or prompt.size == 0:
        raise ReliefError("the prompt has no tokens; pass at least one token")
    if max_tokens < 1 or prefill_chunk < 1:
        raise ReliefError(f"max_tokens {max_tokens} and prefill_chunk {prefill_chunk} must be 1 or more")
    cache = model.make_cache() if cache is None else cache
    sample = Sampler(sampling or SamplingConfig(), prompt, logprobs)

    start = time.perf_counter()
    token, logprob = sample(prefill(model, prompt, cache, prefill_chunk))
    mx.async_eval(token, logprob)
    first = None
    for n in range(1, max_tokens + 1):
        if n < max_tokens:  # queue token n+1 before waiting for token n
            next_token, next_logprob = sample(decode(model, token, cache))
            mx.async_eval(next_token, next_logprob)
        value = token.item()
        now = time.perf_counter()
        first = first or now
        yield Step(value, logprob.item() if logprob is not None else None, n, prompt.size,
                   first - start, now - first)
        if n < max_tokens:
            token, logprob = next_token, next_logprob


def batch_cache(model: nn.Module, left_padding: list[int]) -> list[Any]:
    """Empty caches for B left-padded rows: each of the model's caches merged into its batch
    version (KVCache -> BatchKVCache, RotatingKVCache -> BatchRotatingKVCache), told the padding."""
    caches = []
    for single in model.make_cache():
        if not hasattr(single, "merge"):
            raise ReliefError(f"the model's {type(single).__name__} has no batch version; use batch size 1")
        batch = single.merge([single] * len(left_padding))  # empty, so no keys are copied
        batch.prepare(left_padding=left_padding)
        caches.append(batch)
    return caches


def prefill_batch(model: nn.Module, tokens: mx.array, cache: list[Any], chunk: int) -> mx.array:
    """`prefill` for left-padded rows `tokens` (B, L): the logits (B, V) after each row's prompt."""
    feed(model, tokens[:, :-1], cache, chunk)
    return decode_batch(model, tokens[:, -1], cache)


def decode_batch(model: nn.Module, tokens: mx.array, cache: list[Any]) -> mx.array:
    """One token per row (B,) in, the logits (B, V) of each row's next one out."""
    return model(tokens[:, None], cache=cache)[:, -1, :]


def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int | Sequence[int],
    stop_tokens: Collection[int] = (),
    sampling: SamplingConfig | None = None,
    logprobs: bool = False,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[dict[int, Step]]:
    """Continue every prompt (token ids) at once; yield, per step, {row: Step} of the rows still going.

    Row i ends with its `max_tokens[i]`-th token (an int: the same for all) or with a token of
    `stop_tokens` (yielded); it is then dropped from the batch. A Step's `prompt_tokens` is its
    row's, its timings are the batch's.
    """
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if not prompts or any(len(p) == 0 for p in prompts) or len(limits) != len(prompts):
        raise ReliefError("pass one or more prompts, each with at least one token, and one max_tokens per prompt")
    if min(limits) < 1 or prefill_chunk < 1:
        raise ReliefError(f"max_tokens {min(limits)} and prefill_chunk {prefill_chunk} must be 1 or more")
    width = max(len(p) for p in prompts)
    padding = [width - len(p) for p in prompts]
    padded = mx.array([[0] * pad + list(p) for pad, p in zip(padding, prompts, strict=True)], dtype=mx.int32)  # (B, L)
    cache = batch_cache(model, padding)
    sample = Sampler(sampling or SamplingConfig(), prompts, logprobs)

    start = time.perf_counter()
    token, logprob = sample(prefill_batch(model, padded, cache, prefill_chunk))  # (B,), (B,) or None
    mx.async_eval(token, logprob)
    rows, counts, first = list(range(len(prompts))), [0] * len(prompts), None
    while rows:
        if any(counts[r] + 1 < limits[r] for r in rows):  # queue step n+1 before waiting for step n
            next_token, next_logprob = sample(decode_batch(model, token, cache))
            mx.async_eval(next_token, next_logprob)
        values, scores = token.tolist(), logprob.tolist() if logprob is not None else [None] * len(rows)
        now = time.perf_counter()
        first = first or now
        steps = {}
        for r, value, score in zip(rows, values, scores, strict=True):
            counts[r] += 1
            steps[r] = Step(value, score, counts[r], len(prompts[r]), first - start, now - first)
        yield steps
        keep = [i for i, r in enumerate(rows) if counts[r] < limits[r] and steps[r].token not in stop_tokens]
        if keep and len(keep) < len(rows):  # drop the finished rows from everything that has a batch axis
            index = mx.array(keep)
            for c in cache:
                c.filter(index)
            sample.filter(index)
            next_token = next_token[index]
            next_logprob = next_logprob[index] if next_logprob is not None else None
        rows = [rows[i] for i in keep]
        if rows:
            token, logprob = next_token, next_logprob
