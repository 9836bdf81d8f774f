"""The official `openai` client against a live `relief serve` on loopback.

The scripted server (see conftest.py) answers every prompt with a known analysis and final
message, so channels, content, usage, stops and adapters are checked end to end; the mini server
(random weights) produces long arbitrary token streams, compared by id (the `return_token_ids`
extension, as in vLLM) with `relief generate` and across concurrency."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time

import openai
import pytest
from serve_helpers import FINAL, KEY, script_tokens

from relief_mlx.data.harmony import SPECIAL_IDS, RenderOptions, render_prompt

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
QUESTION = [{"role": "user", "content": "Where can we get clean water?"}]


def post(server, path: str, body: dict | bytes, headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return server.request("POST", path, data, AUTH if headers is None else headers)


def test_models_lists_the_base_and_each_adapter(client, scripted_mlx):
    assert [m.id for m in client.models.list().data] == [str(scripted_mlx), "scramble"]


def test_chat_returns_the_final_channel_as_content(client, scripted_mlx, harmony_tokenizer):
    reply = client.chat.completions.create(model=str(scripted_mlx), messages=QUESTION, temperature=0,
                                           reasoning_effort="low")
    choice = reply.choices[0]
    assert choice.message.content == FINAL and choice.finish_reason == "stop"
    assert getattr(choice.message, "reasoning_content", None) is None  # no analysis message in this script
    expected_prompt = len(render_prompt(QUESTION, RenderOptions(reasoning_effort="low"), harmony_tokenizer))
    usage = reply.usage
    assert usage.prompt_tokens == expected_prompt
    assert usage.completion_tokens == len(script_tokens(harmony_tokenizer))
    assert usage.completion_tokens_details.reasoning_tokens == 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_content_never_holds_harmony_tokens(client, scripted_mlx):
    stream = client.chat.completions.create(model=str(scripted_mlx), messages=QUESTION, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    reasoning = [getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices]
    assert "".join(content) == FINAL and "".join(reasoning) == ""
    assert sum(1 for piece in content if piece) > 1  # it streamed, piece by piece
    assert not any(token in piece for piece in content + reasoning for token in SPECIAL_IDS)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_stop_strings_cut_the_content(client, scripted_mlx):
    reply = client.chat.completions.create(model=str(scripted_mlx), messages=QUESTION, temperature=0, stop=[" stay"])
    assert reply.choices[0].message.content == FINAL.split(" stay")[0] and reply.choices[0].finish_reason == "stop"


def test_max_tokens_cuts_the_answer_with_finish_reason_length(client, scripted_mlx):
    reply = client.chat.completions.create(model=str(scripted_mlx), messages=QUESTION, temperature=0, max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    assert reply.choices[0].message.content == ""


def test_logprobs_cover_the_content_tokens(client, scripted_mlx):
    reply = client.chat.completions.create(model=str(scripted_mlx), messages=QUESTION, temperature=0, logprobs=True)
    entries = reply.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == FINAL
    assert all(-1e-3 < e.logprob <= 0 for e in entries)  # the scripted successor has logit 40 over ~0


def test_a_follow_up_turn_renders_history_and_reuses_the_cache(client, scripted_mlx):
    first = client.chat.completions.create(model=str(scripted_mlx), messages=QUESTION, temperature=0)
    raw = f"<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>{FINAL}"
    for previous in ({"role": "assistant", "content": FINAL, "reasoning_content": "Think."},
                     {"role": "assistant", "content": raw}):
        follow = client.chat.completions.create(
            model=str(scripted_mlx), temperature=0,
            messages=[*QUESTION, previous, {"role": "user", "content": "And for cooking?"}])
        assert follow.choices[0].message.content == FINAL
        # the earlier prompt (but its last token) is a prefix of this one: restored, not prefilled
        assert follow.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def test_responses_api(client, scripted_mlx, harmony_tokenizer):
    response = client.responses.create(model=str(scripted_mlx), input="Where can we get clean water?",
                                       instructions="Answer briefly.", reasoning={"effort": "high"}, temperature=0)
    assert response.output_text == FINAL and response.status == "completed"
    assert [item.type for item in response.output] == ["message"]
    assert response.usage.input_tokens > 0 and response.usage.output_tokens == len(script_tokens(harmony_tokenizer))
    events = list(client.responses.create(model=str(scripted_mlx), input="Where?", temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == FINAL
    assert events[-1].response.output_text == FINAL
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_an_adapter_is_picked_by_model_id(client, scripted_mlx, scripted_server):
    ids = [client.chat.completions.create(model=m, messages=QUESTION, temperature=0, max_tokens=12,
                                          extra_body={"return_token_ids": True}).choices[0].token_ids
           for m in (str(scripted_mlx), "scramble", str(scripted_mlx))]
    assert ids[0] == ids[2] and ids[1] != ids[0]  # switched to the adapter and back
    assert scripted_server.health()["adapter_in_use"] == str(scripted_mlx)


def test_greedy_answer_equals_relief_generate(client, scripted_mlx, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": QUESTION}) + "\n")
    subprocess.run([sys.executable, "-m", "relief_mlx", "generate", "--model", str(scripted_mlx), "--prompts",
                    str(prompts), "--answers", str(tmp_path / "o.jsonl"), "--reasoning", "low"], check=True,
                   capture_output=True)
    expected = json.loads((tmp_path / "o.jsonl").read_text())
    reply = client.chat.completions.create(model=str(scripted_mlx), messages=QUESTION, temperature=0,
                                           reasoning_effort="low")
    message = reply.choices[0].message
    assert (message.content, getattr(message, "reasoning_content", None) or "") == (expected["answer"],
                                                                                   expected["analysis"])
    assert expected["answer"] == FINAL


@pytest.mark.parametrize(("body", "status", "param"), [
    (b'{"model": "x", "messages": [', 400, None),  # malformed JSON
    ({"model": "nope", "messages": QUESTION}, 404, "model"),
    ({"messages": [{"role": "tool", "content": "42"}]}, 400, "messages[0].role"),
    ({"messages": QUESTION, "max_tokens": -1}, 400, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": 100_000}, 400, "max_tokens"),  # over --max-tokens-limit
    ({"messages": [{"role": "user", "content": "x" * 10_000_000}]}, 413, None),  # a 10 MB body
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(scripted_server, scripted_mlx, body, status,
                                                                       param):
    if isinstance(body, dict):
        body = {"model": str(scripted_mlx)} | body
    code, reply = post(scripted_server, "/v1/chat/completions", body)
    assert code == status and set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["param"] == param and reply["error"]["message"]
    ok, answer = post(scripted_server, "/v1/chat/completions", {"model": str(scripted_mlx), "messages": QUESTION,
                                                                 "temperature": 0})
    assert ok == 200 and answer["choices"][0]["message"]["content"] == FINAL


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_the_api_key_is_required(scripted_server, scripted_mlx, headers):
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/responses")):
        body = json.dumps({"model": str(scripted_mlx), "messages": QUESTION}).encode() if method == "POST" else None
        code, reply = scripted_server.request(method, path, body, headers)
        assert code == 401 and reply["error"]["code"] == "invalid_api_key"
    assert scripted_server.get("/health")[0] == 200  # health and the page need no key
    assert scripted_server.get("/")[0] == 200


def test_the_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        client.chat.completions.create(model="scramble", messages=QUESTION, reasoning_effort="extreme")
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---------------------------------------------------------------- the random mini model


def stream_ids(server, content: str, n: int) -> list[int]:
    """Greedy token ids of one streamed answer (`return_token_ids`) from the mini server."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    stream = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": content}],
                                            temperature=0, max_tokens=n, stream=True,
                                            extra_body={"return_token_ids": True})
    return [t for chunk in stream if chunk.choices for t in (getattr(chunk.choices[0], "token_ids", None) or [])]


