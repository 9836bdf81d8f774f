"""Helpers of the trainer tests (imported by name: a second `conftest` module would clash)."""

from __future__ import annotations

import json
from pathlib import Path

TOPICS = [
    ("Where should the water point go?", "Uphill from the latrines, at least 30 metres away."),
    ("How much water per person per day?", "At least 15 litres for drinking, cooking and hygiene."),
    ("Who gets food first?", "Children under five, pregnant women and the sick, then everyone else."),
    ("The generator is out of fuel.", "Ration it for the clinic fridge and lights, and ask logistics."),
    ("A volunteer is exhausted.", "Send them to rest for a full shift; tired people make mistakes."),
    ("How do I count arrivals?", "Register each household once, with a token, at a single gate."),
    ("Rain is coming tonight.", "Dig drainage around the tents and lift supplies off the floor."),
    ("A child is alone.", "Keep them with a trained carer, register them and start tracing."),
    ("The road is flooded.", "Do not drive through; wait for the engineers' assessment."),
    ("Someone smells gas.", "Evacuate upwind, no sparks or phones, and call the hazmat team."),
    ("The clinic runs out of gloves.", "Prioritise gloves for wound care and request a resupply today."),
]


def write_dataset(folder: Path, n_train: int = 8, n_valid: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in TOPICS]
    assert n_train + n_valid <= len(rows), "validation rows must not repeat training rows"
    # test: one item with the key_facts `relief eval` (the [eval] section) scores
    test = [rows[0] | {"category": "wash", "key_facts": [
        {"fact": "30 m from the latrines", "any": ["30 metres"]}, {"fact": "uphill", "any": ["uphill"]},
        {"fact": "from the latrines", "any": ["latrines"]}]}]
    splits = {"train": rows[:n_train], "valid": rows[n_train:n_train + n_valid], "test": test}
    for split, lines in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def build(path: Path):
    """The model of a converted checkpoint folder, without a tokenizer (fast)."""
    import mlx.core as mx

    from relief_mlx.model.load import build_model, read_weights

    model = build_model(json.loads((Path(path) / "config.json").read_text()), read_weights(Path(path)))
    mx.eval(model.parameters())
    return model


def assert_trees_close(want: dict, got: dict, rtol: float, what: str = "") -> None:
    """Every tensor of `got` equals `want`'s within `rtol` of that tensor's scale (its largest
    magnitude): Adam's second moments are ~1e-8, which an absolute tolerance would never check."""
    import numpy as np

    assert set(got) == set(want), what
    for k, a in want.items():
        a, b = np.asarray(a), np.asarray(got[k])
        assert np.abs(a).max() > 0 or np.abs(b).max() == 0, f"{what}:{k}"
        np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * np.abs(a).max(), err_msg=f"{what}:{k}")
