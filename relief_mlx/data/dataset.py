"""Read, validate, tokenize and batch JSON Lines datasets for Harmony fine-tuning.

Where data comes from (`load_dataset`):
- a folder with `train.jsonl`, `valid.jsonl`, `test.jsonl` (any of them; also found one level
  down, as Hub repos keep them under `data/`); a folder with none of those names: every
  `*.jsonl` in it is a split named after its file (e.g. one file per category);
- a single `.jsonl` file: one split named after the file;
- a Hub dataset repo id (`owner/name`) that is not a local path: its `*.jsonl` files are fetched
  with huggingface_hub and read as a folder.

Formats (one per file; other keys on a line are ignored):
- chat: `{"messages": [{"role", "content", "thinking"?}, ...], "category"?: str,
  "sources"?: [str], "key_facts"?: [...], "must_not"?: [...], "rubric"?: [str]}`; roles system
  (first only), developer, user, assistant; the last message is the assistant's. The scoring
  fields (schema: datasets/emergency_relief/README.md, checked by `relief data check`) are kept
  as given on the Record for an evaluator;
- completions: `{"prompt": str, "completion": str}`: one user and one assistant message;
- text: `{"text": str}`: plain tokens plus `<|endoftext|>`, every token trained, no Harmony.

A bad line raises ReliefError naming file:line, the problem and the fix; with
`skip_invalid=True` it is skipped and listed in `Dataset.invalid`.

Length policy (`tokenize`, `max_length` in tokens), chat and completions:
1. it fits: unchanged;
2. drop the earliest whole turns (a user message and the answers to it), keeping the
   system/developer messages and the last turn, until it fits (counted `turns_dropped`);
3. still too long: cut tokens from the left of the prompt (the system message first, then the
   start of the last user message), keeping the whole last answer (counted `truncated`);
4. the last answer alone (from its first `<|start|>assistant`) does not fit, or no trained token
   is left: the example is dropped (counted `dropped`).
Text lines longer than `max_length` keep their first `max_length` tokens (`truncated`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import bundled
from ..errors import ReliefError
from ..recipe import DataSection
from .harmony import (
    PAD,
    HarmonyTokenizer,
    Rendered,
    RenderOptions,
    message_problem,
    render_training_pieces,
    resolve_tokenizer,
)

SPLITS = ("train", "valid", "test")
FORMATS = ("chat", "completions", "text")
# The recipe's defaults (a fixed `Current date:` keeps training tokens reproducible).
TRAINING_OPTIONS = RenderOptions.of(DataSection())
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_FIX = "fix the line or pass --skip-invalid to skip bad lines"


@dataclass(frozen=True)
class Record:
    """One valid line: where it came from and what it holds."""

    file: str
    line: int
    split: str
    format: str
    messages: list[dict] = field(default_factory=list)  # chat and completions
    text: str | None = None  # text format only
    category: str | None = None
    sources: tuple[str, ...] = ()
    # Scoring fields of test items, as in the file (lists of dicts / str; validated by the check).
    key_facts: Any = None
    must_not: Any = None
    rubric: Any = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Dataset:
    """Valid records per split, in file order, and the bad lines that were skipped."""

    root: str
    splits: dict[str, list[Record]]
    invalid: list[str] = field(default_factory=list)

    def records(self) -> list[Record]:
        return [r for records in self.splits.values() for r in records]


# ---------------------------------------------------------------- reading


def _parse_line(raw: bytes) -> tuple[str, dict]:
    """(format, fields) of one line; raises ValueError with the problem in a few words."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"is not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"is not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"is a JSON {type(obj).__name__}, not an object")
    if "messages" in obj:
        return "chat", obj
    if "prompt" in obj and "completion" in obj:
        prompt, completion = obj["prompt"], obj["completion"]
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ]
        return "completions", {**obj, "messages": messages}
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise ValueError("has an empty or non-string `text`")
        return "text", obj
    raise ValueError(
        "is in no known format (keys: "
        f"{', '.join(sorted(obj)) or 'none'}); expected messages, prompt+completion or text"
    )


