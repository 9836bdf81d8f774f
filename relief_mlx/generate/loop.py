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
full-vocabulary log-softmax is computed only when log-probabilities are asked for. `prefill`
and `decode` take rows: (B, L) and (B,), with B = 1 for one sequence.

`BatchDecoder` is continuous batching: rows join (`add`) and leave (`remove`) between steps,
and every step is one forward pass for all rows in the batch. A newcomer is prefilled alone
into the model's own caches (at most `prefill_chunk` prompt tokens per step, so a long prompt
never stalls the others for long), then its caches are merged into their batch versions
(`BatchKVCache`, `BatchRotatingKVCache`) and appended to the batch's (`extend`, as mlx-lm's
`BatchGenerator` does); its last prompt token rides in the next step with the others' tokens.
The batch caches know each row's left padding: the mask hides the pad columns and the RoPE
offset of row b starts at minus its padding, so a row sees the same positions and keys as
alone. A row that leaves is dropped from the caches (`filter`), from the queued step and from
the sampler, and costs nothing afterwards. As in `generate_tokens`, step n+1 is queued before
step n is read, so a row is computed one step past its end. `generate_batch` decodes a fixed
list of prompts with it.

`PromptCache` keeps snapshots of single-sequence caches keyed by the tokens they hold; a prompt
that begins with a snapshot's tokens restores it and prefills only the rest.
"""

from __future__ import annotations

import time
from collections import OrderedDict
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
    reused_tokens: int = 0
    """Leading prompt tokens restored from a `PromptCache` instead of prefilled."""

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


def prefill(model: nn.Module, prompts: mx.array, cache: list[Any], chunk: int) -> mx.array:
    """Feed rows `prompts` (B, L) to the model, filling `cache`; return the logits (B, V) that
    predict the token after each row."""
    feed(model, prompts[:, :-1], cache, chunk)
    return decode(model, prompts[:, -1], cache)


def decode(model: nn.Module, tokens: mx.array, cache: list[Any]) -> mx.array:
    """One token per row (B,) in, the logits (B, V) of each row's next one out; `cache` grows by one."""
    return model(tokens[:, None], cache=cache)[:, -1, :]


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
    _check_limits(max_tokens, prefill_chunk)
    cache = model.make_cache() if cache is None else cache
    sample = Sampler(sampling or SamplingConfig(), prompt, logprobs)

    start = time.perf_counter()
    token, logprob = sample(prefill(model, prompt[None], cache, prefill_chunk))  # (1,), (1,) or None
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


def _check_limits(max_tokens: int, prefill_chunk: int) -> None:
    if not isinstance(max_tokens, int) or max_tokens < 1 or prefill_chunk < 1:
        raise ReliefError(f"max_tokens {max_tokens} and prefill_chunk {prefill_chunk} must be 1 or more")


class PromptCache:
    """Snapshots of a model's caches, each keyed by the tokens it holds; the `capacity` most
    recently used are kept. A snapshot holds each cache's `state` through array handles of its
    own: the caches write K/V in place (`keys[..., i:j, :] = x`), which rebinds the handle it is
    called on, while MLX copies a buffer on write when another array still holds it, so a
    snapshot never sees what is computed after it. Snapshots, not `trim`, because the sliding
    layers' 128-token `RotatingKVCache` has overwritten what trimming would need."""

    def __init__(self, capacity: int = 1):
        if not isinstance(capacity, int) or capacity < 1:
            raise ReliefError(f"prompt cache size {capacity!r} is not valid; use a whole number, 1 or more")
        self.capacity = capacity
        self._snapshots: OrderedDict[tuple[int, ...], list[tuple]] = OrderedDict()

    @property
    def prefixes(self) -> list[tuple[int, ...]]:
        """The token prefixes held, least recently used first."""
        return list(self._snapshots)

    def restore(self, model: nn.Module, prompt: Sequence[int]) -> tuple[list[Any], int]:
        """Fresh caches of `model`, and how many leading tokens of `prompt` they hold already:
        those of the longest snapshot that is a prefix of `prompt`, else none."""
        cache = model.make_cache()
        prompt = tuple(prompt)
        best = max((k for k in self._snapshots if prompt[:len(k)] == k), key=len, default=None)
        if best is None:
            return cache, 0
        self._snapshots.move_to_end(best)
        for layer, state in zip(cache, self._snapshots[best], strict=True):
            layer.state = _own(state)
        return cache, len(best)

    def keep(self, cache: list[Any], tokens: Sequence[int]) -> None:
        """Take a snapshot of `cache`, which holds `tokens`; forget the least recently used beyond capacity."""
        key = tuple(tokens)
        self._snapshots[key] = [_own(layer.state) for layer in cache]
        self._snapshots.move_to_end(key)
        while len(self._snapshots) > self.capacity:
            self._snapshots.popitem(last=False)

    def clear(self) -> None:
        self._snapshots.clear()


