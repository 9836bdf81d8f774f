"""`relief data check` and `relief data show` as data: reports that cli.py prints.

The check fails (`CheckReport.ok` is False) on: exact duplicate examples, the same user prompt
in two splits, near-duplicate answers in two splits, the same scenario in two splits (numbers,
units and key nouns of the user turns; places may differ), all of which inflate valid/test
scores; malformed scoring fields (`key_facts`, `must_not`, `rubric`) and unscored items in a
scored split; reading-history phrases in answers ("seen only in secondary copies"); and
examples the length policy would drop. It warns on: near-duplicate answers within a split,
examples that would be shortened, chat lines without `sources`, skipped invalid lines.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReliefError
from .dataset import (
    TRAINING_OPTIONS,
    Dataset,
    Record,
    Tokenized,
    load_dataset,
    tokenize,
)
from .harmony import HarmonyTokenizer, RenderOptions, resolve_tokenizer
from .scoring import scoring_problems

# Two answers sharing half their character 5-grams (Jaccard >= 0.5) are one answer lightly
# edited. Measured on the emergency_relief drafts (264 answers): distinct answers peak at 0.27
# (median 0.04); the same answer with a few phrases reworded scores 0.83, with its numbers
# changed 0.92, with every other sentence removed 0.52. 5 characters span a short word and a
# space, so shared phrasing counts and shared vocabulary alone does not.
NEAR_DUPLICATE_JACCARD = 0.5
SHINGLE_CHARS = 5
# MinHash finds candidate pairs in O(n^2 * K) vector work; exact Jaccard then confirms each.
# With K=128 the estimate's standard deviation is at most 0.045, so the 0.15 margin misses a
# true pair with probability well under 1e-3.
_MINHASH_K = 128
_MINHASH_MARGIN = 0.15
MAX_LISTED = 20  # findings of one kind printed in full; the count is always exact
# Two prompts describe one scenario when the tf-idf cosine of their scenario features (numbers
# with units, acronyms, lower-case content words; capitalised words, mostly places and names,
# are left out so that moving a scenario to another country changes nothing) reaches this.
# Measured on emergency_relief v1 (352 examples): a scenario copied with its places swapped
# scores 1.0; the re-used ones found by reading score 0.52 (MUAC child with a 4-month-old
# brother) and 0.39 (power wheelchair and service dog at a shelter); different scenarios on one
# topic peak at 0.35 (two borderline START patients). Re-uses reworded with little shared
# vocabulary score 0.06-0.30, among unrelated pairs (v1's pet owner asking whether the public
# shelter takes her animals, valid:8 vs train:215, scored 0.26): those still need a reader.
SCENARIO_SIMILARITY = 0.38
# Answers talk about the emergency, not about how a fact was found ("I've only seen that in a
# secondary copy"): sources belong in `sources`. Matched case-insensitively in assistant content
# and thinking. Collected from every variant in emergency_relief v1 (115 hits in 76 examples);
# "secondary data" (MIRA's term) and "second-hand clothes" are not reading history.
_READING_HISTORY = (
    # second-hand and secondary copies
    r"second[- ]?hand\b(?! (?:clothes|clothing|goods|items|shoes|furniture))",
    r"\bsecondary (?:cop(?:y|ies)|sources?|figures?|summar(?:y|ies)|listings?|references?)\b",
    r"\(secondary\b", r",\s*secondary\)", r"\(both secondary\)",
    r"\b(?:figures?|numbers?|sizes?|ranges?|values?) (?:is|are) secondary\b",
    r"\bthird[- ]party cop(?:y|ies)\b",
    # whose notes
    r"\bmy (?:own )?(?:sources|references|notes)\b", r"\bour references\b",
    # seen, quoted, cited, summarised by someone else
    r"\bI'?ve (?:only )?seen (?:it |that |them |this )?(?:only )?(?:quoted|cited)\b",
    r"\bI'?m (?:citing|quoting) (?:it|that|this)\b",
    r"\b(?:via|(?:as )?(?:quoted|cited|summari[sz]ed|given) in) (?:FEMA|Sphere|WHO|CDC|UNHCR|OCHA|IASC|INSARAG)\b",
    r"\bsummari[sz]ed from\b",
    # hedging on one's own sources instead of stating the fact or naming the document
    r"\bas far as I'?m aware\b", r"\bverify in current guidance\b",
    r"\b(?:couldn'?t|could not|can'?t|cannot) confirm (?:the|these|those|that) (?:new )?"
    r"(?:figures?|numbers?|claims?|ranges?|values?)\b",
    r"\bis reported to (?:set|say|give)\b", r"\breportedly (?:changed|says|sets|gives)\b",
    r"\b(?:figures?|numbers?|sources?) I (?:can|could) (?:cite|stand behind)\b",
    r"\bI'?d stand behind\b", r"\bso I can cite\b",
)
READING_HISTORY = re.compile("|".join(_READING_HISTORY), re.IGNORECASE)


@dataclass
class SplitReport:
    """Counts and token lengths of one split."""

    name: str
    files: list[str]
    examples: int
    categories: dict[str, int]
    length_min: int
    length_median: float
    length_p95: float
    length_max: int
    over_max_length: int  # examples longer than max_length before the policy
    turns_dropped: int
    truncated: int
    dropped: int
    trained_tokens: int
    without_sources: int
    multi_turn: int  # chat examples with two or more user turns
    with_thinking: int  # chat examples with an assistant `thinking` (analysis channel)
    scored: int  # examples carrying key_facts


@dataclass
class Finding:
    """One problem found; `fail` ones make the check fail, others warn."""

    kind: str
    where: list[str]
    detail: str
    fail: bool


@dataclass
class CheckReport:
    """Everything `relief data check` found, printable and serializable."""

    path: str
    max_length: int
    mask_mode: str
    formats: list[str]
    splits: list[SplitReport]
    invalid: list[str]
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.fail for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def lines(self) -> list[str]:
        """The human report, one line per string."""
        return [*_header_lines(self), *_category_lines(self), *_finding_lines(self)]


# ---------------------------------------------------------------- near duplicates


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def _shingles(text: str) -> np.ndarray:
    """Hashes of the distinct character 5-grams of `text` (whitespace-normalized, lowercased)."""
    codes = np.frombuffer(_normalize(text).encode("utf-32-le"), np.uint32).astype(np.uint64)
    if len(codes) < SHINGLE_CHARS:
        codes = np.concatenate([codes, np.zeros(SHINGLE_CHARS - len(codes), np.uint64)])
    n = len(codes) - SHINGLE_CHARS + 1
    h = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):  # wrap-around is the hash
        for k in range(SHINGLE_CHARS):
            h = h * np.uint64(0x100000001B3) + codes[k : k + n]
    return np.unique(h)


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def _minhash(sets: list[np.ndarray]) -> np.ndarray:
    rng = np.random.default_rng(0)
    a = rng.integers(1, 2**63, _MINHASH_K, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, _MINHASH_K, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return np.stack([(s[:, None] * a + b).min(axis=0) for s in sets])  # (n, K)


def near_duplicate_pairs(
    texts: list[str], threshold: float = NEAR_DUPLICATE_JACCARD
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard) with i < j whose 5-gram Jaccard similarity is >= threshold."""
    if len(texts) < 2:
        return []
    sets = [_shingles(t) for t in texts]
    sig = _minhash(sets)
    pairs = []
    for i in range(len(texts) - 1):
        estimate = (sig[i + 1 :] == sig[i]).mean(axis=1)
        for j in np.nonzero(estimate >= threshold - _MINHASH_MARGIN)[0] + i + 1:
            similarity = _jaccard(sets[i], sets[j])
            if similarity >= threshold:
                pairs.append((i, int(j), round(similarity, 3)))
    return pairs


