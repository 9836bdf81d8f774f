"""OpenAI Chat Completions and Responses <-> Harmony: request validation and normalization, and the
response and stream shapes clients parse. Pure functions over dicts; no model, no I/O.

A request becomes a `Job`: the conversation as relief's messages (what `relief generate` renders),
the reasoning effort, sampling settings, limits and stop strings. Incoming assistant messages are
earlier turns: their analysis is dropped (a generation prompt never holds it, as in `relief
chat`), so `reasoning_content`/`reasoning` are ignored, and content that carries Harmony text (a
client replaying raw model output, e.g. from mlx-lm's server) is parsed by `HarmonyStream` and
only its final-channel text kept. Results go back with the final channel as `content` and the
analysis (and commentary) as `reasoning_content` and `reasoning` (the field mlx-lm's clients
read); a reply never holds Harmony control text in `content`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..data.harmony import REASONING_EFFORTS, SPECIAL_IDS, message_problem
from ..generate.harmony_stream import HarmonyStream
from ..generate.sampling import SamplingConfig

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4  # OpenAI's limit on stop strings
_HARMONY = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_IDS) + ")")


class ApiError(Exception):
    """An error a client caused (or the server's state): HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> ApiError:
    """A 400 naming the field at fault."""
    return ApiError(400, f"{param}: {message}", param=param, code=code)


@dataclass(frozen=True)
class Job:
    """One request, model-free: what to render, how to sample, when to stop, how to reply."""

    model: str
    messages: list[dict]
    reasoning: str = "medium"
    max_tokens: int | None = None
    """None: as many as the server's limit and the context allow."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    max_tokens_field: str = "max_tokens"
    """The request field that set `max_tokens`, for error messages."""


# ---------------------------------------------------------------- requests


def parse_chat(body: Any, decode_harmony: Callable[[str], str]) -> Job:
    """Validate a Chat Completions body into a `Job`; ApiError(400) names the field at fault.

    `decode_harmony(text)` returns the final-channel text of assistant content that holds Harmony
    control text (see `final_text`)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _unsupported(body, n=1, tools=None, functions=None, top_logprobs=0, frequency_penalty=0, presence_penalty=0)
    _response_format(body.get("response_format"), "response_format")
    messages = _chat_messages(body.get("messages"), decode_harmony)
    limit_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "must be an object such as {\"include_usage\": true}")
    return Job(
        model=_model(body), messages=messages, reasoning=_effort(body.get("reasoning_effort"), "reasoning_effort"),
        max_tokens=_positive(body.get(limit_field), limit_field), sampling=_sampling(body),
        stop=_stop(body.get("stop")), logprobs=_flag(body, "logprobs"), stream=_flag(body, "stream"),
        include_usage=_flag(options, "include_usage", "stream_options.include_usage"),
        return_token_ids=_flag(body, "return_token_ids"), max_tokens_field=limit_field,
    )


def parse_responses(body: Any, decode_harmony: Callable[[str], str]) -> Job:
    """Validate a Responses body (its text subset) into a `Job`."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _unsupported(body, tools=None, previous_response_id=None, conversation=None, background=False)
    text = body.get("text") or {}
    if not isinstance(text, dict):
        raise bad("text", "must be an object such as {\"format\": {\"type\": \"text\"}}")
    _response_format(text.get("format"), "text.format")
    reasoning = body.get("reasoning") or {}
    if not isinstance(reasoning, dict):
        raise bad("reasoning", "must be an object such as {\"effort\": \"low\"}")
    messages = _response_input(body.get("input"), decode_harmony)
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad("instructions", "must be a string")
        if instructions.strip():
            messages = _merge_system([{"role": "system", "content": instructions}, *messages])
    _check_conversation(messages, "input")
    return Job(model=_model(body), messages=messages, reasoning=_effort(reasoning.get("effort"), "reasoning.effort"),
               max_tokens=_positive(body.get("max_output_tokens"), "max_output_tokens"), sampling=_sampling(body),
               stream=_flag(body, "stream"), max_tokens_field="max_output_tokens")


def _unsupported(body: dict, **allowed: Any) -> None:
    """Fields this server does not implement must be absent or hold their no-op value."""
    for name, neutral in allowed.items():
        value = body.get(name)
        if value is None or value == neutral or (neutral is None and value == []):
            continue
        hint = f"only {neutral} is supported" if neutral is not None else "not supported by this server"
        raise bad(name, hint, code="unsupported_parameter")


def _response_format(value: Any, param: str) -> None:
    if value is not None and (not isinstance(value, dict) or value.get("type") != "text"):
        raise bad(param, 'only {"type": "text"} is supported (no JSON mode or schemas)', code="unsupported_parameter")


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "required: one of the ids GET /v1/models lists")
    return model


def _effort(value: Any, param: str) -> str:
    if value is None:
        return "medium"
    if value not in REASONING_EFFORTS:
        raise bad(param, f"{value!r} is not one of {', '.join(REASONING_EFFORTS)}")
    return value


def _positive(value: Any, param: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad(param, f"{value!r} is not valid; use a whole number, 1 or more")
    return value


def _flag(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(param or name, f"{value!r} is not a boolean")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        raise bad(name, f"{value!r} is not valid; use a number from {low:g} to {high:g}")
    return float(value)


def _sampling(body: dict) -> SamplingConfig:
    """OpenAI's defaults: temperature 1, top_p 1; temperature 0 is greedy."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p", "0 keeps no token; use a number in (0, 1]")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise bad("seed", f"{seed!r} is not valid; use a whole number, 0 or more")
    return SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise bad("stop", f"use a non-empty string or a list of up to {MAX_STOP} of them")
    return tuple(stops)


