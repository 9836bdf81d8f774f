"""`relief generate --raw` streams: the generated text, Harmony tokens included, printed while
it is generated, in whole characters only."""

from __future__ import annotations

import click
from click.testing import CliRunner
from gen_helpers import harmony_ids

from relief_mlx.cli import cli
from relief_mlx.data.harmony import CHANNEL, END, MESSAGE, RETURN, START
from relief_mlx.generate import Engine, GenerateConfig, answer

FINAL = "水を沸かす 🧯"  # "沸" takes two tokens, "🧯" three


def script(tok) -> list[int]:
    return harmony_ids(tok, CHANNEL, "analysis", MESSAGE, "Fire: 🧯 first", END,
                       START, "assistant", CHANNEL, "final", MESSAGE, FINAL, RETURN)


def test_text_arrives_in_pieces_of_whole_characters(scripted_engine, harmony_tokenizer):
    tok = harmony_tokenizer
    tokens = script(tok)
    assert sum("\ufffd" in tok.decode([t]) for t in tokens) >= 5  # characters split over tokens
    pieces = []
    reply = answer(scripted_engine(tokens), [{"role": "user", "content": "Fire?"}], GenerateConfig(),
                   on_text=pieces.append)
    assert reply.tokens == tokens and reply.final == FINAL
    assert "".join(pieces) == tok.decode(tokens)
    assert len(pieces) > 10 and not any("\ufffd" in p for p in pieces)
    assert " 🧯" in pieces and "<|channel|>" in pieces  # a character whole; a Harmony token as text


def test_raw_prints_while_generating(monkeypatch, scripted_engine, harmony_tokenizer):
    tok = harmony_tokenizer
    engine = scripted_engine(script(tok))
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, model, adapter=None: engine))
    printed = []  # (what cli.py echoed, forward passes the model had run by then)
    echo = click.echo

    def spy(message=None, **kwargs):
        if not kwargs.get("err"):  # stdout only (stderr says "loading m ..." first)
            printed.append((message, engine.model.calls))
        echo(message, **kwargs)

    monkeypatch.setattr(click, "echo", spy)
    result = CliRunner().invoke(cli, ["generate", "--model", "m", "--prompt", "Fire?", "--raw"])
    assert result.exit_code == 0, result.output
    assert result.stdout == tok.decode(script(tok)) + "\n"
    streamed = printed[:[message for message, _ in printed].index(None)]  # up to the closing newline
    assert "".join(message for message, _ in streamed) == result.stdout[:-1]
    assert len(streamed) > 10 and streamed[0][1] < streamed[-1][1]  # printed before the model was done
    assert "tokens/s" in result.stderr and "peak memory" in result.stderr
