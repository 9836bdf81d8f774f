"""The model card (README.md) every fused model and export carries: what it was made from (base
model, adapter, recipe, dataset and its license, evaluation), what was done to the weights, how
to run it, and its limits. Everything is read from the folders involved; what is missing is said."""

from __future__ import annotations

import json
from pathlib import Path

from .. import bundled
from ..io import MANIFEST, write_text
from ..recipe import read_tables

RECIPE = "recipe.toml"
CARD = "README.md"
USAGE = {
    "mlx": "relief generate --model {out} --prompt \"...\"{kept}\n"
           "python -c \"import mlx_lm; mlx_lm.load('{out}')\"",
    "hf": "from transformers import AutoModelForCausalLM\n"
          "model = AutoModelForCausalLM.from_pretrained('{out}')",
    "peft": "from transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n"
            "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{base_hf}'), '{out}')",
    "gguf": "llama-cli -m {out}/model.gguf\nollama create relief -f {out}/Modelfile && ollama run relief",
    "gguf-file": "llama-cli -m {out}\nollama create relief -f {stem}.Modelfile && ollama run relief",
}
LIMITATIONS = """\
- Not a substitute for trained responders, clinicians or local authorities. Follow local protocols,
  incident command and national rules; the model can be wrong, out of date or overconfident.
- Trained on a small English dataset whose sources are mostly US- and Sphere-centric; figures are
  tied to the editions cited in the dataset card.
- Check the evaluation above (if any) before relying on it; an adapter's gains on a test split do
  not carry over to every emergency."""


def _run_folder_file(adapter: Path, name: str) -> Path | None:
    """`name` in the adapter folder or the two above it (an adapter may be a run's best/ or checkpoint/)."""
    return next((d / name for d in (adapter, *adapter.parents[:2]) if (d / name).is_file()), None)


def _recipe(adapter: Path | None) -> tuple[list[str], dict]:
    file = _run_folder_file(adapter, RECIPE) if adapter else None
    if file is None:
        return ["- not recorded (no recipe.toml beside the adapter)"], {}
    recipe = read_tables(file)
    lines = [f"- `{file}`"]
    for section in ("lora", "train", "data"):
        values = ", ".join(f"{k}={v!r}" for k, v in recipe.get(section, {}).items())
        lines.append(f"- [{section}] {values}" if values else f"- [{section}] defaults")
    return lines, recipe


def _dataset(recipe: dict) -> list[str]:
    data = recipe.get("data", {}).get("path")
    if data is None:
        return ["- not recorded"]
    card = bundled.resolve("datasets", data) / CARD
    license_text = f"not found (no dataset card at {card})"
    if card.is_file():
        text = card.read_text().split("## License", 1)
        if len(text) == 2:
            license_text = " ".join(text[1].split("\n## ", 1)[0].split())
    return [f"- `{data}`", f"- License: {license_text}"]


def _evaluation(eval_summary: Path | None) -> list[str]:
    if eval_summary is None or not eval_summary.is_file():
        return ["- none recorded (run `relief eval` and pass its summary with --eval)"]
    summary = json.loads(eval_summary.read_text())
    lines = [f"- `{eval_summary}`"]
    if isinstance(summary.get("summary"), str):
        lines.append(f"- {summary['summary']}")
    lines += [f"- {k}: {v}" for k, v in summary.items() if isinstance(v, (int, float, str)) and k != "summary"]
    return lines


def _base_source(base: Path) -> str:
    manifest = base / MANIFEST
    if manifest.is_file():
        record = json.loads(manifest.read_text())
        if record.get("source"):
            revision = f" (revision {record['revision']})" if record.get("revision") else ""
            return f"{record['source']}{revision}, converted by relief-mlx into `{base}`"
    return f"`{base}`"


def _changes(details: dict) -> list[str]:
    merged = details.get("merged", [])
    lines = []
    for kind in ("dense", "dequantized", "requantized", "kept"):
        group = [m for m in merged if m["kind"] == kind]
        if group:
            worst = max(m["delta_error"] for m in group)
            lines.append(f"- {kind}: {len(group)} modules ({group[0]['dtype']}), worst relative error of the "
                         f"stored delta {worst:.2e}")
    if check := details.get("check"):
        lines.append(f"- checked: {check['tokens']} tokens against base + adapter: relative logit error "
                     f"{check['median_relative_error']:.2e} (median; allowed {details['tolerance']:.0e}), "
                     f"{check['max_relative_error']:.2e} (max), argmax agreement {check['argmax_agreement']:.1%}; "
                     f"the adapter itself moves the logits by {check['adapter_effect']:.2e} (median)")
    return lines + [f"- {line}" for line in details.get("notes", [])]


def write_card(folder: Path, name: str, kind: str, base: Path, adapter, details: dict,
               eval_summary: Path | None = None, base_hf: str | None = None) -> None:
    """README.md in `folder` (being built; `name` is the folder it becomes, or the .gguf file it
    accompanies), written atomically. `kind` is what the folder holds: mlx (a fused model), hf,
    peft or gguf."""
    adapter_path = Path(adapter.path) if adapter is not None else None
    recipe_lines, recipe = _recipe(adapter_path)
    lora = (f"rank {adapter.rank}, scale {adapter.scale:g} (PEFT's lora_alpha / r), "
            f"{len(adapter.lora)} modules" if adapter is not None else "none (the weights are used as they are)")
    kept = f" --adapter {name}/adapter" if details.get("kept_adapter") else ""
    command = "fuse" if kind == "mlx" else f"export --format {kind}"
    usage, manifest = ("gguf-file", f"{Path(name).stem}.manifest.json") if name.endswith(".gguf") else (kind, MANIFEST)
    sections = {
        f"# {Path(name).name}": [f"gpt-oss fine-tuned with relief-mlx into an emergency-relief assistant; this "
                                 f"{'file' if name.endswith('.gguf') else 'folder'} is its **{kind}** form, written by "
                                 f"`relief {command}`."],
        "## Base model": [f"- {_base_source(base)}"],
        "## Adapter": [f"- `{adapter_path}`: {lora}" if adapter_path else f"- {lora}"],
        "## Recipe": recipe_lines,
        "## Dataset": _dataset(recipe),
        "## Evaluation": _evaluation(eval_summary),
        "## What was done to the weights": _changes(details) or ["- nothing: no adapter"],
        "## How to run it": ["```", USAGE[usage].format(out=name, stem=name[:-len(".gguf")], kept=kept,
                                                         base_hf=base_hf or "BASE"), "```"],
        "## Limitations": [LIMITATIONS],
        "## Files": [f"Every file and its sha256: `{manifest}`."],
    }
    text = "\n\n".join(title + "\n\n" + "\n".join(lines) for title, lines in sections.items())
    write_text(folder / CARD, text + "\n")
