"""Property-based fuzzing (hypothesis) of every reader of untrusted input: no input produces a
traceback; every rejection is the package's own error (ReliefError, or the server's 4xx ApiError),
and what is accepted is usable. The `ci` profile (tests/conftest.py) keeps each property to 60
derandomized examples; a soak run tries 20,000 each:

    python -m pytest tests/safety/test_fuzz.py --hypothesis-profile=soak
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relief_mlx.checkpoint.safetensors_header import DTYPE_BYTES, check
from relief_mlx.data.dataset import read_jsonl
from relief_mlx.data.harmony import RenderOptions, render_prompt, render_training
from relief_mlx.data.scoring import scoring_problems
from relief_mlx.errors import ReliefError
from relief_mlx.eval.score import score
from relief_mlx.generate.harmony_stream import HarmonyStream
from relief_mlx.recipe import SECTIONS, from_dict, read_tables

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4), max_leaves=20)
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "", "USER"])
TEXT = st.text(max_size=60) | st.sampled_from(["<|end|>", "<|start|>assistant", "\ud800", "  ", "caf\u00e9 \U0001f600"])
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": TEXT | JSON},
                                optional={"thinking": TEXT | st.integers(), "name": st.text(max_size=5)})
CONVERSATION = st.lists(MESSAGE, max_size=6) | JSON


def counted(survival, example: object) -> None:
    survival.tried(repr(example)[:80])


# ---------------------------------------------------------------- the dataset reader


@pytest.mark.survives("fuzzed input", "dataset reader: random bytes and random JSON lines")
@given(lines=st.lists(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode())
                      | st.builds(lambda m: json.dumps({"messages": m}).encode(), CONVERSATION), min_size=1,
                      max_size=5))
def test_the_dataset_reader_takes_any_bytes(lines, survival):
    counted(survival, lines)
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "train.jsonl"
        file.write_bytes(b"\n".join(lines) + b"\n")
        try:
            dataset = read_jsonl(file, "train")
        except ReliefError as e:
            assert "\n" not in str(e) and str(file) in str(e)
            return
        assert all(r.split == "train" for r in dataset.records())


# ---------------------------------------------------------------- Harmony rendering and parsing


@pytest.mark.survives("fuzzed input", "Harmony renderer: random conversations, for training and as prompts")
@given(messages=CONVERSATION, effort=st.sampled_from(["low", "medium", "high"]))
def test_the_harmony_renderer_renders_or_refuses(messages, effort, harmony_tokenizer, survival):
    counted(survival, messages)
    options = RenderOptions(reasoning_effort=effort, current_date="2025-08-05")
    for render in (lambda: render_training(messages, options, "final", harmony_tokenizer),
                   lambda: render_prompt(messages, options, harmony_tokenizer)):
        try:
            out = render()
        except ReliefError as e:
            assert "\n" not in str(e)
            continue
        ids = out[0] if isinstance(out, tuple) else out
        assert ids and all(isinstance(t, int) and 0 <= t < 201_088 for t in ids)


@pytest.mark.survives("fuzzed input", "Harmony streaming parser: random token ids, control tokens included")
@given(tokens=st.lists(st.integers(0, 201_087) | st.sampled_from([200_002, 200_003, 200_005, 200_006, 200_007,
                                                                   200_008, 200_012, 199_999]), max_size=80))
def test_the_streaming_parser_takes_any_token_sequence(tokens, harmony_tokenizer, survival):
    counted(survival, tokens)
    stream = HarmonyStream(harmony_tokenizer.decode)
    text = ""
    for token in tokens:
        delta = stream.feed(token)
        text += delta.text if delta else ""
    final = stream.finish()
    text += final.text if final else ""
    assert text == "".join(m.content for m in stream.messages)  # every delta belongs to a message


# ---------------------------------------------------------------- recipes


SECTION = st.sampled_from([*SECTIONS, "optimizer", ""])
KEYS = st.sampled_from(["path", "max_length", "rank", "targets", "learning_rate", "epochs", "betas", "dir",
                        "every", "enabled", "dtype", "mask", "unknown"])


@pytest.mark.survives("fuzzed input", "recipe loader: random tables of sections, keys and values")
@given(tables=st.dictionaries(SECTION, st.dictionaries(KEYS, JSON, max_size=4) | JSON, max_size=4))
def test_the_recipe_loader_validates_any_tables(tables, survival):
    counted(survival, tables)
    try:
        recipe = from_dict(tables, "fuzzed.toml")
    except ReliefError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzzed.toml")
        return
    assert recipe.lora.rank >= 1 and recipe.data.max_length >= 16


@pytest.mark.survives("fuzzed input", "recipe file reader: random bytes as a .toml file")
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_the_recipe_file_reader_takes_any_bytes(raw, survival):
    counted(survival, raw)
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "r.toml"
        file.write_bytes(raw)
        try:
            assert isinstance(read_tables(file), dict)
        except ReliefError as e:
            assert str(file) in str(e)


# ---------------------------------------------------------------- safetensors headers


ENTRY = st.fixed_dictionaries({"dtype": st.sampled_from([*DTYPE_BYTES, "F128", ""]) | JSON,
                               "shape": st.lists(st.integers(-2, 6), max_size=3) | JSON,
                               "data_offsets": st.lists(st.integers(-4, 200), min_size=2, max_size=2) | JSON})
HEADER = st.dictionaries(st.text(min_size=1, max_size=6), ENTRY, max_size=3) | JSON


@pytest.mark.survives("fuzzed input", "safetensors header reader: random headers and files; what it accepts MLX loads")
@given(header=HEADER, data=st.integers(0, 200), length_delta=st.sampled_from([0, 0, 0, 1, -1, 2**40]),
       raw=st.none() | st.binary(max_size=64))
def test_what_the_header_check_accepts_mlx_loads(header, data, length_delta, raw, survival):
    import mlx.core as mx

    counted(survival, (header, data, raw))
    body = json.dumps(header).encode()
    content = raw if raw is not None else struct.pack("<Q", max(len(body) + length_delta, 0)) + body + bytes(data)
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "x.safetensors"
        file.write_bytes(content)
        try:
            check(file)
        except ReliefError as e:
            assert "\n" not in str(e) and str(file) in str(e)
            return
        mx.eval(list(mx.load(str(file), format="safetensors").values()))  # never a crash past the check


# ---------------------------------------------------------------- the eval scorer


FACT = st.fixed_dictionaries({"fact": st.text(min_size=1, max_size=10)},
                             optional={"any": st.lists(st.text(max_size=12), max_size=3), "regex": st.text(max_size=8)})


@pytest.mark.survives("fuzzed input", "eval scorer: random answers against random (validated) scoring fields")
@given(answer=st.text(max_size=300), facts=st.lists(FACT, min_size=3, max_size=6),
       claims=st.lists(FACT.map(lambda f: {"claim": f.pop("fact"), **f}), max_size=3), finished=st.booleans())
def test_the_scorer_scores_any_answer_on_fields_the_check_accepts(answer, facts, claims, finished, survival):
    counted(survival, (answer, facts))
    if scoring_problems(facts, claims):
        return  # refused before scoring, named (tested in test_hostile_data)
    result = score(answer, {"key_facts": facts, "must_not": claims}, finished)
    assert 0.0 <= result.coverage <= 1.0 and len(result.matched) + len(result.missed) == len(facts)


# ---------------------------------------------------------------- the server's request parsing


BODY_KEYS = st.sampled_from(["model", "messages", "input", "instructions", "max_tokens", "max_completion_tokens",
                             "max_output_tokens", "temperature", "top_p", "stop", "stream", "stream_options",
                             "reasoning_effort", "reasoning", "logprobs", "n", "tools", "response_format", "text",
                             "seed", "return_token_ids", "extra"])
BODY = st.dictionaries(BODY_KEYS, JSON | st.lists(MESSAGE, max_size=3), max_size=6) | JSON


@pytest.mark.survives("fuzzed input", "server request parsing (Chat Completions and Responses): random JSON bodies")
@given(body=BODY)
def test_the_server_parses_any_body_or_answers_4xx(body, survival):
    from relief_mlx.serve.protocol import ApiError, parse_chat, parse_responses

    counted(survival, body)
    for parse in (parse_chat, parse_responses):
        try:
            job = parse(body, lambda text: text)
        except ApiError as e:
            assert 400 <= e.status < 500, e
            continue
        assert job.messages and job.messages[-1]["role"] == "user"