CONTENTS = [f"Request {i}: " + "water food shelter medicine " * (i * 3 + 1) for i in range(8)]


@pytest.fixture(scope="module")
def mini(mini_server, mini_mlx_f32):
    mini_server.model = str(mini_mlx_f32)
    return mini_server


def test_greedy_tokens_equal_relief_generate(mini, mini_mlx_f32, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in CONTENTS[:2]))
    subprocess.run([sys.executable, "-m", "relief_mlx", "generate", "--model", str(mini_mlx_f32), "--prompts",
                    str(prompts), "--answers", str(tmp_path / "o.jsonl"), "--max-tokens", "40", "--logprobs"],
                   check=True, capture_output=True)
    expected = [json.loads(line)["tokens"] for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [stream_ids(mini, c, 40) for c in CONTENTS[:2]] == expected


def test_eight_concurrent_streams_get_the_tokens_of_one_at_a_time(mini):
    alone = [stream_ids(mini, c, 48) for c in CONTENTS]
    together: list[list[int] | None] = [None] * len(CONTENTS)

    def run(i: int) -> None:
        together[i] = stream_ids(mini, CONTENTS[i], 48)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(CONTENTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == alone and all(len(ids) == 48 for ids in alone)


def test_a_client_that_disconnects_frees_its_row(mini):
    before = mini.health()["counters"]["cancelled"]
    conn = http.client.HTTPConnection("127.0.0.1", mini.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": mini.model, "messages": [{"role": "user", "content": "long"}], "max_tokens": 4000, "stream": True,
         "return_token_ids": True, "temperature": 0}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(3):
        assert response.readline().startswith(b"data: ")  # an event, then its blank line
        assert response.readline() == b"\n"
    assert mini.health()["rows"] == 1
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (mini.health()["rows"] or mini.health()["counters"]["cancelled"] == before):
        time.sleep(0.1)
    health = mini.health()
    assert health["rows"] == 0 and health["counters"]["cancelled"] == before + 1
    assert health["counters"]["generated_tokens"] < 4000 * 10  # it did not run to its 4000 tokens
