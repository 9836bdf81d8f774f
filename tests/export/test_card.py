"""The model card reads what it states from the folders involved, and says what is missing."""

import json
from types import SimpleNamespace

from relief_mlx.export.card import write_card


def test_card_quotes_recipe_dataset_license_and_evaluation(tmp_path):
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    data = tmp_path / "data"
    data.mkdir()
    (data / "README.md").write_text("# data\n\n## License\n\nCC BY 4.0, with\nattribution.\n\n## Limits\n\n- few\n")
    (run / "recipe.toml").write_text(f'[lora]\nrank = 8\n[data]\npath = "{data}"\n[train]\niterations = 30\n')
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"summary": "the adapter scores 12 points higher (95% CI 4 to 20)", "n": 32}))
    adapter = SimpleNamespace(path=run / "best", rank=8, scale=2.0, lora={"a": 0, "b": 0})
    out = tmp_path / "out"
    out.mkdir()
    write_card(out, "exports/relief-hf", "hf", tmp_path / "base", adapter, {"merged": []}, eval_summary=summary,
               base_hf="openai/gpt-oss-20b")
    card = (out / "README.md").read_text()
    assert card.startswith("# relief-hf\n")
    assert "[lora] rank=8" in card and "[train] iterations=30" in card  # found two folders up from best/
    assert "License: CC BY 4.0, with attribution." in card
    assert "the adapter scores 12 points higher" in card and "- n: 32" in card
    assert "AutoModelForCausalLM.from_pretrained('exports/relief-hf')" in card
    assert "Not a substitute for trained responders" in card


def test_card_says_what_is_missing(tmp_path):
    write_card(tmp_path, "fused", "mlx", tmp_path / "base", None, {})
    card = (tmp_path / "README.md").read_text()
    assert "- not recorded (no recipe.toml beside the adapter)" in card
    assert "none recorded (run `relief eval`" in card
    assert "- nothing: no adapter" in card
