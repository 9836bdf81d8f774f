"""Continuous batching for the server: one thread owns the model and runs generate/'s `BatchDecoder`.

Requests (`Ticket`s) wait in a first-come queue; between decode steps the thread admits them
while the batch has room (`max_batch` rows), removes rows whose client went away, and feeds every
row's step to its own `AnswerStream` (the same parsing and stop rule as `relief generate`), then
to the `stop` strings. What a step produced goes to the request's asyncio queue through the event
loop (`call_soon_threadsafe`): the thread never waits on a client, so a slow reader only grows its
own queue (bounded by its max tokens), and the others decode on.

Adapters: the model is loaded once; LoRA adapters are applied to it and removed again
(`model.lora`). Rows of one batch share the model, so only requests for the adapter in use join
it; when the oldest waiting request wants another one, admissions stop, the batch drains, and the
adapter is switched. Each adapter has its own prompt cache (K/V depend on the weights): snapshots
of the shared head (system and developer messages) and of each prompt but its last token, so a
follow-up turn or another user with the same instructions prefills only what is new.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..generate.engine import AnswerStream, Engine
from ..generate.harmony_stream import FIRST_SPECIAL
from ..generate.loop import BatchDecoder, PromptCache
from ..model.lora import apply_adapter, remove_adapter
from .protocol import ApiError, Completion, Job, StopText


@dataclass
class Event:
    """New text of one request after a step (any part may be empty)."""

    content: str = ""
    reasoning: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)


@dataclass
class Done:
    completion: Completion


@dataclass
class Ticket:
    """One admitted request: its prompt, limits, and where its events go."""

    job: Job
    adapter: str
    prompt: list[int]
    head: int
    """Prompt tokens before the first user message (a shared prefix worth a snapshot)."""
    max_tokens: int
    deliver: Callable[[Event | Done | ApiError], None]
    events: asyncio.Queue
    """Where `deliver` puts them, read by the request's handler."""
    row: int | None = None
    answer: AnswerStream | None = None
    stop: StopText | None = None
    done: bool = False
    reasoning_tokens: int = 0
    logprobs: list[dict] = field(default_factory=list)
    """One entry per content token, when the request asked for them."""
    cancelled: bool = False


@dataclass
class Counters:
    """What /health reports."""

    served: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0


