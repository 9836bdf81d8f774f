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
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
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


def prefill(model: nn.Module, prompt: mx.array, cache: list[Any], chunk: int) -> mx.array:
    """Feed `prompt` (L,) to the model, filling `cache`; return the logits (1, V) that predict
    the token after the prompt."""
    for start in range(0, prompt.size - 1, chunk):
        model.model(prompt[None, start:min(start + chunk, prompt.size - 1)], cache=cache)
        mx.eval([c.state for c in cache])  # only K/V: the last layer's output is never computed
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