def _own(state: tuple) -> tuple:
    """`state` with new handles on the same arrays (`x[:]` shares the buffer, copies nothing)."""
    return tuple(x[:] if isinstance(x, mx.array) else x for x in state)


@dataclass
class _Row:
    """One sequence of a `BatchDecoder`: prefilling while `cache` is set, then in the batch."""

    id: int
    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    cache: list[Any] | None
    fed: int
    """Prompt tokens in `cache` so far."""
    reused: int
    stops: list[int]
    """Prompt positions (ascending) where a snapshot goes to `prompt_cache`."""
    prompt_cache: PromptCache | None
    start: float
    count: int = 0
    first: float | None = None


class BatchDecoder:
    """Continuous batching over one model: `add` rows, `step` them all together, `remove` any.

    `step()` returns {row id: Step} of the rows whose next token it read (a row's first token
    comes one step after its prompt is fed). A row leaves by itself after its `max_tokens`-th
    token; stop rules are the caller's, which calls `remove` (also for a client gone away).
    """

    def __init__(self, model: nn.Module, *, logprobs: bool = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 interleave: bool = True):
        """`interleave`: feed at most `prefill_chunk` waiting prompt tokens per step, so decoding
        rows wait at most one chunk for a newcomer (else every waiting prompt is fed at once)."""
        _check_limits(1, prefill_chunk)
        self.model, self.logprobs, self.prefill_chunk, self.interleave = model, logprobs, prefill_chunk, interleave
        self._next_id = 0
        self._waiting: list[_Row] = []  # prefilling, first come first fed
        self._rows: list[_Row] = []  # in the batch, in batch order
        self._cache: list[Any] | None = None  # batch caches of self._rows
        self._sampler: Sampler | None = None
        self._token: mx.array | None = None  # (in flight,) the queued step's tokens, lazy
        self._logprob: mx.array | None = None
        self._in_flight = 0  # self._rows[:_in_flight] have their next token in self._token
        self._joining = mx.array([], dtype=mx.uint32)  # last prompt tokens of the rows that just joined

    def __len__(self) -> int:
        return len(self._waiting) + len(self._rows)

    @property
    def batch_size(self) -> int:
        """Rows decoding in one forward pass (those still prefilling not counted)."""
        return len(self._rows)

    def add(self, prompt: Sequence[int], *, max_tokens: int, sampling: SamplingConfig | None = None,
            prompt_cache: PromptCache | None = None, snapshots: Sequence[int] = ()) -> int:
        """Queue a prompt (token ids); returns its row id. With `prompt_cache`, start from its
        longest snapshot that prefixes the prompt, and keep snapshots of the prompt but its last
        token and at each position of `snapshots`."""
        prompt = list(prompt)
        if not prompt:
            raise ReliefError("the prompt has no tokens; pass at least one token")
        _check_limits(max_tokens, self.prefill_chunk)
        cache, reused = (prompt_cache.restore(self.model, prompt[:-1]) if prompt_cache is not None
                         else (self.model.make_cache(), 0))
        stops = sorted({s for s in (*snapshots, len(prompt) - 1) if reused < s < len(prompt)}) if prompt_cache else []
        row = _Row(self._next_id, prompt, max_tokens, Sampler(sampling or SamplingConfig(), [prompt], self.logprobs),
                   cache, reused, reused, stops, prompt_cache, time.perf_counter())
        self._next_id += 1
        self._waiting.append(row)
        return row.id

    def remove(self, row_id: int) -> None:
        """Drop a row, waiting or decoding (nothing happens if it is gone already)."""
        self._waiting = [r for r in self._waiting if r.id != row_id]
        keep = [i for i, r in enumerate(self._rows) if r.id != row_id]
        if len(keep) < len(self._rows):
            self._keep(keep)

    def step(self) -> dict[int, Step]:
        """Feed waiting prompts (one chunk), queue the next forward pass for every row, then read
        the tokens of the pass queued by the previous call."""
        self._join(self._prefill())
        reading, token, logprob = list(self._rows[:self._in_flight]), self._token, self._logprob
        if any(r.count + 1 < r.max_tokens for r in reading) or len(self._rows) > len(reading):
            inputs = mx.concatenate([token, self._joining]) if token is not None else self._joining  # (B,)
            self._token, self._logprob = self._sampler(decode(self.model, inputs, self._cache))
            mx.async_eval(self._token, self._logprob)
            self._in_flight = len(self._rows)
        else:
            self._token = self._logprob = None
            self._in_flight = 0
        self._joining = mx.array([], dtype=mx.uint32)
        if not reading:
            return {}
        values = token.tolist()
        scores = logprob.tolist() if logprob is not None else [None] * len(reading)
        now, steps = time.perf_counter(), {}
        for r, value, score in zip(reading, values, scores, strict=True):
            r.count += 1
            r.first = r.first or now
            steps[r.id] = Step(value, score, r.count, len(r.prompt), r.first - r.start, now - r.first, r.reused)
        done = {r.id for r in reading if r.count >= r.max_tokens}
        if done:
            self._keep([i for i, r in enumerate(self._rows) if r.id not in done])
        return steps

    # ------------------------------------------------------------ internals

    def _prefill(self) -> list[_Row]:
        """Feed up to `prefill_chunk` prompt tokens of the waiting rows, in order; return the rows
        whose whole prompt but its last token is in their caches now."""
        budget, ready = self.prefill_chunk if self.interleave else sum(len(r.prompt) for r in self._waiting), []
        while self._waiting and budget > 0:
            row = self._waiting[0]
            end = min(row.stops[0] if row.stops else len(row.prompt) - 1, row.fed + budget)
            if end > row.fed:
                feed(self.model, row.prompt[row.fed:end], row.cache, self.prefill_chunk)
                budget -= end - row.fed
                row.fed = end
            if row.stops and row.fed == row.stops[0]:
                row.prompt_cache.keep(row.cache, row.prompt[:row.fed])
                row.stops.pop(0)
            if row.fed == len(row.prompt) - 1:
                ready.append(self._waiting.pop(0))
        return ready

    def _join(self, rows: list[_Row]) -> None:
        """Move prefilled rows into the batch: their caches merged and appended, their samplers too."""
        if not rows:
            return
        caches = [_merge([r.cache[layer] for r in rows]) for layer in range(len(rows[0].cache))]
        sampler = rows[0].sampler
        for r in rows[1:]:
            sampler.extend(r.sampler)
        if self._cache is None:
            self._cache, self._sampler = caches, sampler
        else:
            for mine, theirs in zip(self._cache, caches, strict=True):
                mine.extend(theirs)
            self._sampler.extend(sampler)
        for r in rows:
            r.cache, r.sampler = None, None
        self._rows += rows
        self._joining = mx.concatenate([self._joining, mx.array([r.prompt[-1] for r in rows], dtype=mx.uint32)])

    def _keep(self, keep: list[int]) -> None:
        """Keep only the batch rows at `keep` (indices), in caches, sampler and the queued step."""
        if not keep:
            self._rows, self._cache, self._sampler, self._token, self._logprob = [], None, None, None, None
            self._in_flight = 0
            return
        index = mx.array(keep)
        for c in self._cache:
            c.filter(index)
        self._sampler.filter(keep)
        queued = [i for i in keep if i < self._in_flight]
        if self._token is not None and len(queued) < self._in_flight:
            self._token = self._token[mx.array(queued)] if queued else None
            self._logprob = self._logprob[mx.array(queued)] if self._logprob is not None and queued else None
        self._in_flight = len(queued)
        self._rows = [self._rows[i] for i in keep]


