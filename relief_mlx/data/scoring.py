"""The scoring fields of a test item: `key_facts`, `must_not`, `rubric` (schema and validation).

The schema (datasets/emergency_relief/README.md, "Scoring fields"):
- `key_facts`: 3 to 6 entries `{"fact": str, "any": [str, ...]}` or `{"fact": str, "regex": str}`;
- `must_not`: 0 or more entries `{"claim": str, "any": [...]}` or `{"claim": str, "regex": str}`,
  each with an optional `"negated_ok": bool` (a negated mention is then no violation);
- `rubric`: a list of notes for a human grader, never scored.
An entry has exactly one of `any` (non-empty surface forms) and `regex` (a Python regular
expression, searched case-insensitively), and no other keys. How an answer is matched against
them (normalization, negation) is the scorer's job; this module only says whether they are valid.
"""

from __future__ import annotations

import re
from typing import Any

KEY_FACTS = (3, 6)  # entries per scored item, inclusive
_TEXT_KEY = {"key_facts": "fact", "must_not": "claim"}


def _matcher_problem(entry: dict) -> str | None:
    if ("any" in entry) == ("regex" in entry):
        return "needs exactly one of 'any' and 'regex'"
    if "any" in entry:
        forms = entry["any"]
        if not isinstance(forms, list) or not forms:
            return "'any' must be a non-empty list of surface forms"
        if not all(isinstance(f, str) and f.strip() for f in forms):
            return "'any' holds an empty or non-string surface form"
        return None
    if not isinstance(entry["regex"], str) or not entry["regex"].strip():
        return "'regex' must be a non-empty string"
    try:
        pattern = re.compile(entry["regex"], re.IGNORECASE)
    except re.error as e:
        return f"'regex' does not compile ({e})"
    if pattern.search(""):
        return "'regex' matches the empty string, so it matches every answer"
    return None


def entry_problem(entry: Any, field: str) -> str | None:
    """What is wrong with one `key_facts` or `must_not` entry, or None."""
    text_key = _TEXT_KEY[field]
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    allowed = {text_key, "any", "regex"} | ({"negated_ok"} if field == "must_not" else set())
    if extra := sorted(set(entry) - allowed):
        return f"has unknown key(s) {', '.join(map(repr, extra))}; allowed: {', '.join(sorted(allowed))}"
    if not isinstance(entry.get(text_key), str) or not entry[text_key].strip():
        return f"needs a non-empty '{text_key}' string"
    if not isinstance(entry.get("negated_ok", False), bool):
        return "'negated_ok' must be true or false"
    return _matcher_problem(entry)


def scoring_problems(
    key_facts: Any = None, must_not: Any = None, rubric: Any = None
) -> list[str]:
    """Problems with an item's scoring fields (None = absent), each naming the entry and the fix."""
    problems = []
    if key_facts is not None:
        low, high = KEY_FACTS
        if not isinstance(key_facts, list):
            problems.append("key_facts must be a list of entries")
        elif not low <= len(key_facts) <= high:
            problems.append(f"key_facts has {len(key_facts)} entries; give {low} to {high}")
    if must_not is not None and not isinstance(must_not, list):
        problems.append("must_not must be a list of entries")
    for field, entries in (("key_facts", key_facts), ("must_not", must_not)):
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            if problem := entry_problem(entry, field):
                problems.append(f"{field}[{i}] {problem}")
    if rubric is not None and (
        not isinstance(rubric, list) or not all(isinstance(n, str) and n.strip() for n in rubric)
    ):
        problems.append("rubric must be a list of non-empty strings")
    if key_facts is None and (must_not is not None or rubric is not None):
        problems.append("has must_not or rubric but no key_facts; a scored item needs key_facts")
    return problems
