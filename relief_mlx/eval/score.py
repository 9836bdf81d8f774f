"""Score one answer against its test item's `key_facts` and `must_not`: a pure function, no model.

    from relief_mlx.eval import score
    s = score("Keep at least 0.5 mg per litre of free chlorine.", item)   # item: a test.jsonl line, parsed
    s.matched, s.missed, s.violations, s.coverage, s.refusal, s.empty

Item schema (the lead's, shared with the dataset): `key_facts` is a list of
`{"fact": str, "any": [surface forms]}` or `{"fact": str, "regex": str}`; `must_not` a list of
`{"claim": str, "any" | "regex": ..., "negated_ok": bool}`. A fact counts once, however often
it is matched; coverage is matched facts over all facts (0 for an empty answer).

Normalization (`normalize`), applied to the answer and to every surface form alike:
1. Unicode NFKC (full-width forms, "m²" -> "m2", "℃" -> "°C", odd spaces -> " "); dashes,
   minus signs and typographic quotes folded to ASCII; case-folded.
2. The text is cut into clauses at , ; : ! ? line breaks, the word "but", and a "." that is
   not followed by a digit or a lower-case word (so "0.5", "1,000", "sq. ft." and "e.g. the"
   stay whole); clauses are joined by " | ": a surface form never matches across one, a regex
   may ("drinking.*hygiene" matches "drinking, cooking and hygiene").
3. Spelled-out numbers become digits ("fifteen" -> 15, "two hundred and fifty" -> 250), except
   "one" after a determiner ("no one", "the one"); "1,000" -> 1000; a dash between numbers
   reads "to" ("10-20" -> "10 to 20"); "≥"/"≤" read "at least"/"at most".
4. Units are canonical and split from their number ("15L" -> "15 l"): litre(s)/liter(s)/ltr
   -> l, millilitre -> ml, mg/L, mg per litre, milligrams per liter, ppm -> mg/l, square
   metres/sq m/m² -> m2, square feet/sq ft/ft² -> sq ft, °C/degrees Celsius -> c, °F -> f,
   kilogram(s)/kilos -> kg, gram(s) -> g, metre(s) -> m (km, cm, mm alike), kilocalories/
   calories/kcals -> kcal, percent/per cent -> %; after a number only (the words are also
   ordinary words): hour(s)/hr(s) -> h, minute(s)/min(s) -> min, second(s)/sec(s) -> s,
   feet/foot -> ft, day(s)/week(s)/month(s)/year(s) -> day/week/month/year; "per" -> "/".
5. Apostrophes dropped ("don't" -> "dont"); other punctuation becomes a space (a "." is kept
   only inside a number); spaces collapsed.

A surface form matches where its normalized form occurs on word and number boundaries: "0.5"
matches neither "10.5" nor "0.55". A `regex` is searched, case-insensitively, in the normalized
answer as written: write it against normalized text (`0\\.5 mg/l`, not `0.5 mg per litre`).

`negated_ok`: a must_not mention preceded in its clause by a negation (not, do not, dont,
never, no, no one, nobody, avoid, without, cannot, cant, wont, shouldnt, mustnt...) is not a
violation: "Do not go back in" is fine, "Go back in for the documents" is not. Limits: a comma
ends the negation's reach ("Never, under any circumstances, go back in" is flagged), and
double negatives are not understood; violations are quoted in the report for a human to judge.

Also reported: refusal ("I can't help with that", "I'm unable to assist", ... within the first
few hundred characters), empty (no final text), unfinished (given by the caller: the answer hit
its token limit or never closed a final message) and the word count.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------- normalization

_FOLD = str.maketrans({**dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63", "-"),
                       **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u00b4`", "'"),
                       **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", '"'),
                       "\u00ba": "\u00b0", "\u2265": " at least ", "\u2264": " at most "})
# a "." before a digit or a lower-case word is a decimal point or an abbreviation ("sq. ft.", "e.g.")
SEPARATOR = " | "
_CLAUSE_END = re.compile(r"[\n!?;:]|,(?!\d)|\.(?! ?[0-9a-z])|\b[Bb]ut\b")

_SMALL = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_WORD = "|".join(sorted([*_SMALL, *_TENS, *_SCALES], key=len, reverse=True))
_NUMBER_RUN = re.compile(rf"\b(?:{_WORD})(?:(?:\s+|-)(?:and\s+)?(?:{_WORD}))*\b")
_NOT_A_NUMBER = {"no", "any", "some", "every", "each", "this", "that", "which", "the", "a", "another"}

# (pattern, canonical form, only right after a number)
_UNITS = [
    (r"per ?cent|percent", "%", False),
    (r"milligrams? (?:per|/) ?(?:litre|liter)s?|mg (?:per|/) ?(?:litre|liter|l)|ppm", "mg/l", False),
    (r"square (?:metre|meter)s?|sq\.? ?m|sqm", "m2", False),
    (r"square (?:feet|foot)|sq\.? ?(?:ft|feet)\.?|ft2", "sq ft", False),
    (r"degrees? (?:celsius|centigrade|c)|deg\.? c|° ?c|celsius|centigrade", "c", False),
    (r"degrees? (?:fahrenheit|f)|° ?f|fahrenheit", "f", False),
    (r"milli(?:litre|liter)s?", "ml", False),
    (r"(?:litre|liter|ltr)s?", "l", False),
    (r"milligrams?", "mg", False),
    (r"kilograms?|kilos?|kgs", "kg", False),
    (r"grams?", "g", False),
    (r"kilo(?:metre|meter)s?|kms", "km", False),
    (r"centi(?:metre|meter)s?", "cm", False),
    (r"milli(?:metre|meter)s?", "mm", False),
    (r"(?:metre|meter)s?", "m", False),
    (r"kilocalories|kilocalorie|kcals|calories|calorie", "kcal", False),
    (r"hours?|hrs?", "h", True),
    (r"minutes?|mins?", "min", True),
    (r"seconds?|secs?", "s", True),
    (r"feet|foot", "ft", True),
    (r"days?", "day", True),
    (r"weeks?", "week", True),
    (r"months?", "month", True),
    (r"years?|yrs?", "year", True),
]
_UNIT_RULES = [(re.compile(rf"(?<=\d )(?:{p})\b" if after_number else rf"(?<![\w°])(?:{p})(?![\w])"), canonical)
               for p, canonical, after_number in _UNITS]


def _spelled(words: list[str]) -> str:
    """Digits for a run of number words: "twenty five" -> "25", "one and two" -> "1 and 2"."""
    out, total, current, last, after_and = [], 0, 0, None, False
    for w in words:
        if w == "and":
            after_and = True
            continue
        # "one two", "five twenty", "one and two": a unit or tens word after a unit starts a new number
        if (w in _SMALL or w in _TENS) and last is not None and (
                last in _SMALL or (last in _TENS and (w in _TENS or after_and))):
            out += [str(total + current)] + ["and"] * after_and
            total, current = 0, 0
        after_and = False
        if w in _SMALL:
            current += _SMALL[w]
        elif w in _TENS:
            current += _TENS[w]
        elif w == "hundred":
            current = max(current, 1) * 100
        else:
            total, current = total + max(current, 1) * _SCALES[w], 0
        last = w
    return " ".join([*out, str(total + current)])


def _spell_out(match: re.Match) -> str:
    words = re.split(r"[\s-]+", match.group(0))
    before = match.string[:match.start()].split()
    if words == ["one"] and before and before[-1] in _NOT_A_NUMBER:
        return "one"  # "no one", "the one who"
    return _spelled(words)


def _normalize_clause(text: str) -> str:
    text = re.sub(r"\bparts per million\b", "ppm", text)  # before "million" becomes a number
    text = _NUMBER_RUN.sub(_spell_out, text)
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?<=\d)\s*-\s*(?=\d)", " to ", text)  # 10-20 -> 10 to 20
    text = re.sub(r"(?<![\s\d])-|-(?!\d)", " ", text)  # re-enter -> re enter; a minus sign stays
    text = re.sub(r"(?<=\d)(?=[^\W\d_]|[°%])", " ", text)  # 15l -> 15 l
    text = re.sub(r"\s+", " ", text)
    for rule, canonical in _UNIT_RULES:
        text = rule.sub(canonical, text)
    text = re.sub(r"\s*\bper\b\s*|\s*/\s*", "/", text)
    text = text.replace("'", "")
    text = re.sub(r"(?<!\d)\.|\.(?!\d)|[^\w\s./%°-]", " ", text)
    return " ".join(text.split())


def _clauses(text: str) -> list[str]:
    """The answer's clauses (raw text, for quoting), split as step 2 of `normalize` says."""
    text = unicodedata.normalize("NFKC", text).translate(_FOLD)
    return [c.strip() for c in _CLAUSE_END.split(text) if c.strip()]