# ---------------------------------------------------------------- findings


def _answer(record: Record) -> str:
    if record.format == "text":
        return record.text or ""
    return record.messages[-1]["content"]


def _user_text(record: Record) -> str:
    return " ".join(m["content"] for m in record.messages if m["role"] == "user")


def _prompt(record: Record) -> str:
    return _normalize(_user_text(record))


def _exact_duplicates(records: list[Record]) -> list[Finding]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[json.dumps([r.messages, r.text], sort_keys=True)].append(r)
    return [
        Finding("exact duplicate", [r.where for r in group], "the same example twice", True)
        for group in groups.values()
        if len(group) > 1
    ]


def _prompt_leaks(records: list[Record]) -> list[Finding]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.format != "text":
            groups[_prompt(r)].append(r)
    return [
        Finding("prompt in two splits", [r.where for r in group], "the same user prompt", True)
        for group in groups.values()
        if len({r.split for r in group}) > 1
        and len({json.dumps(r.messages) for r in group}) > 1  # identical ones: exact duplicates
    ]


def _near_duplicates(records: list[Record]) -> list[Finding]:
    findings = []
    for i, j, similarity in near_duplicate_pairs([_answer(r) for r in records]):
        a, b = records[i], records[j]
        if json.dumps([a.messages, a.text]) == json.dumps([b.messages, b.text]):
            continue  # reported as an exact duplicate
        leak = a.split != b.split
        kind = "near-duplicate answers in two splits" if leak else "near-duplicate answers"
        findings.append(Finding(kind, [a.where, b.where], f"Jaccard {similarity:.2f}", leak))
    return findings