class Scheduler:
    """The model thread. `submit` from the event loop; `cancel` when a client goes away."""

    def __init__(self, engine: Engine, adapters: dict[str, Path | None], *, max_batch: int = 8,
                 max_queue: int = 64, prompt_cache: int = 8, prefill_chunk: int = 512):
        """`adapters` maps each model id to an adapter folder (None: the base model, first)."""
        self.engine, self.adapters = engine, adapters
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.counters = Counters()
        self.error: str | None = None  # set if the thread itself died
        self._caches = {name: PromptCache(prompt_cache) for name in adapters}
        self._adapter = next(name for name, path in adapters.items() if path is None)
        self._decoder = BatchDecoder(engine.model, logprobs=True, prefill_chunk=prefill_chunk)
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._live: dict[int, Ticket] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="relief-decoder", daemon=True)

    # ------------------------------------------------------------ event-loop side

    def start(self) -> None:
        """Start the model thread. MLX streams belong to the thread that made them, so every lazy
        array the model holds outside its parameters (e.g. RoPE frequencies) is computed here
        first, by one forward pass, or the thread could not evaluate it."""
        import mlx.core as mx

        mx.eval(self.engine.model(mx.array([[0]]), cache=self.engine.model.make_cache()))
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job, adapter: str, prompt: list[int], head: int, max_tokens: int) -> Ticket:
        """Queue a request; its events arrive on `ticket.events` (the last one is `Done` or an
        ApiError). Raises ApiError 503 when the model thread is down, 429 when the queue is full."""
        if self.error is not None or self._stopping or not self._thread.is_alive():
            raise ApiError(503, "the model is not serving (see the server's log); try again later",
                           code="service_unavailable", kind="server_error")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(item: Event | Done | ApiError) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass

        ticket = Ticket(job, adapter, prompt, head, max_tokens, deliver, queue)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                self.counters.rejected += 1
                raise ApiError(429, f"the server's queue is full ({self.max_queue} requests waiting); retry shortly",
                               code="rate_limit_exceeded", kind="requests")
            self._waiting.append(ticket)
        self._wake.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: free its row at the next step (nothing happens once it is done)."""
        if not ticket.done:
            ticket.cancelled = True
            self._wake.set()

    def health(self) -> dict:
        with self._lock:
            waiting = len(self._waiting)
        return {"status": "ok" if self.error is None and self._thread.is_alive() else "unavailable",
                "error": self.error, "models": list(self.adapters), "adapter_in_use": self._adapter,
                "rows": len(self._live), "waiting": waiting, "batch": self._decoder.batch_size,
                "max_batch": self.max_batch, "max_queue": self.max_queue, "counters": vars(self.counters).copy()}

    # ------------------------------------------------------------ model thread

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._drop_cancelled()
                self._admit()
                if not len(self._decoder):
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                for row, step in self._decoder.step().items():
                    self._advance(self._live[row], step)
            except Exception as e:  # noqa: BLE001 - one failed step must not end the server
                traceback.print_exc()
                self._fail_all(f"generation failed ({type(e).__name__}: {e})")
        self._fail_all("the server is shutting down")

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [t for t in self._waiting if t.cancelled]
            self._waiting = collections.deque(t for t in self._waiting if not t.cancelled)
        gone += [t for t in self._live.values() if t.cancelled]
        for ticket in gone:
            self._close(ticket)
            self.counters.cancelled += 1

    def _admit(self) -> None:
        """Admit waiting requests in order while the batch has room and they use the adapter in
        use; switch adapters when the batch is empty and the next request wants another one."""
        while len(self._decoder) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    return
                ticket = self._waiting[0]
                if ticket.adapter != self._adapter and len(self._decoder):
                    return  # it waits for the batch to drain; later requests wait behind it
                self._waiting.popleft()
            if ticket.adapter != self._adapter:
                self._switch(ticket.adapter)
            ticket.answer = AnswerStream(self.engine, ticket.max_tokens)
            ticket.stop = StopText(ticket.job.stop)
            ticket.row = self._decoder.add(ticket.prompt, max_tokens=ticket.max_tokens, sampling=ticket.job.sampling,
                                           prompt_cache=self._caches[ticket.adapter], snapshots=[ticket.head])
            self._live[ticket.row] = ticket

    def _switch(self, adapter: str) -> None:
        remove_adapter(self.engine.model)
        if self.adapters[adapter] is not None:
            apply_adapter(self.engine.model, self.adapters[adapter])
        self._adapter = adapter

    def _advance(self, ticket: Ticket, step: Any) -> None:
        """One generated token of `ticket`: parse it, route its text, finish it when it is over."""
        answer = ticket.answer
        delta = answer.feed(step)
        channel = answer.harmony.channel
        event = Event(token_ids=[step.token])
        if channel is not None and channel != "final" and step.token < FIRST_SPECIAL:
            ticket.reasoning_tokens += 1
        if channel == "final" and step.token < FIRST_SPECIAL and ticket.job.logprobs:
            text = self.engine.harmony.decode([step.token])
            event.logprobs.append({"token": text, "logprob": step.logprob, "bytes": list(text.encode()),
                                   "top_logprobs": []})
            ticket.logprobs += event.logprobs
        self._route(ticket, event, delta)
        if answer.done or ticket.stop.stopped:
            self._route(ticket, event, answer.close())
            event.content += ticket.stop.finish()
            self._send(ticket, event)
            self._finish(ticket)
        else:
            self._send(ticket, event)

    def _route(self, ticket: Ticket, event: Event, delta: Any) -> None:
        if delta is None:
            return
        if delta.channel == "final":
            event.content += ticket.stop.feed(delta.text)
        else:
            event.reasoning += delta.text

    def _send(self, ticket: Ticket, event: Event) -> None:
        if event.content or event.reasoning or ticket.job.return_token_ids or event.logprobs:
            ticket.deliver(event)

    def _finish(self, ticket: Ticket) -> None:
        answer, last = ticket.answer, ticket.answer.last
        reason = answer.finish_reason(ticket.max_tokens)
        completion = Completion(
            content=_clean(answer.harmony.text("final"), ticket.stop), reasoning=_reasoning(answer),
            finish_reason="stop" if ticket.stop.stopped or reason in ("stop", "call") else "length",
            prompt_tokens=len(ticket.prompt), completion_tokens=len(answer.tokens),
            reasoning_tokens=ticket.reasoning_tokens, cached_tokens=last.reused_tokens if last else 0,
            token_ids=list(answer.tokens), logprobs=ticket.logprobs if ticket.job.logprobs else None)
        self.counters.served += 1
        self.counters.prompt_tokens += completion.prompt_tokens
        self.counters.cached_tokens += completion.cached_tokens
        self.counters.generated_tokens += completion.completion_tokens
        self._close(ticket)
        ticket.deliver(Done(completion))

    def _close(self, ticket: Ticket) -> None:
        ticket.done = True
        if ticket.row is not None:
            self._decoder.remove(ticket.row)
            self._live.pop(ticket.row, None)

    def _fail_all(self, message: str) -> None:
        """Every request in flight or waiting gets a 500/503; the decoder starts afresh."""
        with self._lock:
            tickets, self._waiting = [*self._live.values(), *self._waiting], collections.deque()
        self._live.clear()
        self._decoder = BatchDecoder(self.engine.model, logprobs=True, prefill_chunk=self.prefill_chunk)
        status = 503 if self._stopping else 500
        for ticket in tickets:
            ticket.done = True
            self.counters.failed += 1
            ticket.deliver(ApiError(status, message, code="server_error", kind="server_error"))


def _clean(final: str, stop: StopText) -> str:
    """The content a client saw: the final text cut at the first stop string."""
    cut = min((i for i in (final.find(s) for s in stop.stops) if i >= 0), default=-1)
    return final[:cut] if cut >= 0 else final


def _reasoning(answer: AnswerStream) -> str:
    return "\n\n".join(m.content for m in answer.harmony.messages if m.channel != "final" and m.content)
