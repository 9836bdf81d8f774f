"""Sampling: one step's logits -> the next token, lazily (nothing here forces an evaluation).

Order of operations, as in Hugging Face's `generate`: repetition penalty on the raw logits,
then temperature, then top-k, top-p and min-p on the tempered distribution, then a draw.
Temperature 0 is greedy (argmax after the penalty), so it matches mlx-lm's greedy sampler.
A reported log-probability is the model's own (log-softmax of the raw logits), the number
you would compare across samplers, not the filtered distribution's.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from ..errors import ReliefError


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; every field matches a `relief generate` option."""

    temperature: float = 0.0
    """0 is greedy; higher values flatten the distribution."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability adds up to top_p; 1 keeps all."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    min_p: float = 0.0
    """Keep tokens at least min_p times as likely as the most likely one; 0 keeps all."""
    repetition_penalty: float = 1.0
    """Divide positive (multiply negative) logits of recently seen tokens by this; 1 is off."""
    repetition_context: int = 64
    """How many of the latest tokens (prompt included) the penalty looks at."""
    seed: int | None = None
    """Seed of the draws; None draws a fresh seed. Greedy decoding ignores it."""

    def __post_init__(self) -> None:
        _check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
               self.temperature, "0 (greedy) or a positive number")
        _check(0 < self.top_p <= 1, "top-p", self.top_p, "in (0, 1] (1 turns it off)")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top-k", self.top_k,
               "a whole number, 0 (off) or more")
        _check(0 <= self.min_p < 1, "min-p", self.min_p, "in [0, 1) (0 turns it off)")
        _check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition-penalty", self.repetition_penalty, "a positive number (1 turns it off)")
        _check(isinstance(self.repetition_context, int) and self.repetition_context >= 1,
               "repetition-context", self.repetition_context, "a whole number, 1 or more")
        _check(self.seed is None or (isinstance(self.seed, int) and self.seed >= 0), "seed",
               self.seed, "a whole number, 0 or more")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, name: str, value: object, want: str) -> None:
    if not ok:
        raise ReliefError(f"{name} {value!r} is not valid; use {want}")


class Sampler:
    """Chooses tokens for one sequence, or for B rows decoded together, each row with its own
    settings, random key and recent tokens.

    `config` is one `SamplingConfig` for every row or one per row; `prompt` is one sequence's ids
    (L,), or a list of B prompts. `sampler(logits)` takes (B, V) logits (B = 1 for one sequence)
    and returns the tokens (B,) and, when asked for, their log-probabilities (B,); both lazy. A
    row draws with its own key, so its tokens do not depend on the batch it is in; rows join
    (`extend`) and leave (`filter`) as the batch changes.
    """

    def __init__(self, config: SamplingConfig | Sequence[SamplingConfig], prompt: mx.array | Sequence[Sequence[int]],
                 logprobs: bool = False):
        prompts = [prompt.tolist()] if isinstance(prompt, mx.array) else [list(p) for p in prompt]
        configs = [config] * len(prompts) if isinstance(config, SamplingConfig) else list(config)
        if len(configs) != len(prompts):
            raise ReliefError(f"{len(configs)} sampling settings for {len(prompts)} prompts; pass one per prompt")
        self.logprobs = logprobs
        self.rows = [_Row(c, p) for c, p in zip(configs, prompts, strict=True)]

    def __call__(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        raw = logits
        if any(r.recent is not None for r in self.rows):
            logits = mx.concatenate([r.penalize(logits[b:b + 1]) for b, r in enumerate(self.rows)])
        token = mx.argmax(logits, axis=-1)  # (B,): every greedy row's choice
        if not all(r.config.greedy for r in self.rows):
            token = mx.concatenate([token[b:b + 1] if r.config.greedy else r.draw(logits[b:b + 1])
                                    for b, r in enumerate(self.rows)])
        for b, r in enumerate(self.rows):
            r.saw(token[b:b + 1])
        if not self.logprobs:
            return token, None
        raw = raw.astype(mx.float32)
        logprob = mx.take_along_axis(raw, token[:, None], axis=-1)[:, 0] - mx.logsumexp(raw, axis=-1)
        return token, logprob

    def filter(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (indices into the current batch), when the batch drops rows."""
        self.rows = [self.rows[i] for i in rows]

    def extend(self, other: Sampler) -> None:
        """Append `other`'s rows after this sampler's, when rows join the batch."""
        self.rows += other.rows


class _Row:
    """One row's settings, random key and (with a repetition penalty) its recent tokens (1, n)."""

    def __init__(self, config: SamplingConfig, prompt: Sequence[int]):
        self.config = config
        self.key = mx.random.key(config.seed if config.seed is not None else secrets.randbits(63))
        penalized = config.repetition_penalty != 1.0
        self.recent = mx.array([list(prompt)[-config.repetition_context:]], dtype=mx.int32) if penalized else None

    def penalize(self, logits: mx.array) -> mx.array:
        if self.recent is None:
            return logits
        return repetition_penalty(logits, self.recent, self.config.repetition_penalty)

    def draw(self, logits: mx.array) -> mx.array:
        self.key, key = mx.random.split(self.key)
        return mx.random.categorical(filtered(logits, self.config), key=key)

    def saw(self, token: mx.array) -> None:
        if self.recent is not None:
            self.recent = mx.concatenate([self.recent, token[None].astype(mx.int32)], axis=1)
            self.recent = self.recent[:, -self.config.repetition_context:]


def repetition_penalty(logits: mx.array, recent: mx.array, penalty: float) -> mx.array:
    """Make the tokens in `recent` (n,), or row b's in `recent[b]` (B, n), less likely in
    `logits` (B, V), CTRL-style."""
    recent = recent[None] if recent.ndim == 1 else recent
    seen = mx.take_along_axis(logits, recent, axis=-1)  # (B, n)
    seen = mx.where(seen < 0, seen * penalty, seen / penalty)
    return mx.put_along_axis(logits, recent, seen, axis=-1)


def filtered(logits: mx.array, config: SamplingConfig) -> mx.array:
    """Tempered logits (B, V) with the tokens that top-k, top-p and min-p drop set to -inf."""
    logits = logits.astype(mx.float32) / config.temperature
    drop = mx.array(-mx.inf, mx.float32)
    if 0 < config.top_k < logits.shape[-1]:
        at = logits.shape[-1] - config.top_k
        kth = mx.partition(logits, at, axis=-1)[:, at:at + 1]  # the k-th largest logit
        logits = mx.where(logits < kth, drop, logits)
    if config.top_p < 1:
        order = mx.argsort(-logits, axis=-1)
        probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
        mass_before = mx.cumsum(probs, axis=-1) - probs  # the most likely token always stays
        keep_sorted = mass_before < config.top_p
        keep = mx.put_along_axis(mx.zeros(logits.shape, mx.bool_), order, keep_sorted, axis=-1)
        logits = mx.where(keep, logits, drop)
    if config.min_p > 0:
        floor = mx.max(logits, axis=-1, keepdims=True) + math.log(config.min_p)
        logits = mx.where(logits < floor, drop, logits)
    return logits