# ---------------------------------------------------------------- scenarios


_NUMBER = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s*(%|[^\W\d_][\w/²]*)?")
_WORD = re.compile(r"[^\W\d_][\w'-]+")
_UNITS = {
    "l": "l", "litre": "l", "litres": "l", "liter": "l", "liters": "l", "m²": "m2", "m2": "m2",
    "sq": "sq ft", "square": "sq ft", "ft": "ft", "feet": "ft", "cm": "cm", "mm": "mm", "m": "m",
    "km": "km", "kcal": "kcal", "mg/l": "mg/l", "%": "%", "percent": "%", "minutes": "min",
    "hours": "h", "days": "d", "weeks": "wk", "months": "mo", "years": "y", "gallons": "gal",
}
_STOPWORDS = frozenset(
    "about after again also another anyone anything around because been before being below "
    "between both could does doing during each even every from have having here into just know "
    "like many more most much must need needs only other over really said same should since some "
    "someone something still such than that their them then there these they thing this those "
    "through under until very want what when where which while will with without would your "
    "yours right what's it's that's there's i'm i've we're they're you're don't can't won't "
    "isn't aren't doesn't didn't shouldn't".split()
)


def scenario_features(text: str) -> Counter:
    """Numbers with their unit, acronyms and lower-case content words (crudely singular).

    Capitalised words (places, people, organisations) are skipped, so that a scenario moved to
    another country keeps its features; all-capital acronyms (EOC, MUAC) are kept.
    """
    features: Counter = Counter()
    for m in _NUMBER.finditer(text):
        unit = _UNITS.get((m.group(2) or "").lower(), m.group(2) or "")
        number = m.group(1).replace(",", "")
        if unit or len(number) > 2:  # a bare 1 or 12 says little about the scenario
            features[f"{number} {unit.lower()}".strip()] += 1
    for word in _WORD.findall(text):
        if word.isupper() and len(word) > 1:
            features[word] += 1
        elif word[0].islower() and len(word) > 3 and word not in _STOPWORDS:
            singular = word[:-1] if word.endswith("s") and not word.endswith("ss") else word
            features[singular] += 1
    return features


def scenario_pairs(
    texts: list[str], groups: list[str], threshold: float = SCENARIO_SIMILARITY
) -> list[tuple[int, int, float, list[str]]]:
    """Pairs (i, j, cosine, shared features) from different groups whose scenario features'
    tf-idf cosine (smoothed idf over `texts`) is >= threshold; shared features by weight."""
    counts = [scenario_features(t) for t in texts]
    vocab = sorted({f for c in counts for f in c})
    if len(texts) < 2 or not vocab:
        return []
    index = {f: k for k, f in enumerate(vocab)}
    tf = np.zeros((len(texts), len(vocab)), np.float32)  # (N, V)
    for row, c in enumerate(counts):
        for f, n in c.items():
            tf[row, index[f]] = 1 + np.log(n)
    idf = np.log((1 + len(texts)) / (1 + (tf > 0).sum(axis=0))) + 1  # (V,)
    weights = tf * idf
    weights /= np.maximum(np.linalg.norm(weights, axis=1, keepdims=True), 1e-12)
    cosine = weights @ weights.T  # (N, N)
    pairs = []
    for i, j in zip(*np.nonzero(np.triu(cosine >= threshold, k=1)), strict=True):
        if groups[i] != groups[j]:
            shared = np.nonzero((weights[i] > 0) & (weights[j] > 0))[0]
            top = shared[np.argsort(-(weights[i] * weights[j])[shared])][:8]
            pairs.append((int(i), int(j), round(float(cosine[i, j]), 3), [vocab[k] for k in top]))
    return pairs


def _scenario_leaks(records: list[Record]) -> list[Finding]:
    chat = [r for r in records if r.format != "text"]
    pairs = scenario_pairs([_user_text(r) for r in chat], [r.split for r in chat])
    return [
        Finding(
            "same scenario in two splits",
            [chat[i].where, chat[j].where],
            f"similarity {similarity:.2f}; shared: {', '.join(shared)}",
            True,
        )
        for i, j, similarity, shared in pairs
    ]


# ---------------------------------------------------------------- answers and scoring fields


