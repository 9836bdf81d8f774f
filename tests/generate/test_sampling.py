"""Sampling on hand-made logits: greedy, filters, seeds, penalties, log-probabilities, validation."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from relief_mlx.errors import ReliefError
from relief_mlx.generate.sampling import Sampler, SamplingConfig, filtered, repetition_penalty

LOGITS = mx.array([[0.0, 3.0, 1.0, 2.9, -1.0, 0.5]])  # (1, V=6); token 1 is the argmax


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"top_p": 1.5}, {"top_p": 0.0},
    {"top_k": -1}, {"top_k": 2.5}, {"min_p": 1.0}, {"min_p": -0.2}, {"repetition_penalty": 0.0},
    {"repetition_context": 0}, {"seed": -3},
])
def test_invalid_values_are_relief_errors(kwargs):
    name = next(iter(kwargs)).replace("_", "-")
    with pytest.raises(ReliefError, match=name):
        SamplingConfig(**kwargs)


def test_greedy_is_argmax():
    token, logprob = Sampler(SamplingConfig(), mx.array([4]))(LOGITS)
    assert token.tolist() == [1] and logprob is None


def test_logprob_is_the_models_log_softmax_of_the_chosen_token():
    token, logprob = Sampler(SamplingConfig(temperature=5.0, seed=1), mx.array([4]), logprobs=True)(LOGITS)
    expected = np.log(np.exp(np.array(LOGITS[0])) / np.exp(np.array(LOGITS[0])).sum())[token.item()]
    assert logprob.item() == pytest.approx(expected, abs=1e-5)


def test_same_seed_same_draws_other_seed_other_draws():
    flat = mx.zeros((1, 1000))

    def draws(seed):
        sample = Sampler(SamplingConfig(temperature=1.0, seed=seed), mx.array([0]))
        return [sample(flat)[0].item() for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_k_keeps_exactly_k():
    out = filtered(LOGITS, SamplingConfig(temperature=1.0, top_k=2))
    assert np.isfinite(np.array(out[0])).nonzero()[0].tolist() == [1, 3]


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.exp(np.array(LOGITS[0])) / np.exp(np.array(LOGITS[0])).sum()  # p1=.44 p3=.40 ...
    out = filtered(LOGITS, SamplingConfig(temperature=1.0, top_p=0.5))
    assert np.isfinite(np.array(out[0])).nonzero()[0].tolist() == [1, 3]
    assert probs[1] < 0.5 < probs[1] + probs[3]
    tiny = filtered(LOGITS, SamplingConfig(temperature=1.0, top_p=0.01))
    assert np.isfinite(np.array(tiny[0])).nonzero()[0].tolist() == [1]  # the top token always stays


def test_min_p_drops_tokens_below_the_fraction_of_the_top():
    out = filtered(LOGITS, SamplingConfig(temperature=1.0, min_p=math.exp(-2.1)))  # keep >= max - 2.1
    assert np.isfinite(np.array(out[0])).nonzero()[0].tolist() == [1, 2, 3]


def test_temperature_scales_before_filters():
    out = filtered(LOGITS, SamplingConfig(temperature=0.5))
    assert np.allclose(np.array(out), np.array(LOGITS) * 2)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    out = repetition_penalty(LOGITS, mx.array([1, 4, 4]), 2.0)
    assert np.allclose(np.array(out[0]), [0.0, 1.5, 1.0, 2.9, -2.0, 0.5])


def test_repetition_penalty_changes_the_greedy_choice_and_tracks_new_tokens():
    sample = Sampler(SamplingConfig(repetition_penalty=1.5, repetition_context=2), mx.array([0]))
    assert sample(LOGITS)[0].item() == 1  # token 1 was not seen yet
    assert sample(LOGITS)[0].item() == 3  # now 1 is penalised (3.0 / 1.5 < 2.9)


def test_sampling_only_picks_kept_tokens():
    sample = Sampler(SamplingConfig(temperature=2.0, top_k=2, seed=0), mx.array([0]))
    assert {sample(LOGITS)[0].item() for _ in range(50)} == {1, 3}


def test_rows_sampled_together_penalize_their_own_tokens_and_filter_keeps_the_right_row():
    sample = Sampler(SamplingConfig(repetition_penalty=1.5, repetition_context=1), [[1], [0]])
    assert sample(mx.concatenate([LOGITS, LOGITS]))[0].tolist() == [3, 1]  # row 0 saw 1, row 1 did not
    sample.filter([1])  # row 1 (which just chose 1) stays
    assert sample(LOGITS)[0].tolist() == [3]  # row 0's history (3) would have kept 1


def test_each_row_keeps_its_own_settings_and_draws_as_if_alone():
    """Greedy, seeded and penalized rows in one batch choose what each would alone; a row that
    joins later (`extend`) keeps its key, and the batch's other rows do not change its draws."""
    logits = mx.random.normal((1, 50), key=mx.random.key(0))
    configs = [SamplingConfig(), SamplingConfig(temperature=1.0, seed=3),
               SamplingConfig(temperature=0.7, top_p=0.8, seed=4), SamplingConfig(repetition_penalty=5.0)]
    prompts = [[1], [2], [3], [int(mx.argmax(logits).item())]]

    def alone(config, prompt):
        sample = Sampler(config, mx.array(prompt))
        return [sample(logits)[0].item() for _ in range(6)]

    together = Sampler(configs[:2], prompts[:2])
    rows = [together(mx.concatenate([logits] * 2))[0].tolist() for _ in range(2)]
    together.extend(Sampler(configs[2:], prompts[2:]))  # two rows join after two steps
    rows += [together(mx.concatenate([logits] * 4))[0].tolist() for _ in range(4)]
    columns = [[step[b] for step in rows if len(step) > b] for b in range(4)]
    assert columns[:2] == [alone(c, p) for c, p in zip(configs[:2], prompts[:2], strict=True)]
    assert columns[2:] == [alone(c, p)[:4] for c, p in zip(configs[2:], prompts[2:], strict=True)]
    assert columns[0] == [columns[0][0]] * 6 and len(set(columns[1])) > 1  # greedy repeats, sampling varies
    assert columns[3][0] != prompts[3][0]  # the penalty moved the penalized row off the argmax


def test_one_setting_per_prompt():
    with pytest.raises(ReliefError, match="2 sampling settings for 3 prompts"):
        Sampler([SamplingConfig()] * 2, [[1], [2], [3]])
