"""Trials -> the figures a bench reports: the median and the spread (min-max) of every trial."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def summarize(values: Sequence[float]) -> dict:
    """{"median", "min", "max", "trials": every value} of one measured figure."""
    if not values:
        raise ValueError("no trials to summarize")
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "trials": list(values)}


def paired_ratio(a: dict, b: dict) -> dict:
    """`a / b` trial by trial (two `summarize` results whose trials ran alternately), summarized.

    Trial i of both ran back to back, so a load that comes and goes on a shared machine
    changes both and cancels out of their ratio.
    """
    return summarize([x / y for x, y in zip(a["trials"], b["trials"], strict=True)])


def overlaps(a: dict, b: dict) -> bool:
    """True when two measurements of one figure agree within the spread they report: their
    min-max ranges overlap."""
    return a["min"] <= b["max"] and b["min"] <= a["max"]
