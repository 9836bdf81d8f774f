"""Answer a JSONL file of prompts, one after another, into a JSONL file written atomically.

Each input line is `{"prompt": "..."}` or `{"messages": [{"role": ..., "content": ...}, ...]}`,
with optional `"system"` (with "prompt") and `"id"`. Each output line answers the input line
of the same number (`"line"`, `"id"`, then `Answer.to_dict()`), or says why it could not
(`"error"`); a bad line never stops the others.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ReliefError
from ..io import atomic_path
from .engine import Answer, Engine, GenerateConfig, answer


@dataclass
class BatchResult:
    out: Path
    answered: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)
    """(line number, reason) of every line that got no answer."""


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
                on_answer: Callable[[int, Answer | None, str | None], None] | None = None) -> BatchResult:
    """Answer every line of `prompts` into `out`; `on_answer(line, answer, error)` after each."""
    prompts = Path(prompts)
    try:
        lines = prompts.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ReliefError(f"cannot read {prompts} ({e}); pass a UTF-8 JSONL file") from e
    result = BatchResult(Path(out))
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record: dict = {"line": number}
        try:
            messages, record_id = request_messages(line)
            if record_id is not None:
                record["id"] = record_id
            reply = answer(engine, messages, config)
        except ReliefError as e:
            record["error"] = str(e)
            result.failed.append((number, str(e)))
            reply = None
        else:
            record |= reply.to_dict()
            result.answered += 1
        records.append(record)
        if on_answer is not None:
            on_answer(number, reply, record.get("error"))
    if not records:
        raise ReliefError(f"{prompts} holds no prompts; write one JSON object per line")
    with atomic_path(out) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return result
