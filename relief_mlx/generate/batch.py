"""Answer a JSONL file of prompts, `batch_size` at a time, into a JSONL file written atomically.

Each input line is `{"prompt": "..."}` or `{"messages": [{"role": ..., "content": ...}, ...]}`,
with optional `"system"` (with "prompt") and `"id"`. Each output line answers the input line
of the same number (`"line"`, `"id"`, then `Answer.to_dict()`), or says why it could not
(`"error"`); a bad line never stops the others.

Good lines are rendered, then decoded `batch_size` at a time by a `BatchDecoder` (continuous
batching: one forward pass per step for every row; when a row ends, the next line joins at the
next step, so a long answer never holds the others back). Each row's steps go to its own
`AnswerStream`, which parses them and applies the same stop rule as a single prompt. With
`batch_size` 1 each line goes through `engine.complete`, exactly as a single prompt does;
`--moe-stats` and `--check-routing` watch one sequence, so they make it 1. A batched answer's
prefill tokens/s count from its line's turn to join (waiting included), its decode tokens/s are
the rate its own tokens arrived at. Records and `on_answer` calls follow input order.
`answer_prompts` is the same decoding for rendered prompts held in memory (what `relief eval`
answers with).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..errors import ReliefError
from ..io import atomic_path
from .engine import Answer, AnswerStream, Engine, GenerateConfig, check_context, complete
from .loop import BatchDecoder

OnAnswer = Callable[[int, Answer | None, str | None], None]


@dataclass
class BatchResult:
    out: Path
    answered: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)
    """(line number, reason) of every line that got no answer."""


@dataclass
class _Request:
    """One non-blank input line, from its prompt ids to its answer or error."""

    line: int
    id: object = None
    prompt: list[int] = field(default_factory=list)
    answer: Answer | None = None
    error: str | None = None

    def record(self) -> dict:
        head = {"line": self.line} | ({"id": self.id} if self.id is not None else {})
        return head | ({"error": self.error} if self.error is not None else self.answer.to_dict())


def conversation(prompt: str, system: str | None = None) -> list[dict]:
    """The messages of a one-shot prompt (with an optional system/developer instruction)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ReliefError("the prompt is empty; pass some text")
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": prompt}]


def request_messages(line: str) -> tuple[list[dict], object]:
    """Messages and id of one JSONL line; ReliefError says what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ReliefError(f"not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
        raise ReliefError('each line must be an object with "prompt" (text) or "messages" (a list)')
    if "prompt" in record:
        return conversation(record["prompt"], record.get("system")), record.get("id")
    return record["messages"], record.get("id")


def answer_file(engine: Engine, prompts: str | Path, out: str | Path, config: GenerateConfig,
                batch_size: int = 8, on_answer: OnAnswer | None = None) -> BatchResult:
    """Answer every line of `prompts` into `out`, decoding `batch_size` prompts together (1: one
    after another); `on_answer(line, answer, error)` after each line, in line order."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ReliefError(f"batch-size {batch_size!r} is not valid; use a whole number, 1 or more")
    if config.moe_stats or config.check_routing:
        batch_size = 1  # the routing probe watches one sequence
    prompts = Path(prompts)
    try:
        lines = prompts.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ReliefError(f"cannot read {prompts} ({e}); pass a UTF-8 JSONL file") from e
    requests = [_read(engine, number, line, config) for number, line in enumerate(lines, start=1) if line.strip()]
    if not requests:
        raise ReliefError(f"{prompts} holds no prompts; write one JSON object per line")
    result, reported = BatchResult(Path(out)), 0  # requests[:reported] went to on_answer

    def report() -> None:
        nonlocal reported
        reported = _report(requests, reported, result, on_answer)

    good = [r for r in requests if r.error is None]
    report()  # leading bad lines
    if batch_size == 1:
        for request in good:
            try:
                request.answer = complete(engine, request.prompt, config)
            except ReliefError as e:
                request.error = str(e)
            report()
    else:
        for _ in _answer_together(engine, good, config, batch_size):
            report()
    with atomic_path(out) as tmp:
        tmp.write_text("".join(json.dumps(r.record(), ensure_ascii=False) + "\n" for r in requests),
                       encoding="utf-8")
    return result


def answer_prompts(engine: Engine, prompts: Sequence[Sequence[int]], config: GenerateConfig,
                   batch_size: int = 8) -> Iterator[tuple[int, Answer]]:
    """Answer rendered prompts (`engine.render` ids), `batch_size` decoded together; yield
    (index in `prompts`, answer) as each answer is done. A prompt too long for the context raises."""
    requests = [_Request(i, prompt=list(p)) for i, p in enumerate(prompts)]
    for request in requests:
        check_context(len(request.prompt), engine.context_length)
    for request in _answer_together(engine, requests, config, batch_size):
        yield request.line, request.answer


def _read(engine: Engine, number: int, line: str, config: GenerateConfig) -> _Request:
    """The request of one line: its prompt ids, or why there are none."""
    request = _Request(number)
    try:
        messages, request.id = request_messages(line)
        request.prompt = engine.render(messages, config.reasoning)
        check_context(len(request.prompt), engine.context_length)
    except ReliefError as e:
        request.error = str(e)
    return request


def _answer_together(engine: Engine, requests: list[_Request], config: GenerateConfig,
                     batch_size: int) -> Iterator[_Request]:
    """Answer `requests` with up to `batch_size` rows decoding at once, each until the stop rule,
    `max_tokens` or the context's end; a finished row's place goes to the next request. Yields
    each request as its answer is done."""
    decoder = BatchDecoder(engine.model, logprobs=config.logprobs, prefill_chunk=config.prefill_chunk)
    todo, live = iter(requests), {}  # row id -> (request, its AnswerStream)
    mx.reset_peak_memory()
    while True:
        while len(decoder) < batch_size and (request := next(todo, None)) is not None:
            limit = min(config.max_tokens, engine.context_length - len(request.prompt))
            row = decoder.add(request.prompt, max_tokens=limit, sampling=config.sampling)
            live[row] = request, AnswerStream(engine, limit, config.logprobs)
        if not len(decoder):
            return
        for row, step in decoder.step().items():
            request, stream = live[row]
            stream.feed(step)
            if stream.done:
                decoder.remove(row)
                stream.close()
                request.answer = stream.answer(config.max_tokens, len(request.prompt), step.prefill_tps,
                                               step.decode_tps)
                del live[row]
                yield request


def _report(requests: list[_Request], start: int, result: BatchResult, on_answer: OnAnswer | None) -> int:
    """Count the finished requests from `requests[start]` on, up to the first unfinished one, into
    `result`, tell `on_answer` about each, and return how many requests are reported now."""
    for request in requests[start:]:
        if request.answer is None and request.error is None:
            return start
        start += 1
        if request.error is None:
            result.answered += 1
        else:
            result.failed.append((request.line, request.error))
        if on_answer is not None:
            on_answer(request.line, request.answer, request.error)
    return start
