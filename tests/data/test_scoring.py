"""The key_facts / must_not / rubric schema: valid items pass, each kind of bad entry is named."""

from __future__ import annotations

import pytest

from relief_mlx.data.scoring import entry_problem, scoring_problems

FACTS = [
    {"fact": "at least 0.5 mg/L free residual chlorine", "any": ["0.5 mg/l", "0.5 mg per litre", "0.5 ppm"]},
    {"fact": "test at the point of delivery", "regex": "point of (delivery|use)"},
    {"fact": "turbidity under 5 NTU", "any": ["5 ntu"]},
]
MUST_NOT = [
    {"claim": "someone goes back in to switch it off", "any": ["go back in", "re-enter"], "negated_ok": True},
    {"claim": "0.2 mg/L is enough during the outbreak", "regex": r"0\.2\s*mg"},
]


def test_a_valid_item_has_no_problems():
    assert scoring_problems(FACTS, MUST_NOT, ["mentions the outbreak setting"]) == []
    assert scoring_problems(FACTS, [], None) == []  # must_not may be empty, rubric absent
    assert scoring_problems() == []  # an unscored (train) item


@pytest.mark.parametrize(
    ("entry", "field", "problem"),
    [
        ("0.5 mg/l", "key_facts", "is a str, not an object"),
        ({"fact": "x", "any": ["a"], "note": "?"}, "key_facts", "has unknown key(s) 'note'"),
        ({"fact": "x", "any": ["a"], "negated_ok": True}, "key_facts", "has unknown key(s) 'negated_ok'"),
        ({"any": ["a"]}, "key_facts", "needs a non-empty 'fact' string"),
        ({"fact": " ", "any": ["a"]}, "key_facts", "needs a non-empty 'fact' string"),
        ({"claim": "x", "any": ["a"]}, "key_facts", "has unknown key(s) 'claim'"),
        ({"fact": "x", "any": ["a"], "regex": "a"}, "key_facts", "needs exactly one of 'any' and 'regex'"),
        ({"fact": "x"}, "key_facts", "needs exactly one of 'any' and 'regex'"),
        ({"fact": "x", "any": []}, "key_facts", "'any' must be a non-empty list of surface forms"),
        ({"fact": "x", "any": "0.5 mg/l"}, "key_facts", "'any' must be a non-empty list of surface forms"),
        ({"fact": "x", "any": ["a", ""]}, "key_facts", "'any' holds an empty or non-string surface form"),
        ({"fact": "x", "any": ["a", 5]}, "key_facts", "'any' holds an empty or non-string surface form"),
        ({"fact": "x", "regex": ""}, "key_facts", "'regex' must be a non-empty string"),
        ({"fact": "x", "regex": "point of (delivery"}, "key_facts", "'regex' does not compile"),
        ({"fact": "x", "regex": "(0.5)?"}, "key_facts", "'regex' matches the empty string"),
        ({"claim": "x", "any": ["a"], "negated_ok": "yes"}, "must_not", "'negated_ok' must be true or false"),
        ({"fact": "x", "any": ["a"]}, "must_not", "has unknown key(s) 'fact'"),
    ],
)
def test_each_bad_entry_is_named(entry, field, problem):
    assert entry_problem(entry, field).startswith(problem)


def test_problems_name_the_field_and_index():
    bad = [FACTS[0], {"fact": "x", "any": ["a"], "regex": "a"}, FACTS[2]]
    assert scoring_problems(bad, MUST_NOT) == ["key_facts[1] needs exactly one of 'any' and 'regex'"]
    assert scoring_problems(FACTS, [MUST_NOT[0], {"claim": "x"}]) == [
        "must_not[1] needs exactly one of 'any' and 'regex'"
    ]


@pytest.mark.parametrize(
    ("key_facts", "must_not", "rubric", "problem"),
    [
        (FACTS[:2], None, None, "key_facts has 2 entries; give 3 to 6"),
        (FACTS * 3, None, None, "key_facts has 9 entries; give 3 to 6"),
        ([], None, None, "key_facts has 0 entries; give 3 to 6"),
        ({"fact": "x"}, None, None, "key_facts must be a list of entries"),
        (FACTS, MUST_NOT[0], None, "must_not must be a list of entries"),
        (FACTS, None, "grade kindly", "rubric must be a list of non-empty strings"),
        (FACTS, None, ["ok", ""], "rubric must be a list of non-empty strings"),
        (None, MUST_NOT, None, "has must_not or rubric but no key_facts"),
        (None, None, ["a note"], "has must_not or rubric but no key_facts"),
    ],
)
def test_item_level_problems(key_facts, must_not, rubric, problem):
    problems = scoring_problems(key_facts, must_not, rubric)
    assert len(problems) == 1 and problems[0].startswith(problem)