def _reading_history(records: list[Record]) -> list[Finding]:
    findings = []
    for r in records:
        for n, message in enumerate(r.messages, start=1):
            if message["role"] != "assistant":
                continue
            for part in ("content", "thinking"):
                for m in READING_HISTORY.finditer(message.get(part) or ""):
                    detail = f"message {n} {part}: {m.group(0)!r}; state the fact, cite it in sources"
                    findings.append(Finding("reading-history phrase in an answer", [r.where], detail, True))
    return findings


def _scoring_findings(data: Dataset) -> list[Finding]:
    findings = []
    for split, records in data.splits.items():
        chat = [r for r in records if r.format != "text"]
        for r in chat:
            for problem in scoring_problems(r.key_facts, r.must_not, r.rubric):
                findings.append(Finding("bad scoring field", [r.where], problem, True))
        scored = [r for r in chat if r.key_facts is not None]
        if scored:
            findings += [
                Finding(
                    "unscored item in a scored split",
                    [r.where],
                    f"{len(scored)} of {len(chat)} {split} items carry key_facts; add them here too",
                    True,
                )
                for r in chat
                if r.key_facts is None
            ]
    return findings


def _length_findings(tokenized: Tokenized, max_length: int) -> list[Finding]:
    findings = [
        Finding("too long", [r.where], f"the last answer does not fit in {max_length} tokens", True)
        for r in tokenized.dropped
    ]
    findings += [
        Finding("shortened", [e.record.where], f"{e.full_length} tokens, {e.fate}", False)
        for e in tokenized.examples
        if e.fate != "kept"
    ]
    return findings


# ---------------------------------------------------------------- the check


def _split_report(
    name: str, records: list[Record], tokenized: Tokenized, max_length: int
) -> SplitReport:
    lengths = tokenized.full_lengths or [0]
    counts = tokenized.counts()
    chat = [r for r in records if r.format == "chat"]
    return SplitReport(
        name=name,
        files=sorted({r.file for r in records}),
        examples=len(records),
        categories=dict(Counter(r.category or "(none)" for r in records)),
        length_min=int(min(lengths)),
        length_median=float(statistics.median(lengths)),
        length_p95=float(np.percentile(lengths, 95)),
        length_max=int(max(lengths)),
        over_max_length=sum(n > max_length for n in lengths),
        turns_dropped=counts["turns_dropped"],
        truncated=counts["truncated"],
        dropped=counts["dropped"],
        trained_tokens=counts["trained_tokens"],
        without_sources=sum(not r.sources for r in chat),
        multi_turn=sum(sum(m["role"] == "user" for m in r.messages) > 1 for r in chat),
        with_thinking=sum(any(m.get("thinking") for m in r.messages) for r in chat),
        scored=sum(r.key_facts is not None for r in records),
    )


def check_dataset(
    path: str | Path,
    max_length: int = 2048,
    tokenizer: Any = None,
    skip_invalid: bool = False,
    mask_mode: str = "final",
    options: RenderOptions = TRAINING_OPTIONS,
) -> CheckReport:
    """Validate, tokenize and cross-check a dataset (file, folder or Hub id).

    tokenizer: None (o200k_harmony, built offline), a folder holding tokenizer.json, or a
    tokenizer object. Invalid lines raise ReliefError unless `skip_invalid`.
    """
    data: Dataset = load_dataset(path, skip_invalid)
    tok = resolve_tokenizer(tokenizer)
    splits, findings = [], []
    for name, records in data.splits.items():
        tokenized = tokenize(records, max_length, options, mask_mode, tok)
        splits.append(_split_report(name, records, tokenized, max_length))
        findings += _length_findings(tokenized, max_length)
    records = data.records()
    findings = [
        *_exact_duplicates(records),
        *_prompt_leaks(records),
        *_near_duplicates(records),
        *_scenario_leaks(records),
        *_reading_history(records),
        *_scoring_findings(data),
        *findings,
    ]
    findings += [
        Finding("no sources", [], f"{s.without_sources} chat lines in {s.name} cite none", False)
        for s in splits
        if s.without_sources
    ]
    findings += [Finding("invalid line skipped", [], line, False) for line in data.invalid]
    formats = sorted({r.format for r in records})
    return CheckReport(data.root, max_length, mask_mode, formats, splits, data.invalid, findings)


# ---------------------------------------------------------------- printing


