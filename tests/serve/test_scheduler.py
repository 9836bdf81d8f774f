"""The scheduler in-process, over a scripted model whose rows each follow an exact token script
(so an answer can hold two Harmony messages): channels routed to content and reasoning, a full
queue refused with 429, a stopped scheduler with 503."""

from __future__ import annotations

import asyncio
import time

import pytest
from serve_helpers import ScriptedRows, script

from relief_mlx.generate.engine import Engine
from relief_mlx.serve.protocol import ApiError, Job
from relief_mlx.serve.scheduler import Done, Event, Scheduler


def scheduler(tok, tokens: list[int], **limits) -> Scheduler:
    return Scheduler(Engine(ScriptedRows(tokens), tok), {"base": None}, **limits)


async def run(s: Scheduler, job: Job, prompt: list[int], max_tokens: int = 50) -> tuple[list[Event], Done]:
    ticket = s.submit(job, "base", prompt, 0, max_tokens)
    events = []
    while True:
        item = await ticket.events.get()
        if isinstance(item, Done):
            return events, item
        events.append(item)


def test_analysis_goes_to_reasoning_and_final_to_content(harmony_tokenizer):
    s = scheduler(harmony_tokenizer, script(harmony_tokenizer))
    s.start()
    try:
        job = Job(model="base", messages=[], stop=("it.",))
        events, done = asyncio.run(run(s, job, [1, 2, 3]))
        plain_events, plain = asyncio.run(run(s, Job(model="base", messages=[]), [1, 2, 3]))
    finally:
        s.stop()
    assert "".join(e.reasoning for e in plain_events) == "Think." == plain.completion.reasoning
    assert "".join(e.content for e in plain_events) == "Boil it." == plain.completion.content
    assert plain.completion.reasoning_tokens == len(harmony_tokenizer.encode("Think."))
    assert plain.completion.finish_reason == "stop" and plain.completion.completion_tokens == len(script(
        harmony_tokenizer))
    assert done.completion.content == "Boil " == "".join(e.content for e in events)  # cut at the stop string
    assert done.completion.completion_tokens < plain.completion.completion_tokens  # the row left at once
    assert s.counters.served == 2 and s.counters.cached_tokens == 2  # the second prompt reused the first


def test_a_full_queue_is_429_and_a_stopped_scheduler_503(harmony_tokenizer):
    s = scheduler(harmony_tokenizer, [], max_batch=1, max_queue=1)  # the script is empty: filler forever
    s.start()

    async def main() -> None:
        first = s.submit(Job(model="base", messages=[]), "base", [1, 2], 0, 10**6)
        deadline = time.monotonic() + 10
        while not s.health()["rows"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        second = s.submit(Job(model="base", messages=[]), "base", [1, 2], 0, 5)  # waits for the row
        with pytest.raises(ApiError) as e:
            s.submit(Job(model="base", messages=[]), "base", [1, 2], 0, 5)
        assert e.value.status == 429 and e.value.body()["error"]["code"] == "rate_limit_exceeded"
        s.cancel(first)
        while not isinstance(await second.events.get(), Done):
            pass

    asyncio.run(main())
    assert s.counters.rejected == 1 and s.counters.cancelled == 1 and s.counters.served == 1
    s.stop()
    with pytest.raises(ApiError) as e:
        asyncio.run(run(s, Job(model="base", messages=[]), [1]))
    assert e.value.status == 503