def _text(content: Any, param: str, part_types: Sequence[str]) -> str:
    """The text of a message's content: a string, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            text = part.get("text") if isinstance(part, dict) else None
            if not isinstance(text, str) or part.get("type") not in part_types:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{param}[{i}]", f"a {kind!r} part cannot be rendered; only text parts "
                                           f"({', '.join(part_types)}) are supported")
            texts.append(text)
        return "".join(texts)
    raise bad(param, "must be a string or a list of text parts")


def _chat_messages(messages: Any, decode_harmony: Callable[[str], str]) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "must be an object with role and content")
        out += _message(m.get("role"), _text(m.get("content"), f"messages[{i}].content", ("text",)),
                        f"messages[{i}]", decode_harmony)
    messages = _merge_system(out)
    _check_conversation(messages, "messages")
    return messages


def _response_input(value: Any, decode_harmony: Callable[[str], str]) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise bad("input", "is empty; pass some text")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad("input", "must be a string or a non-empty list of messages")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad(f"input[{i}]", "must be a message object with role and content")
        if item.get("type") == "reasoning":
            continue  # earlier turns' reasoning is dropped, as in every generation prompt
        if item.get("type", "message") != "message":
            raise bad(f"input[{i}].type", f"{item.get('type')!r} items are not supported; send messages")
        text = _text(item.get("content"), f"input[{i}].content", ("input_text", "output_text", "text"))
        out += _message(item.get("role"), text, f"input[{i}]", decode_harmony)
    return _merge_system(out)


def _message(role: Any, text: str, param: str, decode_harmony: Callable[[str], str]) -> list[dict]:
    """One incoming message as relief's messages (none for an assistant turn without a final answer)."""
    if role not in ROLES:
        raise bad(f"{param}.role", f"{role!r} cannot be rendered: this server renders {', '.join(ROLES)} "
                                   "messages (no tool or function messages)")
    if role == "assistant":
        text = (decode_harmony(text) if _HARMONY.search(text) else text).strip()
        return [{"role": "assistant", "content": text}] if text else []
    if not text.strip():
        raise bad(f"{param}.content", "is empty; pass some text")
    return [{"role": role, "content": text}]


def _merge_system(messages: list[dict]) -> list[dict]:
    """Leading system/developer messages become one (the developer message of the Harmony prompt)."""
    head = [m for m in messages[:next((i for i, m in enumerate(messages) if m["role"] not in ("system", "developer")),
                                       len(messages))]]
    if len(head) <= 1:
        return messages
    return [{"role": "system", "content": "\n\n".join(m["content"] for m in head)}, *messages[len(head):]]


def _check_conversation(messages: list[dict], param: str) -> None:
    problem = message_problem(messages, for_training=False) if messages else "no message to answer"
    if problem:
        raise bad(param, f"{problem} (the Harmony template cannot render it)")


def final_text(text: str, encode: Callable[[str], list[int]], decode: Callable[[Sequence[int]], str]) -> str:
    """The final-channel text of an assistant message that holds raw Harmony text (as a model wrote
    it after `<|start|>assistant`); the analysis and any header are dropped. Text with no final
    channel keeps what is outside its Harmony markup, e.g. an unfinished answer."""
    stream = HarmonyStream(decode)
    for piece in _HARMONY.split(text):
        for token in [SPECIAL_IDS[piece]] if piece in SPECIAL_IDS else encode(piece):
            stream.feed(token)
    stream.finish()
    if any(m.channel == "final" for m in stream.messages):
        return stream.text("final")
    return "" if stream.messages else _HARMONY.sub("", text)


