"""Reading, validating, tokenizing (length policy) and batching JSON Lines datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from relief_mlx.data import dataset as ds
from relief_mlx.data import harmony as hm
from relief_mlx.errors import ReliefError


def chat(question: str, answer: str, **extra) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, **extra}


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    for split, n in (("train", 3), ("valid", 2), ("test", 1)):
        rows = [
            chat(f"{split} question {i}?", f"{split} answer {i}.", category="wash")
            for i in range(n)
        ]
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    return tmp_path


def test_folder_single_file_and_hub_id(folder, monkeypatch):
    data = ds.load_dataset(folder)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 3, "valid": 2, "test": 1}
    assert data.splits["valid"][1].where == f"{folder / 'valid.jsonl'}:2"

    single = ds.load_dataset(folder / "valid.jsonl")
    assert list(single.splits) == ["valid"] and len(single.records()) == 2

    calls = []

    def fake_download(repo_id, repo_type, allow_patterns):
        calls.append((repo_id, repo_type))
        return str(folder)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    hub = ds.load_dataset("someone/relief-data")
    assert calls == [("someone/relief-data", "dataset")] and len(hub.records()) == 6


def test_hub_failure_is_one_clear_line(monkeypatch):
    import huggingface_hub

    def offline(*_args, **_kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ReliefError, match="someone/x is no local path.*could not be fetched as a Hub dataset"):
        ds.load_dataset("someone/x")


def test_missing_path_names_the_choices(tmp_path):
    with pytest.raises(ReliefError, match="does not exist; pass a .jsonl file"):
        ds.load_dataset(tmp_path / "nope.jsonl")


def test_folder_without_split_names_reads_every_file(tmp_path):
    write_jsonl(tmp_path / "shelter.jsonl", [chat("a?", "b.", category="shelter")])
    write_jsonl(tmp_path / "wash.jsonl", [chat("c?", "d.", category="wash")])
    assert list(ds.load_dataset(tmp_path).splits) == ["shelter", "wash"]


BAD_LINES = [
    ("{not json", "is not valid JSON"),
    ('["a", "b"]', "is a JSON list, not an object"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "role 'robot'"),
    (json.dumps(chat("", "answer")), "content is empty"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "no assistant turn"),
    (json.dumps({"question": "q", "answer": "a"}), "no known format"),
    (json.dumps(chat("q", "a", sources="FEMA")), "not a list of strings"),
    (json.dumps({"text": "plain"}), "is text but line 1 is chat"),
]


@pytest.mark.parametrize(("line", "problem"), BAD_LINES)
def test_bad_line_is_one_sentence_with_file_and_line(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [chat("ok?", "ok."), "", line])
    with pytest.raises(ReliefError) as err:
        ds.load_dataset(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3 ") and problem in message
    assert "--skip-invalid" in message and "\n" not in message


def test_non_utf8_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(chat("q", "a")).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(ReliefError, match=r"train.jsonl:2 is not UTF-8 \(byte 0xe9"):
        ds.load_dataset(path)


def test_empty_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ReliefError, match="holds no JSON lines"):
        ds.load_dataset(path)


def test_skip_invalid_keeps_going_and_counts(tmp_path):
    rows = [chat("a?", "b."), "{oops", chat("c?", "d."), json.dumps({"x": 1})]
    data = ds.load_dataset(write_jsonl(tmp_path / "train.jsonl", rows), skip_invalid=True)
    assert len(data.records()) == 2
    assert [i.split(" ")[0].rsplit(":", 1)[1] for i in data.invalid] == ["2", "4"]


def test_completions_render_like_the_equivalent_chat(tmp_path, harmony_tokenizer):
    comp = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q?", "completion": "a."}])
    conv = write_jsonl(tmp_path / "m.jsonl", [chat("q?", "a.")])
    a = ds.tokenize(ds.load_dataset(comp).records(), 512, tokenizer=harmony_tokenizer)
    b = ds.tokenize(ds.load_dataset(conv).records(), 512, tokenizer=harmony_tokenizer)
    assert a.examples[0].record.format == "completions"
    assert a.examples[0].tokens.tolist() == b.examples[0].tokens.tolist()


def test_text_format_trains_every_token_and_ends_with_endoftext(tmp_path, harmony_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "Boil water for one minute."}])
    records = ds.load_dataset(path).records()
    (ex,) = ds.tokenize(records, 512, tokenizer=harmony_tokenizer).examples
    assert ex.tokens.tolist() == [*harmony_tokenizer.encode("Boil water for one minute."), hm.PAD]
    assert ex.mask.all()
    short = ds.tokenize(records, 3, tokenizer=harmony_tokenizer)
    assert len(short.examples[0].tokens) == 3 and short.counts()["truncated"] == 1


# ---------------------------------------------------------------- length policy

THREE_TURNS = [
    {"role": "system", "content": "Advise shelter managers."},
    {"role": "user", "content": "First question about cots " * 20},
    {"role": "assistant", "content": "First answer about cots " * 20},
    {"role": "user", "content": "Second question about water " * 20},
    {"role": "assistant", "content": "Second answer about water " * 20},
    {"role": "user", "content": "Last question about fuel " * 20},
    {"role": "assistant", "content": "Last answer: keep half a tank."},
]


def _record(messages) -> ds.Record:
    return ds.Record("mem.jsonl", 1, "train", "chat", messages)


def _ids(messages, tok) -> list[int]:
    return hm.render_training(messages, ds.TRAINING_OPTIONS, "final", tok)[0]


def test_policy_keeps_what_fits(harmony_tokenizer):
    full = _ids(THREE_TURNS, harmony_tokenizer)
    out = ds.tokenize([_record(THREE_TURNS)], len(full), tokenizer=harmony_tokenizer)
    assert out.examples[0].fate == "kept" and out.examples[0].tokens.tolist() == full


def test_policy_drops_earliest_turns_first(harmony_tokenizer):
    tok = harmony_tokenizer
    without_first = [THREE_TURNS[0], *THREE_TURNS[3:]]
    budget = len(_ids(without_first, tok))
    out = ds.tokenize([_record(THREE_TURNS)], budget, tokenizer=tok)
    (ex,) = out.examples
    assert ex.fate == "turns_dropped" and ex.tokens.tolist() == _ids(without_first, tok)
    assert ex.full_length == len(_ids(THREE_TURNS, tok))
    assert out.counts()["turns_dropped"] == 1


def test_policy_then_cuts_the_prompt_from_the_left(harmony_tokenizer):
    tok = harmony_tokenizer
    last_turn = [THREE_TURNS[0], *THREE_TURNS[5:]]
    ids = _ids(last_turn, tok)
    (ex,) = ds.tokenize([_record(THREE_TURNS)], len(ids) - 10, tokenizer=tok).examples
    assert ex.fate == "truncated" and ex.tokens.tolist() == ids[10:]
    assert tok.decode(ex.tokens[ex.mask].tolist()) == "Last answer: keep half a tank.<|return|>"


def test_policy_drops_an_answer_that_cannot_fit(harmony_tokenizer):
    answer_tokens = len(harmony_tokenizer.encode("Last answer: keep half a tank.")) + 1
    out = ds.tokenize([_record(THREE_TURNS)], answer_tokens + 3, tokenizer=harmony_tokenizer)
    assert out.examples == [] and out.counts()["dropped"] == 1
    assert len(out.full_lengths) == 1


# ---------------------------------------------------------------- batching


def _examples(lengths: list[int]) -> list[ds.Example]:
    rec = _record([])
    out = []
    for i, n in enumerate(lengths):
        tokens = np.arange(n, dtype=np.int32) + 1000 * i
        out.append(ds.Example(tokens, np.arange(n) % 2 == 1, rec, n, "kept"))
    return out


def test_batches_are_padded_and_masked():
    examples = _examples([5, 9, 3])
    tokens, mask = ds.pad_batch(examples, pad_multiple=8)
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == mask.shape == (3, 16)
    for row, m, e in zip(tokens, mask, examples, strict=True):
        n = len(e.tokens)
        assert (row[:n] == e.tokens).all() and (m[:n] == e.mask).all()
        assert (row[n:] == hm.PAD).all() and not m[n:].any()
    assert ds.pad_batch(examples)[0].shape == (3, 9)  # no rounding by default


def test_an_empty_batch_is_refused():
    with pytest.raises(ReliefError, match="no examples"):
        ds.pad_batch([])