def _record(file: Path, line: int, split: str, fmt: str, obj: dict) -> Record:
    if fmt != "text":
        problem = message_problem(obj["messages"], for_training=True)
        if problem:
            raise ValueError(f"has a bad conversation: {problem}")
    category, sources = obj.get("category"), obj.get("sources", [])
    if category is not None and not isinstance(category, str):
        raise ValueError("has a `category` that is not a string")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise ValueError("has `sources` that is not a list of strings")
    messages = obj.get("messages", []) if fmt != "text" else []
    scoring = {k: obj.get(k) for k in ("key_facts", "must_not", "rubric")}
    return Record(
        str(file), line, split, fmt, messages, obj.get("text"), category, tuple(sources), **scoring
    )


def read_jsonl(path: str | Path, split: str, skip_invalid: bool = False) -> Dataset:
    """Read one JSON Lines file as `split`; blank lines are skipped."""
    path = Path(path)
    records: list[Record] = []
    invalid: list[str] = []
    first_format: tuple[str, int] | None = None
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            fmt, obj = _parse_line(raw)
            if first_format and fmt != first_format[0]:
                raise ValueError(
                    f"is {fmt} but line {first_format[1]} is {first_format[0]}; one format per file"
                )
            records.append(_record(path, number, split, fmt, obj))
            first_format = first_format or (fmt, number)
        except ValueError as e:
            if not skip_invalid:
                raise ReliefError(f"{path}:{number} {e}; {_FIX}") from None
            invalid.append(f"{path}:{number} {e}")
    if not records and not invalid:
        raise ReliefError(f"{path} holds no JSON lines; add examples or remove the file")
    return Dataset(str(path), {split: records}, invalid)


def _split_files(folder: Path) -> dict[str, Path]:
    for pattern in ("{}.jsonl", "*/{}.jsonl"):
        found = {s: next(iter(sorted(folder.glob(pattern.format(s)))), None) for s in SPLITS}
        if any(found.values()):
            return {s: f for s, f in found.items() if f}
    return {f.stem: f for f in sorted(folder.glob("*.jsonl"))}


