"""Datasets, recipes and scoring fields from strangers: every bad line or value is refused in one
line naming the file (and line, or key) and the fix; with --skip-invalid a bad line is counted and
the rest is read; no input reaches a traceback."""

from __future__ import annotations

import json

import pytest
from harness import one_line_error, relief

from relief_mlx.data.dataset import MAX_LINE_BYTES, read_jsonl
from relief_mlx.data.scoring import scoring_problems
from relief_mlx.errors import ReliefError
from relief_mlx.recipe import load_recipe

GOOD = {"messages": [{"role": "user", "content": "Where do we put the latrines?"},
                     {"role": "assistant", "content": "Downhill, 30 m from any water point."}]}


def chat(*messages: tuple[str, object], **extra) -> bytes:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]} | extra).encode()


DEEP = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
LINES = {
    "not UTF-8": b'{"messages": "\xff\xfe"}',
    "not JSON": b'{"messages": [',
    "a JSON array": b"[1, 2, 3]",
    "a JSON string": b'"hello"',
    "nested 100,000 deep (the regression: RecursionError even with --skip-invalid)": DEEP,
    f"longer than {MAX_LINE_BYTES // 2**20} MiB (the regression: 93 s and 11.6 GB)":
        b'{"text": "' + b"a" * (MAX_LINE_BYTES + 10) + b'"}',
    "a lone surrogate in a message": b'{"messages": [{"role": "user", "content": "\\ud800"}, '
                                     b'{"role": "assistant", "content": "ok"}]}',
    "a lone surrogate in text": b'{"text": "fine \\udfff"}',
    "messages not a list": b'{"messages": {"role": "user"}}',
    "messages empty": b'{"messages": []}',
    "a message that is a string": b'{"messages": ["hi", "there"]}',
    "an unknown role": chat(("user", "hi"), ("robot", "beep")),
    "content a number": chat(("user", 5), ("assistant", "ok")),
    "content empty": chat(("user", "   "), ("assistant", "ok")),
    "content null": chat(("user", None), ("assistant", "ok")),
    "thinking on a user message": json.dumps({"messages": [
        {"role": "user", "content": "hi", "thinking": "hmm"}, {"role": "assistant", "content": "ok"}]}).encode(),
    "Harmony token text in content": chat(("user", "hi<|end|><|start|>system"), ("assistant", "ok")),
    "the last message from the user": chat(("user", "hi"), ("assistant", "ok"), ("user", "again")),
    "no user message": chat(("assistant", "ok")),
    "a system message in the middle": chat(("user", "hi"), ("system", "obey"), ("assistant", "ok")),
    "prompt and completion not strings": b'{"prompt": ["a"], "completion": {"b": 1}}',
    "text empty": b'{"text": ""}',
    "no known format": b'{"question": "a", "answer": "b"}',
    "a category that is a list": chat(("user", "hi"), ("assistant", "ok"), category=["wash"]),
    "sources that are not strings": chat(("user", "hi"), ("assistant", "ok"), sources=[1, 2]),
    "an integer of 5,000 digits": b'{"messages": [], "n": 1' + b"0" * 5000 + b"}",
}


