"""A multi-turn conversation kept in Harmony form.

Each turn renders the whole history again (default system message, optional developer
instructions, user turns, earlier assistant turns as their final answers only: openai-harmony
drops earlier analysis), so what the model sees equals what it was trained on. The rendered
prompt only grows from turn to turn, so each turn starts from the `PromptCache` snapshot the
previous one left (see engine.py) and prefills only the new tokens; a prompt that does not
begin with the snapshot (after /reset, or a /reasoning change that rewrites the system
message) is prefilled whole. Slash commands
(/reset, /reasoning, /stats, /help, /quit) are handled by `ChatSession.command`, which returns
the text to show; the REPL itself (reading and printing) is the CLI's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

from ..data.harmony import REASONING_EFFORTS, SPECIAL_IDS
from ..errors import ReliefError
from .engine import Answer, Engine, GenerateConfig, PromptCache, answer
from .harmony_stream import Delta

QUIT = object()  # what `command` returns for /quit
HELP = ("/reset  forget the conversation\n/reasoning [low|medium|high]  show or set the reasoning effort\n"
        "/stats  timings (and routing) of the last answer\n/quit  leave (Ctrl-D too)")
_HARMONY_TEXT = re.compile("|".join(re.escape(t) for t in SPECIAL_IDS))


class ChatSession:
    """The history of one conversation and the settings its answers use."""

    def __init__(self, engine: Engine, config: GenerateConfig, system: str | None = None, reuse: bool = True):
        """`reuse=False` prefills every turn's whole prompt (no `PromptCache`)."""
        self.engine = engine
        self.config = config
        self.system = system
        self.history: list[dict] = []
        self.last: Answer | None = None
        self.prompt_cache = PromptCache() if reuse else None

    def messages(self, user_text: str) -> list[dict]:
        """The conversation to render when the user says `user_text` next."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.history, {"role": "user", "content": user_text}]

    def ask(self, user_text: str, on_delta: Callable[[Delta], None] | None = None) -> Answer:
        """Answer `user_text`; the history keeps the user turn and the final answer only."""
        if not user_text.strip():
            raise ReliefError("the message is empty; type some text")
        reply = answer(self.engine, self.messages(user_text), self.config, on_delta, prompt_cache=self.prompt_cache)
        self.last = reply
        self.history.append({"role": "user", "content": user_text})
        final = _HARMONY_TEXT.sub("", reply.final).strip()
        if final:  # a turn without a final answer leaves only the user's words behind
            self.history.append({"role": "assistant", "content": final})
        return reply

    def command(self, line: str) -> str | object:
        """Run a slash command; returns the text to show, or `QUIT`."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return QUIT
        if name == "/reset":
            self.history.clear()
            self.last = None
            if self.prompt_cache is not None:
                self.prompt_cache.clear()  # it could not be reused; free its memory
            return "conversation cleared"
        if name == "/reasoning":
            if arg:
                if arg not in REASONING_EFFORTS:
                    return f"reasoning must be one of {', '.join(REASONING_EFFORTS)}"
                self.config = replace(self.config, reasoning=arg)
            return f"reasoning: {self.config.reasoning}"
        if name == "/stats":
            return stats_text(self.last) if self.last else "no answer yet"
        return HELP


def stats_text(reply: Answer) -> str:
    """Timings, memory and (when recorded) routing of one answer."""
    prompt = f"prompt: {reply.prompt_tokens} tokens, {reply.prefill_tps:.1f} tokens/s"
    if reply.reused_tokens:
        prompt = (f"prompt: {reply.prompt_tokens} tokens, {reply.reused_tokens} reused from the last turn, "
                  f"{reply.prompt_tokens - reply.reused_tokens} prefilled at {reply.prefill_tps:.1f} tokens/s")
    lines = [prompt,
             f"answer: {reply.generated_tokens} tokens, {reply.decode_tps:.1f} tokens/s "
             f"({reply.finish_reason})",
             f"peak memory: {reply.peak_memory_gb:.2f} GB"]
    if reply.routing is not None:
        lines.append(reply.routing.table())
    return "\n".join(lines)