def _resolve(path: str | Path) -> Path:
    local = bundled.resolve("datasets", path)  # a bundled name when no such path exists
    if local.exists():
        return local
    if not _REPO_ID.fullmatch(str(path)):
        raise ReliefError(
            f"{path} does not exist; pass a .jsonl file, a folder with train/valid/test.jsonl, "
            f"a bundled dataset ({', '.join(bundled.names('datasets'))}) or a Hub dataset id like owner/name"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(str(path), repo_type="dataset", allow_patterns=["*.jsonl"])
    except Exception as e:  # network, auth and missing-repo errors all end the same way
        raise ReliefError(
            f"{path} is no local path (from {Path.cwd()}) and could not be fetched as a Hub dataset "
            f"({type(e).__name__}); run from the folder it is relative to, or check the id, network or HF_TOKEN"
        ) from e
    return Path(folder)


def load_dataset(path: str | Path, skip_invalid: bool = False) -> Dataset:
    """Read a file, a folder of splits or a Hub dataset repo (see the module docstring)."""
    root = _resolve(path)
    if root.is_file():
        return read_jsonl(root, root.stem, skip_invalid)
    files = _split_files(root)
    if not files:
        raise ReliefError(
            f"{root} holds no .jsonl files; add train.jsonl (and valid.jsonl, test.jsonl)"
        )
    splits: dict[str, list[Record]] = {}
    invalid: list[str] = []
    for split, file in files.items():
        part = read_jsonl(file, split, skip_invalid)
        splits[split] = part.splits[split]
        invalid += part.invalid
    return Dataset(str(root), splits, invalid)


# ---------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class Example:
    """A tokenized record after the length policy."""

    tokens: np.ndarray  # (T,) int32
    mask: np.ndarray  # (T,) bool: True where the token is a training target
    record: Record
    full_length: int  # tokens before the length policy
    fate: str  # "kept" | "turns_dropped" | "truncated"


@dataclass
class Tokenized:
    """Examples ready to batch, and what the length policy did."""

    examples: list[Example]
    dropped: list[Record]
    full_lengths: list[int]  # of every record, dropped ones included

    def counts(self) -> dict[str, int]:
        fates = [e.fate for e in self.examples]
        return {
            "examples": len(self.examples),
            "turns_dropped": fates.count("turns_dropped"),
            "truncated": fates.count("truncated"),
            "dropped": len(self.dropped),
            "trained_tokens": int(sum(e.mask[1:].sum() for e in self.examples)),
        }


def _answer_start(rendered: Rendered) -> int:
    """Index of the first token of the last turn's first assistant message."""
    last_turn = rendered.turns()[-1]
    offset = 0
    for piece in rendered.pieces:
        if piece.turn == last_turn and piece.kind != "prompt":
            return offset
        offset += len(piece.ids)
    raise ValueError("conversation has no assistant message")  # validated before: a bug


def fit_conversation(
    rendered: Rendered, max_length: int, mask_mode: str
) -> tuple[list[int], np.ndarray, str] | None:
    """Apply the length policy (module docstring): (ids, mask, fate), or None when dropped."""
    fate = "kept"
    for turn in rendered.turns()[:-1]:
        if len(rendered.ids()) <= max_length:
            break
        rendered, fate = rendered.without_turn(turn), "turns_dropped"
    ids, mask = rendered.ids(), rendered.mask(mask_mode)
    if len(ids) > max_length:
        if len(ids) - _answer_start(rendered) > max_length:
            return None
        ids, mask, fate = ids[-max_length:], mask[-max_length:], "truncated"
    return (ids, mask, fate) if mask[1:].any() else None


def _tokenize_one(
    record: Record, tok: HarmonyTokenizer, options: RenderOptions, mask_mode: str, max_length: int
) -> tuple[int, tuple[list[int], np.ndarray, str] | None]:
    if record.format == "text":
        ids = [*tok.encode(record.text or ""), PAD]
        fate = "truncated" if len(ids) > max_length else "kept"
        return len(ids), (ids[:max_length], np.ones(min(len(ids), max_length), bool), fate)
    rendered = render_training_pieces(record.messages, options, tok)
    return len(rendered.ids()), fit_conversation(rendered, max_length, mask_mode)


def tokenize(
    records: Sequence[Record],
    max_length: int,
    options: RenderOptions = TRAINING_OPTIONS,
    mask_mode: str = "final",
    tokenizer: Any = None,
) -> Tokenized:
    """Render and mask every record, applying the length policy."""
    if max_length < 2:
        raise ReliefError(f"max_length {max_length} is too small; use at least a few hundred")
    tok = resolve_tokenizer(tokenizer)
    out = Tokenized([], [], [])
    for record in records:
        full_length, fitted = _tokenize_one(record, tok, options, mask_mode, max_length)
        out.full_lengths.append(full_length)
        if fitted is None:
            out.dropped.append(record)
            continue
        ids, mask, fate = fitted
        out.examples.append(Example(np.asarray(ids, np.int32), mask, record, full_length, fate))
    return out


# ---------------------------------------------------------------- batching


def pad_batch(batch: Sequence[Example], pad_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`(tokens, mask)` of examples padded to one width: tokens (B, T) int32 padded with
    <|endoftext|>, mask (B, T) bool, True on trained targets (padding False).

    Inputs are `tokens[:, :-1]`, targets `tokens[:, 1:]` weighted by `mask[:, 1:]`; normalize the
    loss by `mask[:, 1:].sum()`. T is the longest example rounded up to `pad_multiple`. Which
    examples share a batch is the trainer's choice (`relief_mlx.train.data.epoch_order`).
    """
    if not batch:
        raise ReliefError("no examples to batch; check the dataset with `relief data check`")
    longest = max(len(e.tokens) for e in batch)
    width = -(-longest // pad_multiple) * pad_multiple
    tokens = np.full((len(batch), width), PAD, np.int32)  # (B, T)
    mask = np.zeros((len(batch), width), bool)  # (B, T)
    for row, e in enumerate(batch):
        tokens[row, : len(e.tokens)] = e.tokens
        mask[row, : len(e.mask)] = e.mask
    return tokens, mask
