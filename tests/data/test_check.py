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
