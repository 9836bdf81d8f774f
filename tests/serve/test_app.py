"""The app in-process (uvicorn in a thread, loopback) over a row-scripted model whose answer holds
an analysis and a final message: the official client gets the analysis as `reasoning_content`
(chat) and as reasoning items and `response.reasoning_text.delta` events (Responses)."""

from __future__ import annotations

import threading
import time

import openai
import pytest
import uvicorn
from serve_helpers import ScriptedRows, free_port, script

from relief_mlx.generate.engine import Engine
from relief_mlx.serve.app import create_app
from relief_mlx.serve.scheduler import Scheduler


@pytest.fixture(scope="module")
def client(harmony_tokenizer):
    engine = Engine(ScriptedRows(script(harmony_tokenizer)), harmony_tokenizer)
    port = free_port()
    app = create_app(engine, Scheduler(engine, {"base": None}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    server.should_exit = True
    thread.join(30)


QUESTION = [{"role": "user", "content": "How long do we boil water?"}]


def test_chat_gives_the_analysis_as_reasoning_content(client):
    reply = client.chat.completions.create(model="base", messages=QUESTION)
    message = reply.choices[0].message
    assert (message.content, message.reasoning_content, message.reasoning) == ("Boil it.", "Think.", "Think.")
    assert reply.usage.completion_tokens_details.reasoning_tokens > 0
    chunks = list(client.chat.completions.create(model="base", messages=QUESTION, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Think."
    assert "".join(d.content or "" for d in deltas) == "Boil it."


def test_responses_give_a_reasoning_item_then_the_message(client):
    response = client.responses.create(model="base", input="How long do we boil water?")
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == "Think." and response.output_text == "Boil it."
    events = list(client.responses.create(model="base", input="How long?", stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Think."
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Boil it."
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    done = [e.item.type for e in events if e.type == "response.output_item.done"]
    assert added == done == ["reasoning", "message"]
    assert events[-1].type == "response.completed" and events[-1].response.output_text == "Boil it."
