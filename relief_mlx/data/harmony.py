"""Harmony rendering: conversations -> token ids + a per-token training mask (parsing generated
tokens back into messages is `relief_mlx.generate.harmony_stream`).

A message renders as `<|start|>{role}[<|channel|>{channel}]<|message|>{content}{closer}`. Text
pieces go through the tokenizer's plain encode (text that looks like `<|end|>` stays text, as in
openai-harmony); special ids are inserted directly. Given the same messages, the result equals
openai-harmony's `render_conversation_for_training` / `render_conversation_for_completion`
token for token (tests check it). Which analysis is kept is decided here, not by openai-harmony's
`auto_drop_analysis`: that drops analysis before the *first* final message only, so it would drop
a single-turn example's analysis and keep a middle turn's.

Rules:
- a default system message (`RenderOptions`) opens every conversation;
- a "system" (or "developer") message from the data becomes the developer message
  `# Instructions\\n\\n{content}`;
- assistant analysis (`thinking`) is rendered only for the last message of a training render;
  earlier turns keep their final answer only, closed by `<|end|>`, and a generation prompt
  holds no analysis (the rule of gpt-oss's chat template and of the Harmony guide);
- the last assistant message of a training render closes with `<|return|>`.

Mask: `mask[i]` is True when token i is a training target (predicted from tokens < i), so
`mask[0]` is never used; `mask.sum()` is the number of trained tokens, the loss normalizer.
Header tokens (`<|start|>assistant<|channel|>final<|message|>`) are never trained except in
mode "all": the model learns the content and the closer that ends it.
"""

from __future__ import annotations

import datetime
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..choices import MASK_MODES, REASONING_EFFORTS
from ..errors import ReliefError

# Special ids of o200k_harmony (relief_mlx.checkpoint.tokenizer writes the same table).
START, END, MESSAGE, CHANNEL = 200_006, 200_007, 200_008, 200_005
RETURN, CALL, CONSTRAIN = 200_002, 200_012, 200_003
PAD = 199_999  # <|endoftext|>, the pad token of gpt-oss
SPECIAL_IDS = {
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|channel|>": CHANNEL,
    "<|return|>": RETURN,
    "<|call|>": CALL,
    "<|constrain|>": CONSTRAIN,
    "<|endoftext|>": PAD,
}
# Generation stops on these; <|end|> only ends one message (e.g. the analysis).
STOP_IDS = (RETURN, CALL)

DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
VALID_CHANNELS = (
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
)
ROLES = ("system", "developer", "user", "assistant")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class RenderOptions:
    """How a conversation is rendered; one instance per run, saved with the recipe."""

    reasoning_effort: str = "medium"
    """`Reasoning:` line of the system message: low, medium or high."""
    current_date: str | None = None
    """`Current date:` as YYYY-MM-DD; None means today. Fix it for training so tokens reproduce."""
    model_identity: str = DEFAULT_IDENTITY
    """First line of the system message."""

    def __post_init__(self) -> None:
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise ReliefError(
                f"reasoning_effort {self.reasoning_effort!r} is not one of "
                f"{', '.join(REASONING_EFFORTS)}; pick one of those"
            )
        if self.current_date is not None and not _DATE.fullmatch(self.current_date):
            raise ReliefError(
                f"current_date {self.current_date!r} is not YYYY-MM-DD; write it like 2025-06-01"
            )

    @classmethod
    def of(cls, data: Any) -> RenderOptions:
        """The options a recipe's `[data]` section (`relief_mlx.recipe.DataSection`) renders with."""
        return cls(reasoning_effort=data.reasoning_effort, current_date=data.current_date)

    def date(self) -> str:
        return self.current_date or datetime.date.today().isoformat()


def system_text(options: RenderOptions) -> str:
    """The default system message, laid out exactly as openai-harmony's `SystemContent.new()`."""
    return (
        f"{options.model_identity}\n"
        f"Knowledge cutoff: {KNOWLEDGE_CUTOFF}\n"
        f"Current date: {options.date()}\n\n"
        f"Reasoning: {options.reasoning_effort}\n\n"
        f"{VALID_CHANNELS}"
    )


