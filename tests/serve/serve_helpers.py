"""Helpers of the server tests: the scripted checkpoint's answer, a live `relief serve` subprocess
on a free loopback port, and a model stand-in whose batch rows each follow a token script."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from relief_mlx.data.harmony import CHANNEL, END, MESSAGE, RETURN, START, HarmonyTokenizer

FINAL = "Hello world, stay safe."
KEY = "test-key-123"


def script_tokens(tok: HarmonyTokenizer) -> list[int]:
    """What the scripted model generates after `<|start|>assistant`: every id once (a bigram chain)."""
    ids = [CHANNEL, *tok.encode("final"), MESSAGE, *tok.encode(FINAL), RETURN]
    assert len(set(ids)) == len(ids), "the script must use each token once"
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `relief serve` subprocess on a free loopback port, ready when /health answers."""

    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "relief_mlx", "serve", *args, "--port", str(self.port)],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relief serve exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"relief serve did not answer /health in 180 s:\n{log.read_text()}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 120) -> tuple[int, dict | str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, text

    def get(self, path: str) -> tuple[int, dict | str]:
        return self.request("GET", path, timeout=5)

    def health(self) -> dict:
        return self.get("/health")[1]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


VOCAB = 201_088


class StepCache:
    """Each row's count of decode steps; merges, extends and filters as mlx-lm's batch caches do."""

    def __init__(self, steps: list[int] | None = None):
        self.steps = steps if steps is not None else [0]

    def merge(self, caches: list[StepCache]) -> StepCache:
        return StepCache([s for c in caches for s in c.steps])

    def extend(self, other: StepCache) -> None:
        self.steps += other.steps

    def filter(self, index: mx.array) -> None:
        self.steps = [self.steps[i] for i in index.tolist()]

    @property
    def state(self) -> tuple:
        return (list(self.steps),)

    @state.setter
    def state(self, value: tuple) -> None:
        self.steps = list(value[0])


class ScriptedRows:
    """Quacks like the gpt-oss Model in a batch: row b's n-th decode step 'predicts' script[n]."""

    def __init__(self, script: list[int], filler: int = 11):
        self.script, self.filler = script, filler
        self.model = lambda tokens, cache=None: mx.zeros((*tokens.shape, 1))  # prefill chunks

    def make_cache(self) -> list:
        return [StepCache()]

    def __call__(self, tokens: mx.array, cache: list) -> mx.array:  # (B, 1) -> (B, 1, V)
        steps = cache[0].steps
        nxt = mx.array([self.script[s] if s < len(self.script) else self.filler for s in steps])
        cache[0].steps = [s + 1 for s in steps]
        return mx.where(mx.arange(VOCAB)[None] == nxt[:, None], 30.0, 0.0)[:, None, :]


def script(tok) -> list[int]:
    def ids(*parts):
        return [t for p in parts for t in ([p] if isinstance(p, int) else tok.encode(p))]

    return ids(CHANNEL, "analysis", MESSAGE, "Think.", END, START, "assistant", CHANNEL, "final", MESSAGE,
               "Boil it.", RETURN)
