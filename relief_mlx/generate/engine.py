"""A loaded model answering Harmony conversations: the layer between the token loop and the CLI.

`Engine.load(model, adapter)` loads the checkpoint (and a LoRA adapter) once, with the Harmony
tokenizer read straight from its tokenizer.json; `answer(engine, messages, config)` renders the
conversation, runs `generate_tokens` and feeds every token to an `AnswerStream`, which parses it
(`HarmonyStream`), applies the stop rule (`<|return|>`, `<|call|>`, `<|end|>` closing a final
message, the checkpoint's `eos_token_id`) and builds the `Answer` (final text, reasoning,
timings, optional routing report). The batched paths (`batch.py`, the server) feed their rows'
steps to `AnswerStream`s too, so every path stops and parses the same way. Text reaches the
caller through `on_delta` as it is parsed, and (Harmony tokens included) through `on_text` as it
is decoded; this module prints nothing.

Prompt caching. A chat's prompt for turn k+1 starts with the prompt of turn k: the history
only grows, and the answer enters it as `<|channel|>final<|message|>...<|end|>` right after
the `assistant` that ended turn k's prompt. So `complete` feeds the prompt (but its last
token) into fresh caches in chunks, keeps a `PromptCache` snapshot of them, then generates,
and the next prompt that starts with the snapshot's tokens restores it and prefills only the
tokens after them. Any other prompt (a new system message after /reasoning, a new date, a
reset conversation) starts from empty caches: nothing but an exact prefix is ever reused (see
`loop.PromptCache` for why snapshots and not `trim`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .. import hub
from ..data.harmony import CALL, START, HarmonyTokenizer, ParsedMessage, RenderOptions, render_prompt
from ..errors import ReliefError
from ..model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .harmony_stream import Delta, HarmonyStream, TextStream
from .loop import DEFAULT_PREFILL_CHUNK, PromptCache, Step, feed, generate_tokens
from .moe import RoutingProbe, RoutingReport
from .sampling import SamplingConfig

__all__ = ["Answer", "AnswerStream", "Engine", "GenerateConfig", "PromptCache", "adapter_folder", "answer",
           "check_context", "complete", "stop_ids"]

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
    """stop (<|return|>, a final message's <|end|>, an eos id), call (<|call|>), length (max_tokens)
    or context (context full)."""
    prompt_tokens: int
    """The whole prompt, reused tokens included."""
    prefill_tps: float
    """Prompt tokens run through the model (reused ones not) per second, first sample included."""
    decode_tps: float
    peak_memory_gb: float
    routing: RoutingReport | None = None
    reused_tokens: int = 0
    """Leading prompt tokens restored from a `PromptCache` instead of prefilled."""

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        out = {"answer": self.final, "analysis": self.analysis, "finish_reason": self.finish_reason,
               "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
               "prefill_tps": round(self.prefill_tps, 2), "decode_tps": round(self.decode_tps, 2)}
        if self.commentary:
            out["commentary"] = self.commentary
        if self.reused_tokens:
            out["reused_tokens"] = self.reused_tokens
        if self.logprobs is not None:
            out["tokens"], out["logprobs"] = self.tokens, [round(x, 5) for x in self.logprobs]
        if self.routing is not None:
            out["routing"] = self.routing.to_dict()
        return out


@dataclass
class Engine:
    """A model, its Harmony tokenizer, context length and stop ids, loaded once for many answers."""

    model: Any
    harmony: HarmonyTokenizer
    context_length: int = DEFAULT_CONTEXT
    stop_ids: frozenset[int] = frozenset()
    """The checkpoint's `eos_token_id`s (config.json and generation_config.json): each ends an answer."""

    @classmethod
    def load(cls, model: str | Path, adapter: str | Path | None = None) -> Engine:
        """Load a converted checkpoint (folder or Hub id) and optionally a LoRA adapter. The
        tokenizer is read from the folder's tokenizer.json as it is: mlx-lm's wrapper (an HF
        tokenizer, seconds to build) is never made."""
        from ..model.load import load_model

        path, _ = hub.resolve(model)
        with tempfile.TemporaryDirectory(prefix="relief-adapter-") as scratch:
            adapter_dir = adapter_folder(adapter, Path(scratch)) if adapter is not None else None
            net, config = load_model(path, adapter=adapter_dir)
        return cls(net, HarmonyTokenizer.from_dir(path), config.get("max_position_embeddings", DEFAULT_CONTEXT),
                   stop_ids(path))

    @classmethod
    def wrap(cls, model: Any, tokenizer: Any, context_length: int = DEFAULT_CONTEXT) -> Engine:
        """An engine around an already loaded `(model, tokenizer)` (`relief_mlx.load`'s)."""
        return cls(model, HarmonyTokenizer.from_any(tokenizer), context_length,
                   frozenset(getattr(tokenizer, "eos_token_ids", ())))

    def render(self, messages: list[dict], reasoning: str) -> list[int]:
        """Prompt ids of a conversation: default system message, history, `<|start|>assistant`."""
        return render_prompt(messages, RenderOptions(reasoning_effort=reasoning), self.harmony)

    def head_length(self, prompt: Sequence[int]) -> int:
        """Tokens of a rendered prompt before its first user message: the system (and developer)
        messages that many conversations share, worth a prompt-cache snapshot of their own."""
        user = self.harmony.encode("user")
        starts = [i for i, t in enumerate(prompt) if t == START and list(prompt[i + 1:i + 1 + len(user)]) == user]
        return starts[0] if starts else 0


def stop_ids(path: Path) -> frozenset[int]:
    """Every `eos_token_id` of a checkpoint folder's config.json and generation_config.json."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        file = path / name
        value = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
        ids |= {value} if isinstance(value, int) else set(value or ())
    return frozenset(ids)


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


class AnswerStream:
    """One answer as it is generated, whatever produced its steps (one sequence or a batch row):
    each token goes to a `HarmonyStream`, which holds the stop rule, and its text to `on_delta`
    (parsed) and `on_text` (raw, Harmony tokens included) as it arrives."""

    def __init__(self, engine: Engine, max_tokens: int, logprobs: bool = False,
                 on_delta: Callable[[Delta], None] | None = None, on_text: Callable[[str], None] | None = None):
        self.harmony = HarmonyStream(engine.harmony.decode, stop_ids=engine.stop_ids)
        self.max_tokens = max_tokens
        self.tokens: list[int] = []
        self.logprobs: list[float | None] | None = [] if logprobs else None
        self.last: Step | None = None
        self._text = TextStream(engine.harmony.decode) if on_text is not None else None
        self._on_delta, self._on_text = on_delta, on_text

    @property
    def done(self) -> bool:
        """True once the stop rule says so or `max_tokens` tokens are in."""
        return self.harmony.done or len(self.tokens) >= self.max_tokens

    def feed(self, step: Step) -> Delta | None:
        """Take one generated step; return the parsed text it added, if any."""
        self.last = step
        self.tokens.append(step.token)
        if self.logprobs is not None:
            self.logprobs.append(step.logprob)
        delta = self.harmony.feed(step.token)
        _emit(delta, self._on_delta)
        if self._text is not None:
            _emit(self._text.feed(step.token), self._on_text)
        return delta

    def close(self) -> Delta | None:
        """The end of generation: flush held-back text; return the parsed part of it."""
        delta = self.harmony.finish()
        _emit(delta, self._on_delta)
        if self._text is not None:
            _emit(self._text.finish(), self._on_text)
        return delta

    def finish_reason(self, asked: int) -> str:
        """stop or call (the stop rule), else length (`asked` tokens made) or context (it was full)."""
        if self.harmony.stop_token is not None:
            return "call" if self.harmony.stop_token == CALL else "stop"
        return "length" if self.max_tokens == asked else "context"

    def answer(self, asked: int, prompt_tokens: int, prefill_tps: float, decode_tps: float,
               reused_tokens: int = 0, routing: RoutingReport | None = None) -> Answer:
        h = self.harmony
        return Answer(final=h.text("final"), analysis=h.text("analysis"), commentary=h.text("commentary"),
                      messages=h.messages, tokens=self.tokens, logprobs=self.logprobs,
                      finish_reason=self.finish_reason(asked), prompt_tokens=prompt_tokens, prefill_tps=prefill_tps,
                      decode_tps=decode_tps, peak_memory_gb=mx.get_peak_memory() / 1e9, routing=routing,
                      reused_tokens=reused_tokens)


def answer(engine: Engine, messages: list[dict], config: GenerateConfig,
           on_delta: Callable[[Delta], None] | None = None, on_text: Callable[[str], None] | None = None,
           prompt_cache: PromptCache | None = None) -> Answer:
    """Answer a conversation (a list of {"role", "content"} dicts ending with the user)."""
    return complete(engine, engine.render(messages, config.reasoning), config, on_delta, on_text, prompt_cache)


def complete(engine: Engine, prompt: Sequence[int], config: GenerateConfig,
             on_delta: Callable[[Delta], None] | None = None, on_text: Callable[[str], None] | None = None,
             prompt_cache: PromptCache | None = None) -> Answer:
    """Generate after rendered prompt ids (ending with `<|start|>assistant`) until a stop token.

    `on_delta` gets parsed message text, `on_text` all generated text as it is decoded. With
    `prompt_cache`, start from its snapshot when the prompt begins with its tokens, and leave
    this prompt's snapshot in it.
    """
    prompt = list(prompt)
    check_context(len(prompt), engine.context_length)  # the whole prompt: reused tokens fill the context too
    max_tokens = min(config.max_tokens, engine.context_length - len(prompt))
    # generate_tokens gets the tokens its repetition penalty looks back at (else only the last)
    penalized = config.sampling.repetition_penalty != 1
    split = len(prompt) - min(len(prompt), config.sampling.repetition_context if penalized else 1)
    stream = AnswerStream(engine, max_tokens, config.logprobs, on_delta, on_text)
    mx.reset_peak_memory()
    start = time.perf_counter()
    cache, reused = (prompt_cache.restore(engine.model, prompt[:split]) if prompt_cache is not None
                     else (engine.model.make_cache(), 0))
    with _probe(engine.model, config, len(prompt) - reused) as probe:
        feed(engine.model, prompt[reused:split], cache, config.prefill_chunk)
        if prompt_cache is not None:
            prompt_cache.keep(cache, prompt[:split])
        fed_s = time.perf_counter() - start
        for step in generate_tokens(engine.model, prompt[split:], max_tokens=max_tokens, sampling=config.sampling,
                                    logprobs=config.logprobs, cache=cache, prefill_chunk=config.prefill_chunk):
            stream.feed(step)
            if probe is not None:
                probe.collect()  # counts (and checks) the steps that have finished
            if stream.done:
                break
        stream.close()
        routing = probe.report() if probe is not None else None  # checks the last steps too
    return stream.answer(config.max_tokens, len(prompt), (len(prompt) - reused) / (fed_s + step.prefill_s),
                         step.decode_tps, reused, routing if config.moe_stats else None)


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


def _emit(item: Delta | str | None, to: Callable[[Any], None] | None) -> None:
    if item and to is not None:
        to(item)


def check_context(prompt_tokens: int, context_length: int) -> None:
    """Raise when a prompt leaves no room for a single generated token."""
    if prompt_tokens >= context_length:
        raise ReliefError(f"the prompt is {prompt_tokens} tokens, the model's context is {context_length}; "
                          "shorten the prompt or the conversation")
