"""A loaded model answering Harmony conversations: the layer between the token loop and the CLI.

`Engine.load(model, adapter)` loads the checkpoint (and a LoRA adapter) once; `answer(engine,
messages, config)` renders the conversation, runs `generate_tokens`, stops on `<|return|>` or
`<|call|>`, feeds every token to a `HarmonyStream` and returns an `Answer` (final text,
reasoning, timings, optional routing report). Text reaches the caller through `on_delta` as it
is parsed; this module prints nothing.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .. import hub
from ..data.harmony import CALL, RETURN, STOP_IDS, HarmonyTokenizer, ParsedMessage, RenderOptions, render_prompt
from ..errors import ReliefError
from ..model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .harmony_stream import Delta, HarmonyStream
from .loop import DEFAULT_PREFILL_CHUNK, generate_tokens
from .moe import RoutingProbe, RoutingReport
from .sampling import SamplingConfig

DEFAULT_CONTEXT = 131_072  # gpt-oss's max_position_embeddings, when config.json has none


@dataclass(frozen=True)
class GenerateConfig:
    """One answer's settings; each field is a `relief generate` / `relief chat` option."""

    max_tokens: int = 1024
    """Most tokens to generate (reasoning included); fewer when the context runs out."""
    reasoning: str = "medium"
    """Reasoning effort in the system message: low, medium or high."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Temperature, top-p, top-k, min-p, repetition penalty, seed."""
    logprobs: bool = False
    """Keep each generated token's log-probability."""
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    """Prompt tokens per forward pass while prefilling."""
    moe_stats: bool = False
    """Report expert routing per layer, prompt and answer apart."""
    check_routing: bool = False
    """Assert routing invariants at every step; slower."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ReliefError(f"max-tokens {self.max_tokens!r} is not valid; use a whole number, 1 or more")
        if not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1:
            raise ReliefError(f"prefill-chunk {self.prefill_chunk!r} is not valid; use a whole number, 1 or more")
        RenderOptions(reasoning_effort=self.reasoning)  # raises on a bad effort


@dataclass
class Answer:
    """What one generation produced."""

    final: str
    """The answer a user reads: the final channel's text."""
    analysis: str
    commentary: str
    messages: list[ParsedMessage]
    tokens: list[int]
    """Generated ids, the stop token included."""
    logprobs: list[float] | None
    finish_reason: str
    """stop (<|return|>), call (<|call|>), length (max_tokens) or context (context full)."""
    prompt_tokens: int
    prefill_tps: float
    decode_tps: float
    peak_memory_gb: float
    routing: RoutingReport | None = None

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        out = {"answer": self.final, "analysis": self.analysis, "finish_reason": self.finish_reason,
               "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
               "prefill_tps": round(self.prefill_tps, 2), "decode_tps": round(self.decode_tps, 2)}
        if self.commentary:
            out["commentary"] = self.commentary
        if self.logprobs is not None:
            out["tokens"], out["logprobs"] = self.tokens, [round(x, 5) for x in self.logprobs]
        if self.routing is not None:
            out["routing"] = self.routing.to_dict()
        return out


@dataclass
class Engine:
    """A model, its tokenizers and its context length, loaded once for many answers."""

    model: Any
    tokenizer: Any
    """mlx-lm's TokenizerWrapper, as `relief_mlx.load` returns it."""
    harmony: HarmonyTokenizer
    context_length: int = DEFAULT_CONTEXT

    @classmethod
    def load(cls, model: str | Path, adapter: str | Path | None = None) -> Engine:
        """Load a converted checkpoint (folder or Hub id) and optionally a LoRA adapter."""
        from ..model.load import load

        path, _ = hub.resolve(model)
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        with tempfile.TemporaryDirectory(prefix="relief-adapter-") as scratch:
            adapter_dir = adapter_folder(adapter, Path(scratch)) if adapter is not None else None
            net, tokenizer = load(path, adapter=adapter_dir)
        return cls.wrap(net, tokenizer, config.get("max_position_embeddings", DEFAULT_CONTEXT))

    @classmethod
    def wrap(cls, model: Any, tokenizer: Any, context_length: int = DEFAULT_CONTEXT) -> Engine:
        """An engine around an already loaded `(model, tokenizer)`."""
        return cls(model, tokenizer, HarmonyTokenizer.from_any(tokenizer), context_length)

    def render(self, messages: list[dict], reasoning: str) -> list[int]:
        """Prompt ids of a conversation: default system message, history, `<|start|>assistant`."""
        return render_prompt(messages, RenderOptions(reasoning_effort=reasoning), self.harmony)


