"""The README's serving figure: total throughput of N concurrent requests against the same N sent one
at a time, to a live `relief serve` on loopback (127.0.0.1 only; every request bounded in tokens
and time).

    python benchmarks/serve.py      # a synthesized mini (float32 experts on a CPU) -> results/serve-mini-BACKEND.json
    python benchmarks/serve.py --model models/gpt-oss-20b --new-tokens 64

N prompts of different lengths (each its own question, so the prompt cache does not help the
concurrent run more than the sequential one), greedy, `--new-tokens` each; the figure is the
completion tokens the server reports (usage) over wall time, the median (min-max) of `--repeats`
alternated runs; the ratio is taken run by run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

TIMEOUT_S = 600  # one request never waits longer than this


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        reply = json.loads(response.read())
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {reply}")
    return reply


def wait_ready(port: int, proc: subprocess.Popen, deadline_s: float = 300) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"relief serve exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("relief serve did not answer /health in time")


def mini_checkpoint(folder: Path) -> Path:
    import mlx.core as mx

    from relief_mlx.checkpoint.convert import convert
    from relief_mlx.checkpoint.synth import synth

    experts = "float32" if mx.default_device() == mx.cpu else "mxfp4"
    return convert(synth("mini", folder / "hf", seed=0), folder / "mlx", experts=experts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Converted checkpoint [default: a synthesized mini]")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import mlx.core as mx

    from relief_mlx.doctor import backend
    from relief_mlx.io import write_json

    with tempfile.TemporaryDirectory(prefix="relief-bench-serve-") as scratch:
        model = args.model or str(mini_checkpoint(Path(scratch)))
        port = free_port()
        log = open(Path(scratch) / "serve.log", "w")  # closed once the server has stopped
        proc = subprocess.Popen([sys.executable, "-m", "relief_mlx", "serve", "--model", model, "--port", str(port),
                                 "--max-batch", str(args.requests)], stdout=log, stderr=subprocess.STDOUT,
                                env=os.environ | {"PYTHONUNBUFFERED": "1"})
        try:
            wait_ready(port, proc)
            runs = measure(port, model, args)
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
    stats = {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in runs.items()}
    ratios = [c / o for c, o in zip(runs["concurrent"], runs["one at a time"], strict=True)]
    ratio = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    print(f"median of {args.repeats}: one at a time {stats['one at a time']['median']:.1f} tokens/s, "
          f"{args.requests} concurrent {stats['concurrent']['median']:.1f} tokens/s: {ratio['median']:.2f}x "
          f"({ratio['min']:.2f}-{ratio['max']:.2f})")
    name = "mini" if args.model is None else Path(args.model).name
    out = args.out or ROOT / "benchmarks" / "results" / f"serve-{name}-{backend(mx)}.json"
    write_json(out, {"model": name, "backend": backend(mx), "requests": args.requests, "new_tokens": args.new_tokens,
                     "tokens_per_s": runs, "stats": stats, "concurrent_over_one_at_a_time": ratio})
    print(f"results -> {out}")


def measure(port: int, model: str, args: argparse.Namespace) -> dict[str, list[float]]:
    questions = [f"Question {i}: " + "where is the nearest shelter with water and medicine? " * (1 + 2 * i)
                 for i in range(args.requests)]

    def ask(i: int, run: str, out: list[int]) -> None:  # `run` makes each run's prompts new to the prompt cache
        body = {"model": model, "messages": [{"role": "user", "content": f"({run}) {questions[i]}"}],
                "max_tokens": args.new_tokens, "temperature": 0}
        out[i] = post(port, body)["usage"]["completion_tokens"]

    ask(0, "warm-up", [0] * args.requests)
    runs: dict[str, list[float]] = {"one at a time": [], "concurrent": []}
    for repeat in range(args.repeats):
        for name in ("one at a time", "concurrent") if repeat % 2 == 0 else ("concurrent", "one at a time"):
            tokens = [0] * args.requests
            tic = time.perf_counter()
            if name == "one at a time":
                for i in range(args.requests):
                    ask(i, f"{name} {repeat}", tokens)
            else:
                threads = [threading.Thread(target=ask, args=(i, f"{name} {repeat}", tokens))
                           for i in range(args.requests)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(TIMEOUT_S)
            runs[name].append(sum(tokens) / (time.perf_counter() - tic))
            print(f"repeat {repeat + 1}: {name:<14} {runs[name][-1]:7.1f} tokens/s ({sum(tokens)} tokens)", flush=True)
    return runs


if __name__ == "__main__":
    main()
