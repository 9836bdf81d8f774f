"""`relief data check` / `show`: the reports, the failures they catch, and the commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from relief_mlx.cli import cli
from relief_mlx.data import check as ck

REPO = Path(__file__).resolve().parents[2]

ANSWERS = [
    "Use 20 square feet per person for a short evacuation stay and 40 for a long one.",
    "Chlorinate to a free residual of 0.2 to 0.5 mg/L and keep turbidity under 5 NTU.",
    "Walking wounded are tagged green; tag red if respirations exceed 30 per minute.",
    "Never run a generator indoors, not even in a garage with the door open.",
    "Send cash rather than goods; unsolicited donations clog ports and warehouses.",
    "Mark the building with orange paint on the street side and note live victims.",
]


def row(question: str, answer: str, category: str = "shelter", sources=("FEMA 453",)) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "category": category, "sources": list(sources)}


def write(folder: Path, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def clean(tmp_path) -> Path:
    cats = ["shelter", "wash", "triage", "hazmat", "volunteers", "search_rescue"]
    rows = [
        row(f"Question {i} about {c}?", a, c)
        for i, (c, a) in enumerate(zip(cats, ANSWERS, strict=True))
    ]
    write(tmp_path, "train", rows[:4])
    write(tmp_path, "valid", rows[4:5])
    write(tmp_path, "test", rows[5:])
    return tmp_path


def test_clean_dataset_passes_with_counts(clean, harmony_tokenizer):
    report = ck.check_dataset(clean, max_length=512, tokenizer=harmony_tokenizer)
    assert report.ok and report.findings == []
    assert [(s.name, s.examples) for s in report.splits] == [
        ("train", 4),
        ("valid", 1),
        ("test", 1),
    ]
    train = report.splits[0]
    assert train.categories == {"shelter": 1, "wash": 1, "triage": 1, "hazmat": 1}
    assert train.length_min <= train.length_median <= train.length_p95 <= train.length_max
    assert train.trained_tokens > 4 * 10 and train.over_max_length == 0
    assert report.lines()[-1] == "ok"


def test_too_short_max_length_fails_and_counts(clean, harmony_tokenizer):
    report = ck.check_dataset(clean, max_length=16, tokenizer=harmony_tokenizer)
    assert not report.ok
    assert sum(s.dropped for s in report.splits) == 6
    assert {f.kind for f in report.findings} == {"too long"}


def test_duplicates_and_leakage_fail(clean, harmony_tokenizer):
    train = [json.loads(x) for x in (clean / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(x) for x in (clean / "valid.jsonl").read_text().splitlines()]
    leaked_prompt = row(
        train[1]["messages"][0]["content"], "A different answer entirely, about soap."
    )
    near = ANSWERS[0].replace("evacuation", "evacuation-centre").replace("long one", "long stay")
    write(clean, "train", [*train, train[0]])  # exact duplicate
    write(clean, "valid", [*valid, leaked_prompt, row("Space per evacuee?", near)])
    report = ck.check_dataset(clean, max_length=512, tokenizer=harmony_tokenizer)
    kinds = {f.kind: f for f in report.findings}
    assert not report.ok
    assert kinds["exact duplicate"].where == [
        f"{clean / 'train.jsonl'}:1",
        f"{clean / 'train.jsonl'}:5",
    ]
    assert kinds["prompt in two splits"].fail
    leaks = [f for f in report.findings if f.kind == "near-duplicate answers in two splits"]
    train_file, valid_file = clean / "train.jsonl", clean / "valid.jsonl"
    assert all(f.fail for f in leaks)  # the duplicated train line leaks twice
    assert [f.where for f in leaks] == [
        [f"{train_file}:1", f"{valid_file}:3"],
        [f"{train_file}:5", f"{valid_file}:3"],
    ]
    assert "exact duplicate: 1" in "\n".join(report.lines())


def test_near_duplicates_within_a_split_only_warn(tmp_path, harmony_tokenizer):
    near = ANSWERS[1].replace("Chlorinate", "Dose chlorine")
    write(tmp_path, "train", [row("q1?", ANSWERS[1]), row("q2?", near), row("q3?", ANSWERS[2])])
    report = ck.check_dataset(tmp_path, max_length=512, tokenizer=harmony_tokenizer)
    assert report.ok
    (finding,) = report.findings
    assert finding.kind == "near-duplicate answers" and not finding.fail


def test_near_duplicate_pairs_threshold():
    base = ANSWERS[2]
    assert ck.near_duplicate_pairs([base, base.replace("green", "GREEN")]) == [(0, 1, 1.0)]
    edited = base.replace("Walking wounded are", "Anyone who can walk is")
    pairs = ck.near_duplicate_pairs([base, edited, ANSWERS[3]])
    assert [p[:2] for p in pairs] == [(0, 1)] and 0.5 <= pairs[0][2] < 1.0
    assert ck.near_duplicate_pairs(ANSWERS) == []


def test_missing_sources_warn(tmp_path, harmony_tokenizer):
    write(tmp_path, "train", [row("q?", ANSWERS[0], sources=())])
    report = ck.check_dataset(tmp_path, max_length=512, tokenizer=harmony_tokenizer)
    assert report.ok and report.findings[0].kind == "no sources"


def test_show_marks_the_trained_text(clean, harmony_tokenizer):
    report = ck.show_example(clean, 1, "train", tokenizer=harmony_tokenizer)
    assert report.where.endswith("train.jsonl:2") and report.fate == "kept"
    trained = "".join(t for t, on in report.spans if on)
    assert trained == ANSWERS[1] + "<|return|>"
    assert report.lines()[-1].endswith(f"⟦{ANSWERS[1]}<|return|>⟧")
    assert report.trained_tokens == len(harmony_tokenizer.encode(ANSWERS[1])) + 1


# ---------------------------------------------------------------- scored splits, answers, scenarios

SCORED_TRAIN = [
    row("A high school gym in Horry County has 8,000 sq ft of usable sleeping area. How many evacuees "
        "fit for one night?", "About 400 at 20 sq ft per person for a short evacuation stay."),
    row("Cholera cases are rising in the camp near Beira. What free residual chlorine should trucked "
        "water have?", "At least 0.5 mg/L free residual chlorine at the point of delivery.", "wash"),
    row("A man in the rubble can't walk and breathes 36 times a minute. Which START tag?",
        "Immediate (red): breathing over 30 a minute.", "triage"),
    row("My brother runs his generator in the garage with the big door open. Is that safe?",
        "No. Never indoors, garage included; put it at least 20 ft from the house.", "hazmat"),
]
SCORED_TEST = {
    **row("The ford on the road out of Tal Afar has water moving over it, about 30 cm deep. Our pickup "
          "sits high. Can we drive across?",
          "No. Twelve inches of moving water can float a car, and 6 inches can knock you over if you get "
          "out. Turn around and wait for the water to drop.", "evacuation"),
    "key_facts": [
        {"fact": "12 inches of moving water can float a car", "any": ["12 inches", "30 cm", "a foot"]},
        {"fact": "6 inches can knock a person down", "any": ["6 inches", "15 cm"]},
        {"fact": "turn around", "regex": "turn(ed)? a?round"},
    ],
    "must_not": [{"claim": "a high vehicle can cross", "any": ["safe to cross"], "negated_ok": True}],
    "rubric": ["advises waiting or another route"],
}


@pytest.fixture
def scored(tmp_path) -> Path:
    """A small dataset whose test split carries key_facts, must_not and a rubric."""
    write(tmp_path, "train", SCORED_TRAIN)
    write(tmp_path, "valid", [row("Should our church ship donated coats to the earthquake zone?",
                                  "Send cash to established organisations instead.", "volunteers")])
    write(tmp_path, "test", [SCORED_TEST])
    return tmp_path


def fails(report: ck.CheckReport) -> list[tuple[str, list[str], str]]:
    return [(f.kind, f.where, f.detail) for f in report.findings if f.fail]


def test_scored_split_passes_and_counts_turns_thinking_scored(scored, harmony_tokenizer):
    two_turns = row("Is a garage with the door open outdoors?", "No: never run a generator there.", "hazmat")
    two_turns["messages"] += [
        {"role": "user", "content": "And a carport with three open sides?"},
        {"role": "assistant", "content": "Only if it is at least 20 ft from the house.", "thinking": "CDC: 20 ft."},
    ]
    write(scored, "valid", [two_turns])
    report = ck.check_dataset(scored, max_length=512, tokenizer=harmony_tokenizer)
    assert report.ok and report.findings == []
    counts = [(s.name, s.examples, s.multi_turn, s.with_thinking, s.scored) for s in report.splits]
    assert counts == [("train", 4, 0, 0, 0), ("valid", 1, 1, 1, 0), ("test", 1, 0, 0, 1)]


def test_reading_history_phrase_fails_with_file_line(scored, harmony_tokenizer):
    train = [dict(r) for r in SCORED_TRAIN]
    answer = "At least 0.5 mg/L; I've only seen that figure in secondary copies, so check it."
    train[1] = row(train[1]["messages"][0]["content"], answer, "wash")
    write(scored, "train", train)
    report = ck.check_dataset(scored, max_length=512, tokenizer=harmony_tokenizer)
    assert fails(report) == [(
        "reading-history phrase in an answer",
        [f"{scored / 'train.jsonl'}:2"],
        "message 2 content: 'secondary copies'; state the fact, cite it in sources",
    )]


def test_malformed_key_facts_entry_fails_with_file_line(scored, harmony_tokenizer):
    bad = {**SCORED_TEST, "key_facts": [*SCORED_TEST["key_facts"][:2], {"fact": "turn around", "regex": "("}]}
    write(scored, "test", [bad])
    report = ck.check_dataset(scored, max_length=512, tokenizer=harmony_tokenizer)
    ((kind, where, detail),) = fails(report)
    assert (kind, where) == ("bad scoring field", [f"{scored / 'test.jsonl'}:1"])
    assert detail.startswith("key_facts[2] 'regex' does not compile")


def test_unscored_item_in_a_scored_split_fails(scored, harmony_tokenizer):
    write(scored, "test", [SCORED_TEST, row("Where do evacuees with pets go?", "A pet-friendly shelter.")])
    report = ck.check_dataset(scored, max_length=512, tokenizer=harmony_tokenizer)
    assert fails(report) == [(
        "unscored item in a scored split",
        [f"{scored / 'test.jsonl'}:2"],
        "1 of 2 test items carry key_facts; add them here too",
    )]


def test_test_scenario_copied_into_train_fails_with_both_lines(scored, harmony_tokenizer):
    # The test scenario moved to another country and answered in other words: no prompt or
    # answer duplicate to catch, only the same numbers and nouns.
    copied = row("The ford on the road out of Gonaïves has water moving over it, about 30 cm deep. Our "
                 "pickup sits high. Can we drive across?",
                 "Don't. A foot of fast water floats vehicles; wait until it goes down.", "evacuation")
    write(scored, "train", [*SCORED_TRAIN, copied])
    report = ck.check_dataset(scored, max_length=512, tokenizer=harmony_tokenizer)
    ((kind, where, detail),) = fails(report)
    assert kind == "same scenario in two splits"
    assert where == [f"{scored / 'train.jsonl'}:5", f"{scored / 'test.jsonl'}:1"]
    assert detail.startswith("similarity 1.00; shared: ") and "30 cm" in detail


def test_scenario_features_skip_places_and_keep_numbers_units_acronyms():
    features = ck.scenario_features("Flooding in Sylhet: 2,400 sq ft for 120 people, MUAC below 11.5 cm.")
    assert features == {"2400 sq ft": 1, "120 people": 1, "11.5 cm": 1, "MUAC": 1, "people": 1}


def test_scenario_pairs_threshold():
    a = "A ford near Tal Afar has water about 30 cm deep moving over it. Can our pickup cross?"
    swapped = a.replace("Tal Afar", "Gonaïves")
    other = "Water is rising around the clinic near Tal Afar. Do we move patients upstairs or evacuate them?"
    unrelated = "How many toilets for 1,200 people in the first weeks, and how do we split them?"
    pairs = ck.scenario_pairs([a, swapped, other, unrelated], ["test", "train", "train", "train"])
    assert [(i, j) for i, j, _, _ in pairs] == [(0, 1)] and pairs[0][2] == pytest.approx(1.0)
    assert ck.scenario_pairs([a, swapped], ["train", "train"]) == []  # same split: not leakage


# ---------------------------------------------------------------- commands


def test_cli_check_json_with_a_model_tokenizer(clean, tokenizer_dir):
    args = ["data", "check", str(clean), "--tokenizer", str(tokenizer_dir), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True and [s["examples"] for s in report["splits"]] == [4, 1, 1]


def test_cli_check_fails_on_leakage(clean):
    write(clean, "test", [row("New?", ANSWERS[0])])
    result = CliRunner().invoke(cli, ["data", "check", str(clean)])  # default tokenizer
    assert result.exit_code == 1 and "FAIL near-duplicate answers in two splits: 1" in result.output


def test_cli_bad_line_is_one_line_and_skip_invalid_counts(clean):
    with open(clean / "train.jsonl", "a") as f:
        f.write("{broken\n")
    args = ["data", "check", str(clean)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"error: {clean / 'train.jsonl'}:5 is not valid JSON (Expecting property name enclosed in "
        "double quotes at column 2); fix the line or pass --skip-invalid to skip bad lines"
    )
    result = CliRunner().invoke(cli, [*args, "--skip-invalid"])
    assert result.exit_code == 0 and "warn invalid line skipped: 1" in result.output
    assert result.output.splitlines()[-1] == "ok"


def test_cli_check_names_every_failure(scored):
    """A copy with one reading-history phrase, one malformed key_facts entry and one test scenario
    copied into train fails, naming the file:line of each."""
    train = [*SCORED_TRAIN, row(SCORED_TEST["messages"][0]["content"].replace("Tal Afar", "Gonaïves"),
                                "Don't. A foot of fast water floats vehicles; wait.", "evacuation")]
    train[2] = row(train[2]["messages"][0]["content"], "Red, as far as I'm aware.", "triage")
    write(scored, "train", train)
    bad = {**SCORED_TEST, "key_facts": [*SCORED_TEST["key_facts"][:2], {"fact": "turn around"}]}
    write(scored, "test", [bad])
    result = CliRunner().invoke(cli, ["data", "check", str(scored)])
    train_file, test_file = scored / "train.jsonl", scored / "test.jsonl"
    assert result.exit_code == 1
    assert f"FAIL reading-history phrase in an answer: 1\n  {train_file}:3  (message 2 content" in result.output
    assert f"FAIL bad scoring field: 1\n  {test_file}:1  (key_facts[2] needs exactly one" in result.output
    assert f"FAIL same scenario in two splits: 1\n  {train_file}:5 = {test_file}:1  (similarity" in result.output
    assert result.output.splitlines()[-1] == "check failed: 3 finding(s) marked FAIL above"


def test_cli_takes_the_data_settings_of_a_recipe(clean, tmp_path):
    """Regression: data check/show could not read a recipe, so their token counts could differ from training."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\npath = "m"\n[data]\npath = "{clean}"\nmax_length = 40\nmask = "last"\n')
    by_recipe = json.loads(CliRunner().invoke(cli, ["data", "check", "--recipe", str(recipe), "--json"]).output)
    by_hand = json.loads(CliRunner().invoke(cli, ["data", "check", str(clean), "--max-length", "40",
                                                  "--mask", "last", "--json"]).output)
    assert by_recipe == by_hand and by_recipe["max_length"] == 40
    overridden = json.loads(CliRunner().invoke(cli, ["data", "check", "--recipe", str(recipe), "--max-length",
                                                     "512", "--json"]).output)
    assert overridden["max_length"] == 512
    shown = CliRunner().invoke(cli, ["data", "show", "--recipe", str(recipe), "--index", "0", "--mask", "all"])
    assert shown.exit_code == 0, shown.output
    gone = CliRunner().invoke(cli, ["data", "check", str(clean), "--mask-mode", "final"])
    assert gone.exit_code == 2 and "Did you mean '--mask'?" in gone.output
    assert "pass a dataset PATH" in CliRunner().invoke(cli, ["data", "check"]).output


def test_cli_show(clean):
    result = CliRunner().invoke(cli, ["data", "show", str(clean), "--index", "0"])
    assert result.exit_code == 0 and f"⟦{ANSWERS[0]}<|return|>⟧" in result.output
    result = CliRunner().invoke(cli, ["data", "show", str(clean), "--index", "9"])
    assert result.exit_code == 1 and "--index 9 is outside train (0..3)" in result.output


@pytest.mark.skipif(
    not (REPO / "datasets/emergency_relief/train.jsonl").exists(),
    reason="the bundled dataset is not written yet",
)
def test_bundled_dataset_passes_the_check(harmony_tokenizer):
    report = ck.check_dataset(REPO / "datasets/emergency_relief", tokenizer=harmony_tokenizer)
    assert report.ok, "\n".join(report.lines())
