"""The scorer on hand-written answers: facts, numbers, units and spellings, must_not and negation,
refusal, empty and unfinished answers, and the schema checks."""

from __future__ import annotations

import pytest
from eval_helpers import CHLORINE, GENERATOR, ITEMS, SPACE, WATER

from relief_mlx.data.scoring import scoring_problems
from relief_mlx.eval import normalize, score


@pytest.mark.parametrize("item", ITEMS, ids=lambda it: it["category"] + ":" + it["messages"][0]["content"][:20])
def test_the_reference_answer_scores_every_fact(item):
    s = score(item["messages"][-1]["content"], item)
    assert s.coverage == 1.0 and s.missed == () and s.violations == ()
    assert s.matched == tuple(f["fact"] for f in item["key_facts"])


def test_a_wrong_number_does_not_match():
    s = score("Keep 0.2 mg/L of free chlorine at the point of delivery, daily.", CHLORINE)
    assert "at least 0.5 mg/L free residual chlorine" in s.missed
    assert s.matched == ("test at the point of delivery", "test daily")
    assert [v.claim for v in s.violations] == ["0.2 mg/L is enough during the outbreak"]


@pytest.mark.parametrize("answer", ["10.5 mg/L", "0.55 mg/L", "0.5 mg/dl", "20.5 mg per litre", "5 mg/l"])
def test_a_number_never_matches_inside_another(answer):
    assert score(answer, CHLORINE).coverage == 0.0


@pytest.mark.parametrize("answer", [
    "Free chlorine of 0.5 mg/l", "0.5mg/L", "0.5 MG/L", "0.5 milligrams per liter", "0.5 ppm",
    "0.5 mg per litre", "0.5\u00a0mg/L", "0.5 mg / L", "0.5 parts per million",
])
def test_units_and_spellings_of_a_concentration_match(answer):
    assert score(answer, CHLORINE).matched == ("at least 0.5 mg/L free residual chlorine",)


@pytest.mark.parametrize("answer", [
    "15 L per person per day, for drinking, cooking and hygiene",
    "fifteen liters per person per day for drinking, cooking and hygiene",
    "15 litres/person/day: drinking, cooking, hygiene",
    "Fifteen Litres per person per day (drinking \u2013 cooking \u2013 hygiene)",
    "15l per person per day for drinking and cooking and hygiene",
])
def test_units_numbers_and_spellings_of_a_volume_match(answer):
    assert set(score(answer, WATER).matched) >= {"15 L per person per day", "covers drinking, cooking and hygiene"}


def test_area_spellings_and_a_multi_turn_item():
    for answer in ("3.5 m\u00b2 of covered space", "3.5 sq m of covered area", "3.5 square meters, covered space"):
        assert score(answer, SPACE).matched[:2] == ("3.5 m2 covered space per person", "covered space"), answer
    assert score("35 m2 of covered space", SPACE).matched == ("covered space",)


def test_an_empty_answer_scores_zero():
    s = score("", CHLORINE, finished=False)
    assert (s.coverage, s.matched, s.empty, s.unfinished, s.words) == (0.0, (), True, True, 0)
    assert score("   \n", CHLORINE).empty


def test_a_fact_counts_once():
    s = score("daily, daily, every day and each day", CHLORINE)
    assert s.matched == ("test daily",) and len(s.missed) == 2
    assert s.coverage == pytest.approx(1 / 3)


def test_a_must_not_phrase_is_caught_and_quoted():
    s = score("Someone should go back in quickly and switch it off. Then call the fire service.", GENERATOR)
    assert [(v.claim, v.quote) for v in s.violations] == [
        ("someone goes back in to switch the generator off", "Someone should go back in quickly and switch it off")]


@pytest.mark.parametrize("answer", [
    "Do not go back in.", "Don\u2019t go back in for anything.", "Nobody goes back in.", "Never re-enter the shelter.",
    "No one should go back in until the fire service says so.", "Avoid the urge to go back in.",
])
def test_a_negated_mention_is_not_a_violation_when_negated_ok(answer):
    assert score(answer, GENERATOR).violations == ()


@pytest.mark.parametrize("answer", [
    "Go back in and switch it off.", "Don't panic, go back in and switch it off.",
    "Do not wait for the fire service; go back in.", "Wait outside but go back in after ten minutes.",
])
def test_negation_reaches_only_its_own_clause(answer):
    assert len(score(answer, GENERATOR).violations) == 1


def test_negation_excuses_only_claims_marked_negated_ok():
    strict = {**GENERATOR, "must_not": [{**GENERATOR["must_not"][0], "negated_ok": False}]}
    assert len(score("Do not go back in.", strict).violations) == 1


@pytest.mark.parametrize("answer,refusal", [
    ("I can't help with that.", True), ("I\u2019m sorry, but I cannot provide that information.", True),
    ("I'm unable to assist with this request.", True), ("I can help: keep 0.5 mg/L.", False),
    ("If you can't reach the clinic, call the hotline.", False),
])
def test_refusals_are_detected(answer, refusal):
    assert score(answer, CHLORINE).refusal is refusal


def test_normalization_is_documented_behaviour():
    assert normalize("Keep Twenty-Five kilos, 1,000 people; 10\u201320 minutes at 37.5\u00b0C") == (
        "keep 25 kg | 1000 people | 10 to 20 min at 37.5 c")
    assert normalize("two hundred and fifty") == "250" and normalize("between one and two litres") == (
        "between 1 and 2 l")
    assert normalize("no one should") == "no one should"  # "one" after a determiner stays a word
    assert normalize("20 sq. ft. within 24-hours") == "20 sq ft within 24 h"


def test_the_hand_written_items_follow_the_dataset_schema():
    assert all(scoring_problems(it["key_facts"], it.get("must_not"), it.get("rubric")) == [] for it in ITEMS)
