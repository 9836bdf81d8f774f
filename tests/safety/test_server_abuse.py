"""`relief serve` under abuse from loopback, bounded in count and time: oversized and malformed
bodies, clients that stall or vanish, and a flood larger than its queue. The server keeps
answering /health, answers every request it refuses with a 4xx and every one it accepts in full,
and never with a 500."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

MAX_BODY = 10_000  # bytes (--max-body-mb 0.01 is 10,485)
MAX_BATCH, MAX_QUEUE, MAX_TOKENS = 2, 4, 8


class Server:
    """`relief serve` on a free loopback port with small limits, ready when /health answers."""

    def __init__(self, model: Path, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relief_mlx", "serve", "--model", str(model), "--port", str(self.port),
             "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--max-body-mb", "0.01",
             "--max-tokens-limit", str(MAX_TOKENS)],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        self.log = log
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                if self.request("GET", "/health", timeout=5)[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"relief serve did not start:\n{log.read_text()}")

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 60,
                headers: dict | None = None) -> tuple[int, object]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        finally:
            conn.close()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, text

    def chat(self, content: str = "Where should the water point go?", **extra) -> tuple[int, object]:
        body = {"model": self.model_id, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS}
        return self.request("POST", "/v1/chat/completions", json.dumps(body | extra).encode())

    def health(self) -> dict:
        status, body = self.request("GET", "/health", timeout=10)
        assert status == 200, body
        return body

    def raw(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)


@pytest.fixture(scope="module")
def server(mini_mlx_f32, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    s = Server(mini_mlx_f32, log)
    s.model_id = s.request("GET", "/v1/models")[1]["data"][0]["id"]
    yield s
    s.proc.terminate()
    s.proc.wait(30)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def answered_in_full(status: int, body: object) -> bool:
    return status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length") and \
        body["usage"]["completion_tokens"] <= MAX_TOKENS


# ---------------------------------------------------------------- bodies


OVERSIZED = {
    "a body over the limit": b'{"messages": "' + b"a" * (MAX_BODY * 2) + b'"}',
    "a body far over the limit (stops reading)": b"a" * (MAX_BODY * 40),
}


@pytest.mark.parametrize("name", list(OVERSIZED))
@pytest.mark.survives("server abuse", "request bodies over --max-body-mb: 413, the server keeps serving")
def test_an_oversized_body_gets_413(name, server):
    status, body = server.request("POST", "/v1/chat/completions", OVERSIZED[name])
    assert status == 413 and "over this server's limit" in body["error"]["message"], body
    assert answered_in_full(*server.chat())


@pytest.mark.survives("server abuse", "a Content-Length of a terabyte that never comes: 413 from the header alone")
def test_a_huge_declared_length_is_refused_from_the_header(server):
    with server.raw() as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000000000\r\n\r\n{")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    server.health()


MALFORMED = {
    "not JSON": b"{model: mini",
    "not UTF-8": b'{"model": "\xff\xfe"}',
    "JSON nested 4,000 deep": b"[" * 4000 + b"]" * 4000,
    "an integer of 5,000 digits": b'{"max_tokens": 1' + b"0" * 5000 + b"}",
    "a JSON list": b"[1, 2]",
    "an empty body": b"",
    "messages not a list": b'{"model": "m", "messages": "hi"}',
    "a lone surrogate in a message": b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
    "max_tokens over the server's limit": json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 10**9}).encode(),
}


@pytest.mark.parametrize("name", list(MALFORMED))
@pytest.mark.survives("server abuse", "malformed request bodies: 4xx naming the problem, never 500")
def test_a_malformed_body_gets_a_4xx(name, server):
    body = MALFORMED[name]
    if name.startswith(("messages", "a lone", "max_tokens")):
        body = json.dumps(json.loads(body) | {"model": server.model_id}).encode()
    status, reply = server.request("POST", "/v1/chat/completions", body)
    assert 400 <= status < 500 and reply["error"]["message"], (status, reply)


# ---------------------------------------------------------------- slow and vanishing clients


@pytest.mark.survives("server abuse", "clients that stall mid-request (headers or body), held open: others are served")
def test_stalled_clients_do_not_block_the_server(server):
    stalled = [server.raw() for _ in range(4)]
    try:
        stalled[0].sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # headers never end
        stalled[1].sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{")
        for s in stalled[2:]:  # a body trickling in, a byte at a time
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 300\r\n\r\n")
        for _ in range(3):
            for s in stalled[2:]:
                s.sendall(b" ")
            assert server.health()["status"] == "ok"
            assert answered_in_full(*server.chat())
            time.sleep(0.2)
    finally:
        for s in stalled:
            s.close()
    assert answered_in_full(*server.chat())


@pytest.mark.survives("server abuse", "streaming clients that vanish mid-answer: their rows are freed")
def test_clients_that_vanish_mid_stream_free_their_rows(server):
    body = json.dumps({"model": server.model_id, "messages": [{"role": "user", "content": "Tell me everything."}],
                       "max_tokens": MAX_TOKENS, "stream": True}).encode()
    for _ in range(6):
        with server.raw() as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert s.recv(64).startswith((b"HTTP/1.1 200", b"HTTP/1.1 429"))  # the queue may still be full
        # closed after the first bytes of the stream
    deadline = time.monotonic() + 30
    while server.health()["rows"] or server.health()["waiting"]:
        assert time.monotonic() < deadline, server.health()
        time.sleep(0.2)
    assert answered_in_full(*server.chat())


# ---------------------------------------------------------------- a flood


FLOOD = 40  # requests, all at once: 10x what the rows and the queue hold together


@pytest.mark.slow
@pytest.mark.survives("server abuse", "a flood from loopback, 10x the rows and queue: every request answered, "
                                      "accepted ones in full, /health up throughout")
def test_a_flood_is_answered_in_full_or_refused_with_429(server):
    results: list[tuple[int, object]] = []
    lock = threading.Lock()

    def one(k: int) -> None:
        outcome = server.chat(f"Question {k}: how much water per person per day?")
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(FLOOD)]
    for t in threads:
        t.start()
    health = []
    while any(t.is_alive() for t in threads):
        health.append(server.health()["status"])  # answered while the flood is on
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=120)
    statuses = sorted(status for status, _ in results)
    assert len(results) == FLOOD and set(statuses) <= {200, 429}, statuses
    assert all(answered_in_full(status, body) for status, body in results if status == 200)
    assert statuses.count(200) >= MAX_QUEUE and health and set(health) == {"ok"}
    refused = [body for status, body in results if status == 429]
    assert all("queue is full" in body["error"]["message"] for body in refused)