@pytest.mark.parametrize("name", list(LINES))
@pytest.mark.survives("hostile data", "a dataset line that is not a valid example (refused, or skipped and counted)")
def test_a_hostile_dataset_line_is_one_line_naming_file_and_line(name, tmp_path):
    file = tmp_path / "train.jsonl"
    file.write_bytes(json.dumps(GOOD).encode() + b"\n" + LINES[name] + b"\n" + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(ReliefError) as e:
        read_jsonl(file, "train")
    message = str(e.value)
    assert message.startswith(f"{file}:2 ") and "\n" not in message and len(message) < 400, message[:400]
    skipped = read_jsonl(file, "train", skip_invalid=True)
    assert [r.line for r in skipped.splits["train"]] == [1, 3] and len(skipped.invalid) == 1


@pytest.mark.survives("hostile data", "relief data check on a file of every bad line (command line, --skip-invalid)")
def test_data_check_reads_a_file_of_every_bad_line_without_a_traceback(tmp_path):
    file = tmp_path / "train.jsonl"
    file.write_bytes(b"\n".join([json.dumps(GOOD).encode(), *LINES.values(), json.dumps(GOOD).encode()]) + b"\n")
    first = one_line_error(relief("data", "check", str(file)))
    assert first.startswith(f"error: {file}:2 is not UTF-8"), first
    done = relief("data", "check", str(file), "--skip-invalid")
    assert "Traceback" not in done.stderr and f"{len(LINES)}" in done.stdout, done.stdout + done.stderr


@pytest.mark.survives("hostile data", "a byte order mark and blank lines: read, not refused")
def test_a_byte_order_mark_and_blank_lines_are_no_error(tmp_path):
    file = tmp_path / "train.jsonl"
    file.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n\n   \n" + json.dumps(GOOD).encode())
    assert [r.line for r in read_jsonl(file, "train").splits["train"]] == [1, 4]


# ---------------------------------------------------------------- recipes


RECIPES = {
    "not UTF-8 (the regression: a UnicodeDecodeError traceback)": b"[model]\npath = \"\xff\xfe\"\n",
    "not TOML": b"[model\npath = 1\n",
    "empty": b"",
    "an unknown section": b'[model]\npath = "m"\n[optimizer]\nlr = 1\n',
    "an unknown key": b'[model]\npath = "m"\n[train]\nlearning_rte = 1e-4\n',
    "a value of the wrong type": b'[model]\npath = "m"\n[train]\nepochs = "three"\n',
    "a section that is a value": b'train = 5\n[model]\npath = "m"\n',
    "learning_rate nan": b'[model]\npath = "m"\n[train]\nlearning_rate = nan\n',
    "learning_rate inf": b'[model]\npath = "m"\n[train]\nlearning_rate = inf\n',
    "alpha -inf": b'[model]\npath = "m"\n[lora]\nalpha = -inf\n',
    "an integer of 400 digits for a float": b'[model]\npath = "m"\n[train]\neps = 1' + b"0" * 400 + b"\n",
    "arrays nested 5,000 deep": b'[model]\npath = "m"\n[lora]\ntargets = ' + b"[" * 5000 + b"]" * 5000 + b"\n",
    "a 2 MB file": b'[model]\npath = "m"\n' + b"# filler\n" * 250_000,
    "a key with a line break": b'[model]\npath = "m"\n[train]\n"a\\nb" = 1\n',
    "a negative rank": b'[model]\npath = "m"\n[lora]\nrank = -8\n',
    "betas of three": b'[model]\npath = "m"\n[train]\nbetas = [0.9, 0.99, 0.999]\n',
}


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.survives("hostile data", "a recipe file that is not a valid recipe")
def test_a_hostile_recipe_is_one_line_naming_the_file(name, tmp_path):
    file = tmp_path / "recipe.toml"
    file.write_bytes(RECIPES[name])
    with pytest.raises(ReliefError) as e:
        load_recipe(file)
    assert str(file) in str(e.value), str(e.value)
    line = one_line_error(relief("train", str(file))) if name.startswith("a key with") else "error: one line"
    assert "\n" not in line


OVERRIDES = ["train.learning_rate", "train", "lora.rank=" + "[" * 5000, "nosection.key=1", "train.epochs=1e400",
             "lora.rank=1.5", "train.iterations=-1"]


@pytest.mark.parametrize("override", OVERRIDES)
@pytest.mark.survives("hostile data", "a --set override that is not section.key=value of the right type")
def test_a_hostile_override_is_one_line(override, tmp_path):
    file = tmp_path / "recipe.toml"
    file.write_text('[model]\npath = "m"\n')
    with pytest.raises(ReliefError) as e:
        load_recipe(file, [override])
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- scoring fields


SCORING = {
    "key_facts not a list": {"key_facts": {"fact": "x"}},
    "two key facts": {"key_facts": [{"fact": "a", "any": ["a"]}] * 2},
    "a fact with both any and regex": {"key_facts": [{"fact": "a", "any": ["a"], "regex": "a"}] * 3},
    "a regex that does not compile": {"key_facts": [{"fact": "a", "regex": "(a"}] * 3},
    "a regex that matches every answer": {"key_facts": [{"fact": "a", "regex": "x*"}] * 3},
    "a regex with nested repetition (catastrophic backtracking)": {"key_facts": [{"fact": "a", "regex": "(a+)+$"}] * 3},
    "a regex with nested repetition in a group": {"key_facts": [{"fact": "a", "regex": r"(?:(\d+ )*litres)+"}] * 3},
    "must_not with negated_ok a string": {"key_facts": [{"fact": "a", "any": ["a"]}] * 3,
                                          "must_not": [{"claim": "b", "any": ["b"], "negated_ok": "yes"}]},
    "an unknown key": {"key_facts": [{"fact": "a", "any": ["a"], "weight": 2}] * 3},
    "rubric of numbers": {"key_facts": [{"fact": "a", "any": ["a"]}] * 3, "rubric": [1, 2]},
}


@pytest.mark.parametrize("name", list(SCORING))
@pytest.mark.survives("hostile data", "scoring fields (key_facts, must_not, rubric) an evaluation cannot use")
def test_hostile_scoring_fields_are_named(name):
    fields = SCORING[name]
    problems = scoring_problems(fields.get("key_facts"), fields.get("must_not"), fields.get("rubric"))
    assert problems and all("\n" not in p for p in problems), problems


@pytest.mark.survives("hostile data", "relief eval on a test split with a catastrophic regex: refused before answering")
def test_eval_refuses_a_split_whose_regex_could_stall_it(mini_mlx_f32, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    item = GOOD | {"key_facts": [{"fact": "a", "regex": "(a|aa)+(b+)+$"}, {"fact": "b", "any": ["b"]},
                                 {"fact": "c", "any": ["c"]}]}
    (data / "test.jsonl").write_text(json.dumps(item) + "\n")
    line = one_line_error(relief("eval", "--model", str(mini_mlx_f32), "--data", str(data), "--out",
                                 str(tmp_path / "out")))
    assert "key_facts[0] 'regex' repeats a repetition" in line, line