def normalize(text: str) -> str:
    """The normalized form matching runs on (module docstring): clauses joined by " | "."""
    return SEPARATOR.join(filter(None, (_normalize_clause(c.casefold()) for c in _clauses(text))))


@functools.lru_cache(maxsize=4096)
def _form_pattern(form: str) -> re.Pattern | None:
    normalized = normalize(form)
    if not normalized:
        return None
    return re.compile(rf"(?<![\w.]){re.escape(normalized)}(?![\w]|\.\d)")


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)


# ---------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Violation:
    """A must_not claim found in the answer."""

    claim: str
    quote: str
    """The clause of the answer it was found in, as written."""


@dataclass(frozen=True)
class Score:
    """How one answer did on its item."""

    matched: tuple[str, ...]
    """`fact` texts found in the answer, in item order."""
    missed: tuple[str, ...]
    violations: tuple[Violation, ...]
    refusal: bool
    empty: bool
    unfinished: bool
    words: int

    @property
    def coverage(self) -> float:
        """Matched facts over all facts; 0 when the item has none."""
        total = len(self.matched) + len(self.missed)
        return len(self.matched) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"coverage": round(self.coverage, 6), "matched": list(self.matched), "missed": list(self.missed),
                "violations": [{"claim": v.claim, "quote": v.quote} for v in self.violations],
                "refusal": self.refusal, "empty": self.empty, "unfinished": self.unfinished, "words": self.words}


