"""A streaming Harmony parser: token ids in, channel-tagged text out, as tokens arrive.

The prompt ends with `<|start|>assistant`, so the stream begins inside a message header:

    <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>

Header tokens are collected until `<|message|>`, so a channel name split over several
tokens ("comment" + "ary") is read whole. Body text is detokenized incrementally by a
`TextStream` (a token that ends inside a UTF-8 character waits for the next one). `<|end|>` closes a message,
`<|return|>` and `<|call|>` close it and end the answer; `<|start|>` inside a body closes it
as incomplete. Anything between messages that is not `<|start|>` is ignored.

The stop rule lives here, in one place for every caller: the answer is over (`done`) after
`<|return|>` or `<|call|>`, after an `<|end|>` that closes a final-channel message (what a model
trained on earlier turns' `final ... <|end|>` emits; Harmony parsers end the answer there too),
and after any id of the checkpoint's `eos_token_id` (e.g. `<|endoftext|>`), which closes an
open message. The parser never stops generation itself: `done` tells the caller to.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from ..data.harmony import CALL, CONSTRAIN, END, MESSAGE, RETURN, START, ParsedMessage

FIRST_SPECIAL = 199_998  # ids from here on are Harmony control tokens, never text


@dataclass(frozen=True)
class Delta:
    """New text of one message."""

    channel: str | None
    """analysis, commentary, final, or None when the header named no channel."""
    text: str
    recipient: str | None = None


class TextStream:
    """Token ids in, their text out (Harmony tokens as text) as soon as it is whole: a token that
    ends inside a UTF-8 character waits for the next one."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._done = 0  # self._ids[:self._done] is emitted text

    def feed(self, token: int) -> str:
        self._ids.append(token)
        text = self._decode(self._ids[self._done:])
        if text.endswith("\ufffd") and len(self._ids) - self._done < 4:  # a character spans 4 tokens at most
            return ""
        self._done = len(self._ids)
        return text

    def finish(self) -> str:
        """What is held back at the end (a cut-off character decodes as U+FFFD)."""
        text = self._decode(self._ids[self._done:])
        self._done = len(self._ids)
        return text


@dataclass
class _Message:
    body: TextStream
    header: list[int] = field(default_factory=list)
    role: str = "assistant"
    channel: str | None = None
    recipient: str | None = None
    text: str = ""


class HarmonyStream:
    """Feed generated token ids one by one; read `Delta`s back and `messages` at any time."""

    def __init__(self, decode: Callable[[Sequence[int]], str], role: str = "assistant",
                 stop_ids: Collection[int] = ()):
        """`decode` turns token ids into text (special tokens included); `role` is the role the
        prompt already opened (`<|start|>assistant`); `stop_ids` end the answer too (the
        checkpoint's `eos_token_id`)."""
        self._decode = decode
        self._stop_ids = frozenset(stop_ids) - {END, START}
        self._done: list[ParsedMessage] = []
        self._current: _Message | None = self._new()
        self._prefix_role: str | None = role  # the first header's role is in the prompt
        self._in_body = False
        self.stop_token: int | None = None

    @property
    def done(self) -> bool:
        """True once the answer is over: `<|return|>`, `<|call|>`, `<|end|>` closing a final
        message, or a stop id arrived (`stop_token` says which)."""
        return self.stop_token is not None

    @property
    def channel(self) -> str | None:
        """The channel of the message body being read, or None between messages and in headers."""
        return self._current.channel if self._current is not None and self._in_body else None

    def feed(self, token: int) -> Delta | None:
        """Take one token; return the text it added to a message body, if any."""
        if self.done:
            return None
        if token in (END, RETURN, CALL, START) or token in self._stop_ids:
            final = self.channel == "final"
            delta = self._close(complete=token != START) if self._in_body else None
            self._current = self._new() if token == START else None
            self._prefix_role = None  # a new header spells out its role
            if token in (RETURN, CALL) or token in self._stop_ids or (token == END and final):
                self.stop_token = token
            return delta
        current = self._current
        if current is None:
            return None  # between messages, only <|start|> matters
        if not self._in_body:
            if token == MESSAGE:
                self._open_body(current)
            else:
                current.header.append(token)
            return None
        if token >= FIRST_SPECIAL:
            return None  # a stray control token is not text
        return self._emit(current, current.body.feed(token))

    def finish(self) -> Delta | None:
        """End of the stream: flush held-back text; an open message stays incomplete."""
        if self._current is not None and self._in_body:
            return self._emit(self._current, self._current.body.finish())
        return None

    @property
    def messages(self) -> list[ParsedMessage]:
        """Every message so far; one still open has complete=False."""
        out = list(self._done)
        current = self._current
        if current is not None and self._in_body:
            out.append(ParsedMessage(current.role, current.channel, current.text,
                                     current.recipient, complete=False))
        return out

    def text(self, channel: str) -> str:
        """All text of `channel` so far, messages joined by blank lines."""
        return "\n\n".join(m.content for m in self.messages if m.channel == channel and m.content)

    # ------------------------------------------------------------ internals

    def _new(self) -> _Message:
        return _Message(TextStream(self._decode))

    def _open_body(self, m: _Message) -> None:
        head, _, chan = self._decode([t for t in m.header if t != CONSTRAIN]).partition("<|channel|>")
        head = f"{self._prefix_role or ''}{head}"
        words = f"{head} {chan}".split()
        m.role = head.split()[0] if head.split() else "assistant"
        m.channel = chan.split()[0] if chan.split() else None
        m.recipient = next((w[3:] for w in words if w.startswith("to=")), None)
        self._in_body = True

    def _emit(self, m: _Message, text: str) -> Delta | None:
        if not text:
            return None
        m.text += text
        return Delta(m.channel, text, m.recipient)

    def _close(self, complete: bool) -> Delta | None:
        m = self._current
        delta = self._emit(m, m.body.finish())
        self._done.append(ParsedMessage(m.role, m.channel, m.text, m.recipient, complete))
        self._in_body = False
        return delta


def parse_tokens(tokens: Sequence[int], decode: Callable[[Sequence[int]], str],
                 stop_ids: Collection[int] = ()) -> HarmonyStream:
    """Parse a whole token list (e.g. a finished generation) up to the stop rule; return the parser."""
    stream = HarmonyStream(decode, stop_ids=stop_ids)
    for t in tokens:
        stream.feed(t)
        if stream.done:
            break
    stream.finish()
    return stream