# ---------------------------------------------------------------- results


@dataclass
class Completion:
    """What one request produced, for the response body and the usage counts."""

    content: str = ""
    reasoning: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None


def chat_usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": c.reasoning_tokens}}


def chat_response(job: Job, rid: str, created: int, c: Completion) -> dict:
    message = {"role": "assistant", "content": c.content}
    if c.reasoning:
        message |= {"reasoning_content": c.reasoning, "reasoning": c.reasoning}
    choice = {"index": 0, "message": message, "finish_reason": c.finish_reason,
              "logprobs": {"content": c.logprobs} if job.logprobs else None}
    if job.return_token_ids:
        choice["token_ids"] = c.token_ids
    return {"id": rid, "object": "chat.completion", "created": created, "model": job.model, "choices": [choice],
            "usage": chat_usage(c)}


def chat_chunk(job: Job, rid: str, created: int, delta: dict, finish_reason: str | None = None,
               logprobs: list[dict] | None = None, token_ids: list[int] | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason,
              "logprobs": {"content": logprobs} if job.logprobs and logprobs is not None else None}
    if job.return_token_ids and token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": job.model, "choices": [choice]}


def chat_delta(content: str, reasoning: str) -> dict:
    delta = {"content": content} if content else {}
    return delta | ({"reasoning_content": reasoning, "reasoning": reasoning} if reasoning else {})


def response_object(job: Job, rid: str, created: int, c: Completion | None, status: str = "completed") -> dict:
    """A Responses API `response`; `c` None while in progress (no output yet)."""
    output = [] if c is None else response_items(rid, c)
    body = {"id": rid, "object": "response", "created_at": created, "status": status, "model": job.model,
            "output": output, "error": None, "incomplete_details": None, "instructions": None,
            "max_output_tokens": job.max_tokens, "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
            "temperature": job.sampling.temperature, "top_p": job.sampling.top_p,
            "reasoning": {"effort": job.reasoning, "summary": None}, "text": {"format": {"type": "text"}},
            "usage": None}
    if c is not None:
        body["usage"] = {"input_tokens": c.prompt_tokens, "input_tokens_details": {"cached_tokens": c.cached_tokens},
                         "output_tokens": c.completion_tokens,
                         "output_tokens_details": {"reasoning_tokens": c.reasoning_tokens},
                         "total_tokens": c.prompt_tokens + c.completion_tokens}
        if c.finish_reason == "length":
            body["status"], body["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
    return body


def response_items(rid: str, c: Completion) -> list[dict]:
    """The output items: the reasoning (when there is any), then the assistant message."""
    items = [reasoning_item(rid, c.reasoning)] if c.reasoning else []
    return [*items, message_item(rid, c.content)]


def reasoning_item(rid: str, text: str, status: str = "completed") -> dict:
    return {"id": f"rs_{rid[5:]}", "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def message_item(rid: str, text: str, status: str = "completed") -> dict:
    return {"id": f"msg_{rid[5:]}", "type": "message", "role": "assistant", "status": status,
            "content": [output_text(text)]}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def sse(data: dict | str, event: str | None = None) -> str:
    """One server-sent event (`data` as JSON unless a string such as [DONE])."""
    import json

    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


class StopText:
    """The `stop` strings over streamed text: `feed` returns what is safe to send (text that could
    still begin a stop string is held back) and whether a stop string arrived (the text from it on
    is never sent, as in OpenAI's API)."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self._held, self.stopped = tuple(stops), "", False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        held = self._held + text
        cut = min((i for i in (held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return held[:cut]
        keep = max((n for s in self.stops for n in range(1, len(s)) if held.endswith(s[:n])), default=0)
        self._held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep]

    def finish(self) -> str:
        out, self._held = ("" if self.stopped else self._held), ""
        return out


def check_room(prompt_tokens: int, job: Job, context: int, limit: int) -> int:
    """The max tokens to generate for `job`, or ApiError when the context or the server's limit
    cannot hold the request (OpenAI's wording and numbers)."""
    if job.max_tokens is not None and job.max_tokens > limit:
        raise bad(job.max_tokens_field, f"{job.max_tokens} is more than this server allows ({limit}, "
                                        "relief serve --max-tokens-limit)")
    wanted = job.max_tokens or 0
    if prompt_tokens + max(wanted, 1) > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the messages, {wanted} in the "
                            "completion). Please reduce the length of the messages or completion.",
                       param="messages", code="context_length_exceeded")
    return min(job.max_tokens or limit, context - prompt_tokens)
