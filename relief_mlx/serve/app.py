"""The ASGI app (Starlette): routes, authentication, body limits, and errors in OpenAI's shape.

Routes: `POST /v1/chat/completions` and `POST /v1/responses` (streamed as server-sent events or
not), `GET /v1/models`, `GET /health` (counters of the scheduler) and `GET /`, the chat page. A
handler validates the request (`protocol`), renders the conversation exactly as `relief generate`
does (`Engine.render`), checks it against the context and the server's limits, hands it to the
`Scheduler` and relays its events. Every error a client can cause is an `ApiError` answered as
`{"error": {message, type, param, code}}` with its status; anything else is a 500 of the same
shape, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ReliefError
from ..generate.engine import Engine
from . import protocol as p
from .protocol import ApiError, Job
from .scheduler import Done, Event, Scheduler, Ticket

DRAIN_FACTOR = 16  # an oversized body is read (and dropped) up to this many times the limit, so the client sees the 413


class Api:
    """The state the handlers share: engine (rendering), scheduler (generation), limits, key."""

    def __init__(self, engine: Engine, scheduler: Scheduler, *, api_key: str | None = None,
                 max_tokens_limit: int = 4096, max_body: int = 1 << 20):
        self.engine, self.scheduler = engine, scheduler
        self.api_key, self.max_tokens_limit, self.max_body = api_key, max_tokens_limit, max_body
        self.created = int(time.time())

    # ------------------------------------------------------------ helpers

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer KEY "
                                "(the key relief serve was started with)", code="invalid_api_key")

    async def read_json(self, request: Request) -> object:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body * DRAIN_FACTOR:
            raise _too_large(int(declared), self.max_body)
        body, size = bytearray(), 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= self.max_body:
                body += chunk
            elif size > self.max_body * DRAIN_FACTOR:
                break
        if size > self.max_body:
            raise _too_large(size, self.max_body)
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e}); send a JSON object") from None

    def decode_harmony(self, text: str) -> str:
        return p.final_text(text, self.engine.harmony.encode, self.engine.harmony.decode)

    def submit(self, job: Job) -> Ticket:
        if job.model not in self.scheduler.adapters:
            raise ApiError(404, f"The model `{job.model}` does not exist; this server has "
                                f"{', '.join(self.scheduler.adapters)} (GET /v1/models)",
                           param="model", code="model_not_found")
        try:
            prompt = self.engine.render(job.messages, job.reasoning)
        except ReliefError as e:
            raise ApiError(400, str(e), param="messages") from None
        max_tokens = p.check_room(len(prompt), job, self.engine.context_length, self.max_tokens_limit)
        return self.scheduler.submit(job, job.model, prompt, self.engine.head_length(prompt), max_tokens)

    # ------------------------------------------------------------ routes

    async def page(self, request: Request) -> Response:
        return HTMLResponse(_page())

    async def health(self, request: Request) -> Response:
        health = self.scheduler.health()
        return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "relief-mlx"}
            for name in self.scheduler.adapters]})

    async def chat(self, request: Request) -> Response:
        self.authorize(request)
        job = p.parse_chat(await self.read_json(request), self.decode_harmony)
        ticket, rid, created = self.submit(job), f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if job.stream:
            return _stream(self._chat_events(ticket, rid, created), self.scheduler, ticket)
        completion = await _collect(ticket, request, self.scheduler)
        return JSONResponse(p.chat_response(job, rid, created, completion))

    async def _chat_events(self, ticket: Ticket, rid: str, created: int) -> AsyncIterator[str]:
        job = ticket.job
        yield p.sse(p.chat_chunk(job, rid, created, {"role": "assistant", "content": ""}))
        async for item in _events(ticket):
            if isinstance(item, Event):
                yield p.sse(p.chat_chunk(job, rid, created, p.chat_delta(item.content, item.reasoning),
                                         logprobs=item.logprobs, token_ids=item.token_ids))
                continue
            yield p.sse(p.chat_chunk(job, rid, created, {}, finish_reason=item.completion.finish_reason))
            if job.include_usage:
                yield p.sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": job.model,
                             "choices": [], "usage": p.chat_usage(item.completion)})
        yield p.sse("[DONE]")

    async def responses(self, request: Request) -> Response:
        self.authorize(request)
        job = p.parse_responses(await self.read_json(request), self.decode_harmony)
        ticket, rid, created = self.submit(job), f"resp_{uuid.uuid4().hex[:24]}", int(time.time())
        if job.stream:
            return _stream(self._response_events(ticket, rid, created), self.scheduler, ticket)
        completion = await _collect(ticket, request, self.scheduler)
        return JSONResponse(p.response_object(job, rid, created, completion))

    async def _response_events(self, ticket: Ticket, rid: str, created: int) -> AsyncIterator[str]:
        """The Responses stream: created, then the reasoning item (if any) and the message item,
        each opened, filled by deltas and closed, then completed."""
        job, seq = ticket.job, iter(range(1 << 30))

        def event(kind: str, **fields) -> str:
            return p.sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

        yield event("response.created", response=p.response_object(job, rid, created, None, "in_progress"))
        open_items: list[str] = []  # "reasoning", "message": the items opened so far, in order
        texts = {"reasoning": "", "message": ""}
        async for item in _events(ticket):
            if isinstance(item, Done):
                for kind in open_items:
                    yield _close_item(event, kind, rid, texts[kind], open_items.index(kind))
                yield event("response.completed", response=p.response_object(job, rid, created, item.completion))
                return
            for kind, text in (("reasoning", item.reasoning), ("message", item.content)):
                if not text:
                    continue
                if kind not in open_items:
                    open_items.append(kind)
                    yield _open_item(event, kind, rid, open_items.index(kind))
                texts[kind] += text
                index = open_items.index(kind)
                delta_kind = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
                yield event(delta_kind, item_id=_item_id(kind, rid), output_index=index, content_index=0, delta=text,
                            **({"logprobs": []} if kind == "message" else {}))


def _item_id(kind: str, rid: str) -> str:
    return f"rs_{rid[5:]}" if kind == "reasoning" else f"msg_{rid[5:]}"


def _open_item(event, kind: str, rid: str, index: int) -> str:
    item = p.reasoning_item(rid, "", "in_progress") if kind == "reasoning" else p.message_item(rid, "", "in_progress")
    item["content"] = []
    part = {"type": "reasoning_text", "text": ""} if kind == "reasoning" else p.output_text("")
    return (event("response.output_item.added", output_index=index, item=item)
            + event("response.content_part.added", item_id=_item_id(kind, rid), output_index=index, content_index=0,
                    part=part))


def _close_item(event, kind: str, rid: str, text: str, index: int) -> str:
    item = p.reasoning_item(rid, text) if kind == "reasoning" else p.message_item(rid, text)
    part = item["content"][0]
    done = ("response.reasoning_text.done" if kind == "reasoning" else "response.output_text.done")
    return (event(done, item_id=item["id"], output_index=index, content_index=0, text=text,
                  **({"logprobs": []} if kind == "message" else {}))
            + event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part)
            + event("response.output_item.done", output_index=index, item=item))


async def _events(ticket: Ticket) -> AsyncIterator[Event | Done]:
    """A ticket's events up to `Done`; an ApiError from the scheduler is raised."""
    while True:
        item = await ticket.events.get()
        if isinstance(item, ApiError):
            raise item
        yield item
        if isinstance(item, Done):
            return