_NEGATION = re.compile(r"\b(?:not|dont|doesnt|didnt|never|no|no one|nobody|none|avoid|avoids|avoiding|without|"
                       r"cannot|cant|wont|shouldnt|mustnt|neither|nor)\b")
_REFUSAL = re.compile(r"\b(?:i|im|i am) (?:cant|cannot|can not|wont|will not|unable to|not able to)(?: be able to)? "
                      r"(?:help|assist|provide|support|answer|comply|give|do that|fulfil|fulfill)")


def _matches(entry: Mapping, text: str) -> list[int]:
    """Start offsets in the normalized `text` where `entry` matches."""
    if "regex" in entry:
        return [m.start() for m in _regex(entry["regex"]).finditer(text)]
    patterns = (p for p in map(_form_pattern, entry["any"]) if p is not None)
    return sorted(m.start() for p in patterns for m in p.finditer(text))


def _negated(text: str, start: int) -> bool:
    """True when a negation precedes `start` in its clause."""
    cut = text.rfind(SEPARATOR, 0, start)
    return bool(_NEGATION.search(text[cut + len(SEPARATOR) if cut >= 0 else 0:start]))


def score(answer: str, item: Mapping, finished: bool = True) -> Score:
    """Score the final-channel text `answer` on `item`'s key_facts and must_not.

    `finished` is False when the answer was cut short (token limit, no closed final message);
    it is reported, not held against the facts that were given.
    """
    clauses = _clauses(answer)
    normalized = [_normalize_clause(c.casefold()) for c in clauses]
    text = SEPARATOR.join(normalized)
    starts = [0]  # offset of each clause's first character in `text`
    for clause in normalized[:-1]:
        starts.append(starts[-1] + len(clause) + len(SEPARATOR))
    facts: Sequence[Mapping] = item.get("key_facts") or []
    found = [bool(_matches(f, text)) for f in facts]
    violations = []
    for claim in item.get("must_not") or []:
        hits = [s for s in _matches(claim, text) if not (claim.get("negated_ok") and _negated(text, s))]
        if hits:
            clause = max(i for i, s in enumerate(starts) if s <= hits[0])
            violations.append(Violation(claim["claim"], clauses[clause]))
    return Score(
        matched=tuple(f["fact"] for f, ok in zip(facts, found, strict=True) if ok),
        missed=tuple(f["fact"] for f, ok in zip(facts, found, strict=True) if not ok),
        violations=tuple(violations),
        refusal=bool(_REFUSAL.search(text[:400])),
        empty=not answer.strip(),
        unfinished=not finished,
        words=len(answer.split()),
    )
