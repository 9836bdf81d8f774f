"""`relief serve`: an OpenAI-compatible server that speaks Harmony, batches requests continuously
and serves a chat page. `app` (routes, validation, errors), `scheduler` (the model thread over
generate/'s `BatchDecoder`), `protocol` (OpenAI/Responses <-> Harmony), `static/` (the page)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ReliefError


@dataclass(frozen=True)
class ServeConfig:
    """One server's settings; each field is a `relief serve` option."""

    model: str
    """Converted checkpoint folder or Hub id; also the base model's id in the API."""
    adapters: tuple[str, ...] = ()
    """LoRA adapters as NAME=PATH (or PATH, which is then also the name)."""
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_batch: int = 8
    """Rows decoded together in one forward pass."""
    max_queue: int = 64
    """Requests waiting for a row before new ones get 429."""
    max_tokens_limit: int = 4096
    """Most tokens one request may generate (and its default)."""
    max_body_mb: float = 1.0
    prompt_cache: int = 8
    """Prompt-cache snapshots kept per model id."""
    prefill_chunk: int = 512

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_tokens_limit", "prompt_cache", "prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ReliefError(f"{name.replace('_', '-')} {value!r} is not valid; use a whole number, 1 or more")
        if not 0 < self.max_body_mb <= 1024:
            raise ReliefError(f"max-body-mb {self.max_body_mb!r} is not valid; use a number in (0, 1024]")
        if self.api_key is not None and not self.api_key.strip():
            raise ReliefError("the API key is empty; pass a non-empty --api-key or leave it out")


def adapter_names(model: str, adapters: Sequence[str]) -> dict[str, str]:
    """Model id -> adapter path from `NAME=PATH` (or `PATH`) arguments; ids must be unique."""
    out: dict[str, str] = {}
    for spec in adapters:
        name, sep, path = spec.partition("=")
        name, path = (name.strip(), path.strip()) if sep else (spec.rstrip("/"), spec)
        if not name or not path:
            raise ReliefError(f"--adapter {spec!r} is not NAME=PATH or PATH; e.g. --adapter relief=runs/relief/best")
        if name == model or name in out:
            raise ReliefError(f"--adapter {spec!r}: the model id {name!r} is taken; give it another NAME=")
        out[name] = path
    return out


def build(config: ServeConfig, scratch: Path, say: Callable[[str], None] = lambda _: None):
    """Load the model, check every adapter against it, and return the ASGI app (not started)."""
    from ..generate.engine import Engine, adapter_folder
    from ..model.lora import apply_adapter, remove_adapter
    from .app import create_app
    from .scheduler import Scheduler

    adapters: dict[str, Path | None] = {config.model: None}
    for i, (name, path) in enumerate(adapter_names(config.model, config.adapters).items()):
        (scratch / str(i)).mkdir()
        adapters[name] = adapter_folder(path, scratch / str(i))  # a missing adapter fails before the model loads
    say(f"loading {config.model}")
    engine = Engine.load(config.model)
    for folder in adapters.values():
        if folder is not None:
            apply_adapter(engine.model, folder)  # fails now, in one line, if it does not fit the model
            remove_adapter(engine.model)
    scheduler = Scheduler(engine, adapters, max_batch=config.max_batch, max_queue=config.max_queue,
                          prompt_cache=config.prompt_cache, prefill_chunk=config.prefill_chunk)
    return create_app(engine, scheduler, api_key=config.api_key, max_tokens_limit=config.max_tokens_limit,
                      max_body=int(config.max_body_mb * (1 << 20)))


def serve(config: ServeConfig, say: Callable[[str], None] = lambda _: None) -> None:
    """Build the app and run it on uvicorn until interrupted (Ctrl-C, SIGTERM). On the signal the
    requests in flight end at once with a 503 (streams get it as their last event), so uvicorn's
    graceful shutdown does not wait for answers that would never be read."""
    import uvicorn

    with tempfile.TemporaryDirectory(prefix="relief-serve-") as scratch:
        app = build(config, Path(scratch), say)
        server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                               timeout_graceful_shutdown=10))
        exit_uvicorn = server.handle_exit

        def handle_exit(sig, frame) -> None:
            app.state.scheduler.stop(timeout=0)
            exit_uvicorn(sig, frame)

        server.handle_exit = handle_exit
        say(f"serving on http://{config.host}:{config.port} (chat page at /, API at /v1)")
        server.run()
