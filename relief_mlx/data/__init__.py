"""Harmony rendering and datasets: `harmony` (render, mask, parse), `dataset` (read, validate,
tokenize, batch), `check` (the `relief data check` / `show` reports)."""
