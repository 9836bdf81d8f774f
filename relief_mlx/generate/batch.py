"""Answer a JSONL file of prompts, `batch_size` at a time, into a JSONL file written atomically.

Each input line is `{"prompt": "..."}` or `{"messages": [{"role": ..., "content": ...}, ...]}`,
with optional `"system"` (with "prompt") and `"id"`. Each output line answers the input line
of the same number (`"line"`, `"id"`, then `Answer.to_dict()`), or says why it could not
(`"error"`); a bad line never stops the others.

Good lines are rendered and gathered in input order; every `batch_size` of them are decoded
together by `generate_batch` (one forward pass per step for the whole group), each row until
its `<|return|>` or `<|call|>`, its max tokens or the end of the context, then parsed by its own
`HarmonyStream`. A group of one goes through `engine.complete`, exactly as a single prompt does.
`--moe-stats` and `--check-routing` watch one sequence, so they make every group one. A batched
answer's prefill and decode tokens/s are its group's: all the group's tokens over its time.
Records and `on_answer` calls follow input order. `answer_prompts` is the same decoding for
rendered prompts held in memory (what `relief eval` answers with).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..data.harmony import STOP_IDS
from ..errors import ReliefError
from ..io import atomic_path
from .engine import Answer, Engine, GenerateConfig, check_context, complete, finish_reason
from .harmony_stream import parse_tokens
from .loop import Step, generate_batch

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
    result = BatchResult(Path(out))
    requests: list[_Request] = []
    waiting: list[_Request] = []  # rendered, not answered yet
    reported = 0  # requests[:reported] went to on_answer
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        request = _read(engine, number, line, config)
        requests.append(request)
        if request.error is None:
            waiting.append(request)
        if len(waiting) == batch_size:
            _answer(engine, waiting, config)
            waiting, reported = [], _report(requests, reported, result, on_answer)
    if not requests:
        raise ReliefError(f"{prompts} holds no prompts; write one JSON object per line")
    _answer(engine, waiting, config)
    _report(requests, reported, result, on_answer)
    with atomic_path(out) as tmp:
        tmp.write_text("".join(json.dumps(r.record(), ensure_ascii=False) + "\n" for r in requests),
                       encoding="utf-8")
    return result


def answer_prompts(engine: Engine, prompts: Sequence[Sequence[int]], config: GenerateConfig,
                   batch_size: int = 8) -> Iterator[tuple[int, Answer]]:
    """Answer rendered prompts (`engine.render` ids), `batch_size` decoded together; yield
    (index in `prompts`, answer) as each answer is done. A prompt too long for the context raises."""
    for start in range(0, len(prompts), batch_size):
        group = [_Request(start + i, prompt=list(p)) for i, p in enumerate(prompts[start:start + batch_size])]
        for request in group:
            check_context(len(request.prompt), engine.context_length)
        _answer(engine, group, config)
        for request in group:
            if request.error is not None:
                raise ReliefError(f"prompt {request.line}: {request.error}")
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


def _answer(engine: Engine, requests: list[_Request], config: GenerateConfig) -> None:
    """Fill in the answers of `requests`: one alone by `complete`, more together."""
    if len(requests) == 1:
        try:
            requests[0].answer = complete(engine, requests[0].prompt, config)
        except ReliefError as e:
            requests[0].error = str(e)
    elif requests:
        _answer_together(engine, requests, config)


def _answer_together(engine: Engine, requests: list[_Request], config: GenerateConfig) -> None:
    """Decode `requests` as one batch, each row until a stop token, `max_tokens` or the context's end."""
    prompts = [r.prompt for r in requests]
    limits = [min(config.max_tokens, engine.context_length - len(p)) for p in prompts]
    generated: list[list[Step]] = [[] for _ in requests]
    mx.reset_peak_memory()
    for steps in generate_batch(engine.model, prompts, max_tokens=limits, stop_tokens=STOP_IDS,
                                sampling=config.sampling, logprobs=config.logprobs,
                                prefill_chunk=config.prefill_chunk):
        for row, step in steps.items():
            generated[row].append(step)
    peak_gb = mx.get_peak_memory() / 1e9
    last = [row[-1] for row in generated]
    prefill_s, decode_s = last[0].prefill_s, max(s.decode_s for s in last)  # every row's first step is the same
    prefill_tps = sum(map(len, prompts)) / prefill_s if prefill_s > 0 else 0.0
    decode_tps = sum(s.n - 1 for s in last) / decode_s if decode_s > 0 else 0.0
    for request, steps, limit in zip(requests, generated, limits, strict=True):
        tokens = [s.token for s in steps]
        stream = parse_tokens(tokens, engine.harmony.decode)
        request.answer = Answer(
            final=stream.text("final"), analysis=stream.text("analysis"), commentary=stream.text("commentary"),
            messages=stream.messages, tokens=tokens,
            logprobs=[s.logprob for s in steps] if config.logprobs else None,
            finish_reason=finish_reason(tokens, limit, config.max_tokens), prompt_tokens=len(request.prompt),
            prefill_tps=prefill_tps, decode_tps=decode_tps, peak_memory_gb=peak_gb,
        )


def _report(requests: list[_Request], start: int, result: BatchResult, on_answer: OnAnswer | None) -> int:
    """Count `requests[start:]`, all finished, into `result`, tell `on_answer` about each, and
    return how many requests are reported now."""
    for request in requests[start:]:
        if request.error is None:
            result.answered += 1
        else:
            result.failed.append((request.line, request.error))
        if on_answer is not None:
            on_answer(request.line, request.answer, request.error)
    return len(requests)