class HarmonyTokenizer:
    """Plain-text encode/decode over an o200k_harmony `tokenizers.Tokenizer`.

    Holds its own copy of the backend with `encode_special_tokens` on, so special-looking text
    in content encodes as text (as openai-harmony does) without changing the caller's tokenizer.
    """

    def __init__(self, backend: Any, copy: bool = True) -> None:
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(backend.to_str()) if copy else backend
        self.backend.encode_special_tokens = True
        for text, want in SPECIAL_IDS.items():
            if self.backend.token_to_id(text) != want:
                raise ReliefError(
                    f"the tokenizer maps {text} to {self.backend.token_to_id(text)}, not {want}: "
                    "it is not gpt-oss's o200k_harmony; pass a gpt-oss tokenizer folder"
                )

    @classmethod
    def from_dir(cls, path: str | Path) -> HarmonyTokenizer:
        """Load `path/tokenizer.json` (a converted model or a tokenizer folder)."""
        from tokenizers import Tokenizer

        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise ReliefError(
                f"{file} does not exist; pass a folder holding gpt-oss's tokenizer.json"
            )
        return cls(Tokenizer.from_file(str(file)), copy=False)

    @classmethod
    def from_any(cls, tok: Any) -> HarmonyTokenizer:
        """Accept a HarmonyTokenizer, a `tokenizers.Tokenizer`, an HF fast tokenizer or mlx-lm's
        TokenizerWrapper (what generation code holds)."""
        if isinstance(tok, HarmonyTokenizer):
            return tok
        inner = getattr(tok, "_tokenizer", tok)  # mlx_lm TokenizerWrapper -> HF tokenizer
        return cls(getattr(inner, "backend_tokenizer", inner))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> HarmonyTokenizer:
    """gpt-oss's tokenizer built offline from the o200k_base ranks (cached on disk)."""
    from ..checkpoint.tokenizer import cached_tokenizer_json

    return HarmonyTokenizer.from_dir(cached_tokenizer_json().parent)


def resolve_tokenizer(tokenizer: Any = None) -> HarmonyTokenizer:
    """None: the default o200k_harmony; a str/Path: a folder holding tokenizer.json; else any
    object `HarmonyTokenizer.from_any` takes. Wrapping an object copies its backend (about a
    second), so callers in loops resolve once and pass the HarmonyTokenizer."""
    if tokenizer is None:
        return default_tokenizer()
    if isinstance(tokenizer, (str, Path)):
        return HarmonyTokenizer.from_dir(tokenizer)
    return HarmonyTokenizer.from_any(tokenizer)


# ---------------------------------------------------------------- messages


def message_problem(messages: Any, for_training: bool) -> str | None:
    """What is wrong with a list of chat messages, in a few words, or None when valid."""
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list"
    for i, m in enumerate(messages):
        problem = _one_message_problem(m, strict=for_training)
        if problem:
            return f"message {i}: {problem}"
    roles = [m["role"] for m in messages]
    if any(r in ("system", "developer") for r in roles[1:]):
        return "a system/developer message may only come first"
    talk = roles[1:] if roles[0] in ("system", "developer") else roles
    if not talk or talk[0] != "user":
        return "the conversation must start with a user message (after an optional system one)"
    if for_training and "assistant" not in talk:
        return "no assistant turn to train on; add an assistant message"
    if for_training and talk[-1] != "assistant":
        return "the last message must be from the assistant (it is the one trained)"
    return None


def _one_message_problem(m: Any, strict: bool) -> str | None:
    if not isinstance(m, dict):
        return "must be an object with role and content"
    if m.get("role") not in ROLES:
        return f"role {m.get('role')!r} is not one of {', '.join(ROLES)}"
    for key in ("content", "thinking"):
        value = m.get(key)
        if key == "thinking" and value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            return f"{key} is empty or not a string"
        if key == "thinking" and m["role"] != "assistant":
            return "only assistant messages may carry `thinking`"
        # In training data such text is a pasted rendering, not content; a live prompt may hold it.
        token = next((t for t in SPECIAL_IDS if t in value), None) if strict else None
        if token:
            return f"{key} contains the Harmony token text {token}; write plain text only"
    return None


def _check(messages: Any, for_training: bool) -> None:
    problem = message_problem(messages, for_training)
    if problem:
        raise ReliefError(f"bad conversation: {problem}; fix the messages passed in")


# ---------------------------------------------------------------- rendering


@dataclass
class _Piece:
    """A run of tokens with one role in the mask."""

    ids: list[int]
    kind: str  # "prompt" | "header" | "final" | "analysis"
    turn: int  # -1 for the system/developer head, else the index of the user turn
    last: bool = False  # part of the conversation's last message


