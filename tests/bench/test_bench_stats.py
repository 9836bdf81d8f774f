"""Medians, spreads, trial-by-trial ratios and the agreement of two runs."""

from __future__ import annotations

from relief_mlx.bench.stats import overlaps, paired_ratio, summarize


def test_summarize_keeps_every_trial():
    assert summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "trials": [3.0, 1.0, 2.0]}


def test_paired_ratio_cancels_a_load_both_runners_saw():
    # trial 2 ran on a busy machine: both halve, their ratio does not move
    ours, theirs = summarize([100.0, 50.0, 100.0]), summarize([80.0, 40.0, 80.0])
    assert paired_ratio(ours, theirs) == summarize([1.25, 1.25, 1.25])


def test_overlaps_is_range_overlap():
    assert overlaps(summarize([1.0, 2.0]), summarize([2.0, 3.0]))
    assert not overlaps(summarize([1.0, 1.5]), summarize([2.0, 3.0]))


def test_runner_order_flips_every_trial(monkeypatch):
    """What one runner leaves behind (MLX's buffer cache) must not always favour the same one."""
    from relief_mlx.bench import generation

    order = []

    def runner(name):
        def tokens(model, prompt, max_tokens, chunk):
            order.append(name)
            yield from range(max_tokens)
        return tokens

    monkeypatch.setattr(generation, "RUNNERS", {"relief": runner("relief"), "mlx-lm": runner("mlx-lm")})
    runs = generation._trials({"relief": None, "mlx-lm": None}, 4, None, 2, 8)
    assert order == ["relief", "mlx-lm", "mlx-lm", "relief"] * 2
    assert [len(v) for v in runs.values()] == [4, 4]
