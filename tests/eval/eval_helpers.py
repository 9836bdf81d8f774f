"""Hand-written test items in the lead's key_facts / must_not schema, and a small split of them
(imported by name: a second `conftest` module would clash)."""

from __future__ import annotations

import json
from pathlib import Path

CHLORINE = {
    "messages": [
        {"role": "user", "content": "Cholera in the camp. What chlorine level do we need in the tap water?"},
        {"role": "assistant", "content": "During an outbreak, keep at least 0.5 mg/L free residual chlorine, "
                                         "tested at the point of delivery, every day."},
    ],
    "category": "wash",
    "sources": ["Sphere WASH standard 2.2"],
    "key_facts": [
        {"fact": "at least 0.5 mg/L free residual chlorine", "any": ["0.5 mg/l", "0.5 mg per litre", "0.5 ppm"]},
        {"fact": "test at the point of delivery", "regex": "point of (delivery|use)"},
        {"fact": "test daily", "any": ["every day", "daily", "each day"]},
    ],
    "must_not": [
        {"claim": "0.2 mg/L is enough during the outbreak", "regex": "0\\.2\\s*mg"},
    ],
    "rubric": ["mentions the outbreak raises the target"],
}

GENERATOR = {
    "messages": [
        {"role": "user", "content": "The shelter generator is smoking and people ran out. Do we switch it off?"},
        {"role": "assistant", "content": "Nobody goes back in. Keep everyone 30 metres upwind and call the "
                                         "fire service; let them isolate it."},
    ],
    "category": "shelter",
    "sources": ["NFPA 110"],
    "key_facts": [
        {"fact": "keep people at least 30 m away", "any": ["30 m", "30 metres", "thirty metres"]},
        {"fact": "call the fire service", "any": ["fire service", "fire brigade", "fire department"]},
        {"fact": "stay upwind", "any": ["upwind"]},
    ],
    "must_not": [
        {"claim": "someone goes back in to switch the generator off", "any": ["go back in", "goes back in",
                                                                              "re-enter"], "negated_ok": True},
    ],
}

WATER = {
    "messages": [
        {"role": "user", "content": "How much water per person per day should we plan for?"},
        {"role": "assistant", "content": "Plan at least 15 litres per person per day for drinking, cooking "
                                         "and hygiene."},
    ],
    "category": "wash",
    "sources": ["Sphere WASH standard 2.1"],
    "key_facts": [
        {"fact": "15 L per person per day", "any": ["15 l/person/day", "15 litres per person per day"]},
        {"fact": "covers drinking, cooking and hygiene", "regex": "drinking.*cooking.*hygiene"},
        {"fact": "a minimum to plan for", "any": ["at least", "a minimum of"]},
    ],
    "must_not": [],
}

SPACE = {
    "messages": [
        {"role": "user", "content": "Six hundred people are coming to the gym tonight."},
        {"role": "assistant", "content": "Register them at one gate."},
        {"role": "user", "content": "How much floor space per person?"},
        {"role": "assistant", "content": "Aim for 3.5 square metres of covered space per person."},
    ],
    "category": "shelter",
    "sources": ["Sphere shelter standard 3"],
    "key_facts": [
        {"fact": "3.5 m2 covered space per person", "any": ["3.5 m2", "3.5 square metres"]},
        {"fact": "covered space", "any": ["covered space", "covered area"]},
        {"fact": "aim for it", "any": ["aim for", "plan for"]},
    ],
}

GAS = {
    "messages": [
        {"role": "user", "content": "Someone smells gas in the warehouse."},
        {"role": "assistant", "content": "Evacuate upwind, no sparks or phones, and call the hazmat team."},
    ],
    "category": "hazmat",
    "sources": ["ERG 2024"],
    "key_facts": [
        {"fact": "evacuate upwind", "any": ["evacuate upwind", "move upwind"]},
        {"fact": "no ignition sources", "any": ["no sparks", "no flames", "no ignition"]},
        {"fact": "call hazmat", "any": ["hazmat"]},
    ],
    "must_not": [{"claim": "switch the lights on to look", "any": ["switch the lights on", "turn on the lights"]}],
}

FLOOD = {
    "messages": [
        {"role": "user", "content": "The road to the clinic is flooded. Can the truck drive through?"},
        {"role": "assistant", "content": "Do not drive through; 30 cm of moving water can float a vehicle. "
                                         "Wait for the engineers."},
    ],
    "category": "hazmat",
    "sources": ["NWS Turn Around Don't Drown"],
    "key_facts": [
        {"fact": "do not drive through", "any": ["do not drive through", "dont drive through"]},
        {"fact": "30 cm of moving water floats a vehicle", "any": ["30 cm"]},
        {"fact": "wait for the engineers", "any": ["wait for the engineers"]},
    ],
    "must_not": [{"claim": "it is fine to drive through", "any": ["drive through slowly"]}],
}

ITEMS = [CHLORINE, GENERATOR, WATER, SPACE, GAS, FLOOD]
TRAIN = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in [
    ("Where should the water point go?", "Uphill from the latrines, at least 30 metres away."),
    ("Who gets food first?", "Children under five, pregnant women and the sick, then everyone else."),
    ("A volunteer is exhausted.", "Send them to rest for a full shift; tired people make mistakes."),
    ("Rain is coming tonight.", "Dig drainage around the tents and lift supplies off the floor."),
]]


def write_split(folder: Path, items: list[dict] | None = None) -> Path:
    """train.jsonl, valid.jsonl and test.jsonl (the hand-written items) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", TRAIN), ("valid", TRAIN[:2]), ("test", ITEMS if items is None else items)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
