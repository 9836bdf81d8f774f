"""Helpers of the server tests: the scripted checkpoint's answer, and a live `relief serve`
subprocess on a free loopback port."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from relief_mlx.data.harmony import CHANNEL, MESSAGE, RETURN, HarmonyTokenizer

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