def adapter_folder(path: str | Path, scratch: Path) -> Path:
    """A folder `apply_adapter` can read for `path`.

    `path` is an adapter folder (adapter_config.json + adapters.safetensors: a run folder, its
    best/ or its checkpoint/), a weights file such as mlx-lm's `0000100_adapters.safetensors`,
    or a folder of weights only; the config then comes from the nearest parent folder that has
    one, and `scratch` receives links to both files.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ReliefError(f"adapter {path} does not exist; pass a folder with {ADAPTER_CONFIG} and "
                          f"{ADAPTER_WEIGHTS} (a run folder, its best/ or checkpoint/)")
    weights = path if path.is_file() else path / ADAPTER_WEIGHTS
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file() and weights.is_file():
        return path
    if weights.suffix != ".safetensors" or not weights.is_file():
        inside = sorted(p.parent.name for p in path.glob(f"*/{ADAPTER_WEIGHTS}"))
        hint = f"; try {', '.join(str(path / name) for name in inside)}" if inside else ""
        raise ReliefError(f"adapter {path} holds no {ADAPTER_WEIGHTS}{hint or '; pass an adapter folder'}")
    config = next((d / ADAPTER_CONFIG for d in (weights.parent, *weights.parent.parents[:2])
                   if (d / ADAPTER_CONFIG).is_file()), None)
    if config is None:
        raise ReliefError(f"adapter {path}: no {ADAPTER_CONFIG} beside it or in the two folders above; "
                          "pass the run folder that holds it")
    (scratch / ADAPTER_CONFIG).symlink_to(config.resolve())
    (scratch / ADAPTER_WEIGHTS).symlink_to(weights.resolve())
    return scratch


def answer(engine: Engine, messages: list[dict], config: GenerateConfig,
           on_delta: Callable[[Delta], None] | None = None) -> Answer:
    """Answer a conversation (a list of {"role", "content"} dicts ending with the user)."""
    return complete(engine, engine.render(messages, config.reasoning), config, on_delta)


def complete(engine: Engine, prompt: Sequence[int], config: GenerateConfig,
             on_delta: Callable[[Delta], None] | None = None) -> Answer:
    """Generate after rendered prompt ids (ending with `<|start|>assistant`) until a stop token."""
    room = engine.context_length - len(prompt)
    if room < 1:
        raise ReliefError(f"the prompt is {len(prompt)} tokens, the model's context is {engine.context_length}; "
                          "shorten the prompt or the conversation")
    max_tokens = min(config.max_tokens, room)
    stream = HarmonyStream(engine.harmony.decode)
    tokens, logprobs = [], []
    mx.reset_peak_memory()
    with _probe(engine.model, config, len(prompt)) as probe:
        for step in generate_tokens(engine.model, prompt, max_tokens=max_tokens, sampling=config.sampling,
                                    logprobs=config.logprobs, prefill_chunk=config.prefill_chunk):
            tokens.append(step.token)
            logprobs.append(step.logprob)
            if probe is not None:
                probe.collect()  # counts (and checks) the steps that have finished
            _emit(stream.feed(step.token), on_delta)
            if step.token in STOP_IDS:
                break
        _emit(stream.finish(), on_delta)
        routing = probe.report() if probe is not None else None  # checks the last steps too
    return Answer(
        final=stream.text("final"), analysis=stream.text("analysis"), commentary=stream.text("commentary"),
        messages=stream.messages, tokens=tokens, logprobs=logprobs if config.logprobs else None,
        finish_reason=_finish_reason(tokens, max_tokens, config.max_tokens),
        prompt_tokens=len(prompt), prefill_tps=step.prefill_tps, decode_tps=step.decode_tps,
        peak_memory_gb=mx.get_peak_memory() / 1e9, routing=routing if config.moe_stats else None,
    )


@contextlib.contextmanager
def _probe(model: Any, config: GenerateConfig, prompt_tokens: int) -> Iterator[RoutingProbe | None]:
    """A routing probe on `model` while generating, when stats or checks are asked for."""
    if not (config.moe_stats or config.check_routing):
        yield None
        return
    probe = RoutingProbe(model, check=config.check_routing)
    try:
        probe.start(prompt_tokens)
        yield probe
    finally:
        probe.close()


def _emit(delta: Delta | None, on_delta: Callable[[Delta], None] | None) -> None:
    if delta is not None and on_delta is not None:
        on_delta(delta)


def _finish_reason(tokens: list[int], max_tokens: int, asked: int) -> str:
    if tokens and tokens[-1] == RETURN:
        return "stop"
    if tokens and tokens[-1] == CALL:
        return "call"
    return "length" if max_tokens == asked else "context"