def _stream(events: AsyncIterator[str], scheduler: Scheduler, ticket: Ticket) -> StreamingResponse:
    """Server-sent events; when the client goes away (Starlette cancels the stream), its row is freed."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in events:
                yield chunk
        except ApiError as e:
            yield p.sse(e.body())
        finally:
            scheduler.cancel(ticket)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _collect(ticket: Ticket, request: Request, scheduler: Scheduler) -> p.Completion:
    """Wait for a non-streamed request's result; free its row if the client goes away meanwhile."""
    try:
        while True:
            try:
                item = await asyncio.wait_for(ticket.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ApiError(499, "the client closed the connection") from None
                continue
            if isinstance(item, ApiError):
                raise item
            if isinstance(item, Done):
                return item.completion
    finally:
        scheduler.cancel(ticket)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body is {size} bytes or more, over this server's limit of {limit} bytes "
                         "(relief serve --max-body-mb)", code="request_too_large")


def _page() -> str:
    return resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")


async def _api_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers={"WWW-Authenticate": "Bearer"}
                        if exc.status == 401 else None)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code="not_found"
                     if exc.status_code == 404 else None)
    return JSONResponse(error.body(), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    error = ApiError(500, f"internal error ({type(exc).__name__}: {exc}); the server keeps serving",
                     code="server_error", kind="server_error")
    return JSONResponse(error.body(), status_code=500)


def create_app(engine: Engine, scheduler: Scheduler, **limits) -> Starlette:
    """The app; the scheduler's thread runs while the app does (started and stopped by its lifespan)."""
    api = Api(engine, scheduler, **limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        scheduler.start()
        yield
        scheduler.stop()

    routes = [Route("/", api.page), Route("/health", api.health), Route("/v1/models", api.models),
              Route("/v1/chat/completions", api.chat, methods=["POST"]),
              Route("/v1/responses", api.responses, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.scheduler = scheduler
    return app