def _header_lines(report: CheckReport) -> list[str]:
    lines = [
        f"dataset {report.path} ({', '.join(report.formats) or 'empty'}; "
        f"max_length {report.max_length}; mask {report.mask_mode})",
        f"{'split':<16}{'examples':>9}  {'tokens min/median/p95/max':<26}"
        f"{'> max':>6}{'shortened':>10}{'dropped':>8}{'trained tok':>12}"
        f"{'multi-turn':>11}{'thinking':>9}{'scored':>7}",
    ]
    for s in report.splits:
        stats = f"{s.length_min}/{s.length_median:.0f}/{s.length_p95:.0f}/{s.length_max}"
        lines.append(
            f"{s.name:<16}{s.examples:>9}  {stats:<26}{s.over_max_length:>6}"
            f"{s.turns_dropped + s.truncated:>10}{s.dropped:>8}{s.trained_tokens:>12}"
            f"{s.multi_turn:>11}{s.with_thinking:>9}{s.scored:>7}"
        )
    return lines


def _category_lines(report: CheckReport) -> list[str]:
    names = sorted({c for s in report.splits for c in s.categories})
    if names == ["(none)"]:
        return []
    lines = ["category              total  per split"]
    for c in names:
        per_split = {s.name: s.categories[c] for s in report.splits if c in s.categories}
        total = sum(per_split.values())
        lines.append(f"{c:<20}{total:>7}  " + ", ".join(f"{k} {n}" for k, n in per_split.items()))
    return lines


def _finding_text(f: Finding) -> str:
    where = " = ".join(f.where)
    if where and f.detail:
        return f"{where}  ({f.detail})"
    return where or f.detail


def _finding_lines(report: CheckReport) -> list[str]:
    by_kind: dict[str, list[Finding]] = defaultdict(list)
    for f in report.findings:
        by_kind[f.kind].append(f)
    lines = []
    for kind, group in by_kind.items():
        lines.append(f"{'FAIL' if group[0].fail else 'warn'} {kind}: {len(group)}")
        lines += [f"  {_finding_text(f)}" for f in group[:MAX_LISTED]]
        if len(group) > MAX_LISTED:
            lines.append(f"  ... and {len(group) - MAX_LISTED} more (--json lists all)")
    fails = sum(f.fail for f in report.findings)
    lines.append("ok" if report.ok else f"check failed: {fails} finding(s) marked FAIL above")
    return lines


# ---------------------------------------------------------------- show


@dataclass
class ShowReport:
    """One example as the trainer sees it: rendered text split into trained / untrained spans."""

    where: str
    split: str
    index: int
    category: str | None
    sources: list[str]
    tokens: int
    trained_tokens: int
    fate: str  # kept | turns_dropped | truncated | dropped
    spans: list[tuple[str, bool]]  # (text, trained)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self, open_mark: str = "⟦", close_mark: str = "⟧") -> list[str]:
        head = (
            f"{self.where} [{self.split} #{self.index}] category={self.category} "
            f"tokens={self.tokens} trained={self.trained_tokens} ({self.fate}); "
            f"trained text is between {open_mark} {close_mark}"
        )
        body = "".join(f"{open_mark}{t}{close_mark}" if on else t for t, on in self.spans)
        return [head, *([f"sources: {', '.join(self.sources)}"] if self.sources else []), body]


def _spans(tok: HarmonyTokenizer, ids: np.ndarray, mask: np.ndarray) -> list[tuple[str, bool]]:
    # Decode runs of equal mask so that multi-byte characters split across tokens stay whole.
    edges = [0, *(np.nonzero(np.diff(mask.astype(np.int8)))[0] + 1), len(ids)]
    return [(tok.decode(ids[a:b].tolist()), bool(mask[a])) for a, b in pairwise(edges) if b > a]


def show_example(
    path: str | Path,
    index: int,
    split: str | None = None,
    max_length: int = 2048,
    tokenizer: Any = None,
    mask_mode: str = "final",
    options: RenderOptions = TRAINING_OPTIONS,
) -> ShowReport:
    """Render example `index` of `split` (default: train, else the first split) with its mask."""
    data = load_dataset(path)
    name = split or ("train" if "train" in data.splits else next(iter(data.splits)))
    if name not in data.splits:
        raise ReliefError(
            f"{data.root} has no split {name!r}; pick one of {', '.join(data.splits)}"
        )
    records = data.splits[name]
    if not 0 <= index < len(records):
        raise ReliefError(
            f"--index {index} is outside {name} (0..{len(records) - 1}); pick one in range"
        )
    record, tok = records[index], resolve_tokenizer(tokenizer)
    tokenized = tokenize([record], max_length, options, mask_mode, tok)
    if tokenized.dropped:
        length, trained, fate, spans = tokenized.full_lengths[0], 0, "dropped", []
    else:
        e = tokenized.examples[0]
        length, trained, fate, spans = len(e.tokens), int(e.mask[1:].sum()), e.fate, _spans(tok, e.tokens, e.mask)
    return ShowReport(record.where, name, index, record.category, list(record.sources), length, trained, fate, spans)