def _merge(caches: list[Any]) -> Any:
    """Single-sequence caches of one layer -> its batch cache (KVCache -> BatchKVCache, ...)."""
    if not hasattr(caches[0], "merge"):
        raise ReliefError(f"the model's {type(caches[0]).__name__} has no batch version; use batch size 1")
    return caches[0].merge(caches)


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
    """Continue every prompt (token ids) at once; yield, per step, {row: Step} of the rows read.

    Row i ends with its `max_tokens[i]`-th token (an int: the same for all) or with a token of
    `stop_tokens` (yielded). A thin user of `BatchDecoder`: every prompt joins at the start.
    """
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if not prompts or any(len(p) == 0 for p in prompts) or len(limits) != len(prompts):
        raise ReliefError("pass one or more prompts, each with at least one token, and one max_tokens per prompt")
    decoder = BatchDecoder(model, logprobs=logprobs, prefill_chunk=prefill_chunk, interleave=False)
    ids = [decoder.add(p, max_tokens=n, sampling=sampling) for p, n in zip(prompts, limits, strict=True)]
    row_of = {rid: i for i, rid in enumerate(ids)}
    while len(decoder):
        steps = decoder.step()
        if steps:
            yield {row_of[rid]: step for rid, step in steps.items()}
        for rid, step in steps.items():
            if step.token in stop_tokens:
                decoder.remove(rid)