@dataclass
class Rendered:
    """A rendered conversation, as pieces that can be masked and shortened by whole turns."""

    pieces: list[_Piece] = field(default_factory=list)

    def ids(self) -> list[int]:
        return [t for p in self.pieces for t in p.ids]

    def mask(self, mode: str) -> np.ndarray:
        return np.concatenate(
            [np.full(len(p.ids), _trained(p, mode), dtype=bool) for p in self.pieces]
        )

    def turns(self) -> list[int]:
        return sorted({p.turn for p in self.pieces if p.turn >= 0})

    def without_turn(self, turn: int) -> Rendered:
        return Rendered([p for p in self.pieces if p.turn != turn])


def _trained(piece: _Piece, mode: str) -> bool:
    if mode == "all":
        return True
    if mode == "final":
        return piece.kind == "final"
    if mode == "last":
        return piece.kind == "final" and piece.last
    if mode == "final+analysis":
        return piece.kind in ("final", "analysis")
    raise ReliefError(
        f"mask mode {mode!r} is not one of {', '.join(MASK_MODES)}; pick one of those"
    )


def _header(tok: HarmonyTokenizer, role: str, channel: str | None) -> list[int]:
    ids = [START, *tok.encode(role)]
    if channel:
        ids += [CHANNEL, *tok.encode(channel)]
    return [*ids, MESSAGE]


def _plain(tok: HarmonyTokenizer, role: str, text: str, turn: int) -> _Piece:
    return _Piece([*_header(tok, role, None), *tok.encode(text), END], "prompt", turn)


def _render(
    tok: HarmonyTokenizer, messages: list[dict], options: RenderOptions, for_training: bool
) -> Rendered:
    out = Rendered([_plain(tok, "system", system_text(options), -1)])
    if messages[0]["role"] in ("system", "developer"):
        instructions = f"# Instructions\n\n{messages[0]['content']}"
        out.pieces.append(_plain(tok, "developer", instructions, -1))
        messages = messages[1:]
    turn = -1
    for i, m in enumerate(messages):
        if m["role"] == "user":
            # Consecutive user messages belong to one turn; a turn is dropped whole.
            turn += 1 if i == 0 or messages[i - 1]["role"] != "user" else 0
            out.pieces.append(_plain(tok, "user", m["content"], turn))
            continue
        last = i == len(messages) - 1
        out.pieces += _assistant(tok, m, turn, last, for_training and last)
    return out


def _assistant(
    tok: HarmonyTokenizer, m: dict, turn: int, last: bool, training_last: bool
) -> list[_Piece]:
    pieces = []
    # openai-harmony drops analysis of earlier turns; only the trained last message keeps it.
    if training_last and m.get("thinking"):
        pieces.append(_Piece(_header(tok, "assistant", "analysis"), "header", turn, last))
        pieces.append(_Piece([*tok.encode(m["thinking"]), END], "analysis", turn, last))
    pieces.append(_Piece(_header(tok, "assistant", "final"), "header", turn, last))
    closer = RETURN if training_last else END
    pieces.append(_Piece([*tok.encode(m["content"]), closer], "final", turn, last))
    return pieces


def render_training_pieces(
    messages: list[dict], options: RenderOptions, tokenizer: Any = None
) -> Rendered:
    """Render a conversation ending with an assistant message, as maskable pieces."""
    _check(messages, for_training=True)
    tok = resolve_tokenizer(tokenizer)
    return _render(tok, messages, options, for_training=True)


def render_training(
    messages: list[dict],
    options: RenderOptions,
    mask_mode: str = "final",
    tokenizer: Any = None,
) -> tuple[list[int], np.ndarray]:
    """Token ids and the bool training mask of a conversation that ends with the assistant.

    mask_mode: "final" (every assistant final answer + its closer), "last" (the last one only),
    "final+analysis" (also the last turn's analysis), "all" (every token).
    """
    rendered = render_training_pieces(messages, options, tokenizer)
    return rendered.ids(), rendered.mask(mask_mode)


def render_prompt(messages: list[dict], options: RenderOptions, tokenizer: Any = None) -> list[int]:
    """Prompt ids for generation: the conversation (earlier analysis dropped), then
    `<|start|>assistant`. Stop generating on `STOP_IDS`."""
    _check(messages, for_training=False)
    tok = resolve_tokenizer(tokenizer)
    ids = _render(tok, messages, options, for_training=False).ids()
    return [*ids, START, *tok.encode("assistant")]


# ---------------------------------------------------------------- parsed messages


@dataclass(frozen=True)
class ParsedMessage:
    """One message parsed from generated tokens (by `relief_mlx.generate.harmony_stream`)."""

    role: str
    channel: str | None
    content: str
    recipient: str | None = None
    complete: bool = True  # False when generation stopped before the closer
