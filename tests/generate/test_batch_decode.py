"""Batched decoding against one prompt at a time, on the float32 mini model: `generate_batch`
against `generate_tokens`, and `answer_file` in batches against `answer_file` one by one."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from relief_mlx.errors import ReliefError
from relief_mlx.generate import Engine, GenerateConfig, SamplingConfig
from relief_mlx.generate.batch import answer_file, request_messages
from relief_mlx.generate.loop import generate_batch, generate_tokens

# 200 is longer than the 128-token window; 3 + 160 and 40 + 150 decode across it
PROMPT_LENGTHS, LIMITS, CHUNK = (3, 40, 200, 90), (160, 150, 60, 160), 64
STOP_AT = 100  # row 3's token at this step is the stop token, so row 3 ends early
# A row's float32 matmuls run with B rows instead of one, and BLAS sums them in another order
# (a 128-wide projection differs by ~1e-5 between 1 and 4 rows; a batch of one is bit-exact):
# log-probabilities differ by up to ~1e-5 (measured 8e-6); greedy tokens stay the same.
LOGPROB_TOLERANCE = 1e-4


class RowCounter:
    """The model, recording the rows of every one-token forward pass (prefill chunks pass by)."""

    def __init__(self, model):
        self.inner, self.model, self.rows = model, model.model, []

    def make_cache(self) -> list:
        return self.inner.make_cache()

    def __call__(self, tokens, cache=None):
        self.rows.append(tokens.shape[0])
        return self.inner(tokens, cache=cache)


@pytest.fixture(scope="module")
def f32(mini_mlx_f32):
    import relief_mlx

    return relief_mlx.load(mini_mlx_f32)


@pytest.fixture(scope="module")
def engine(f32):
    return Engine.wrap(*f32)


@pytest.fixture(scope="module")
def decoded(f32):
    """(steps of each prompt alone, steps of each row decoded together, the stop token, rows per pass)."""
    model, _ = f32
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 199_998, n).tolist() for n in PROMPT_LENGTHS]
    alone = [list(generate_tokens(model, p, max_tokens=n, logprobs=True, prefill_chunk=CHUNK))
             for p, n in zip(prompts, LIMITS, strict=True)]
    stop = alone[3][STOP_AT].token
    counter = RowCounter(model)
    together = [[] for _ in prompts]
    for steps in generate_batch(counter, prompts, max_tokens=LIMITS, stop_tokens={stop}, logprobs=True,
                                prefill_chunk=CHUNK):
        for row, step in steps.items():
            together[row].append(step)
    return alone, together, stop, counter.rows


def until_stop(steps, stop):
    """`steps` up to and with the first `stop` token."""
    ends = [i for i, s in enumerate(steps) if s.token == stop]
    return steps[:ends[0] + 1] if ends else steps


@pytest.mark.slow
def test_greedy_batch_gives_each_prompt_its_tokens_alone(decoded):
    alone, together, stop, rows = decoded
    expected = [[s.token for s in until_stop(steps, stop)] for steps in alone]
    assert [[s.token for s in steps] for steps in together] == expected
    lengths = [len(e) for e in expected]
    assert lengths[3] <= STOP_AT + 1 and lengths[:3] == [160, 150, 60]  # rows end at four different steps
    assert [s.n for s in together[1]] == list(range(1, 151))
    # finished rows leave the batch: passes only shrink, and no row runs more than one step past its end
    assert rows[0] == 4 and rows == sorted(rows, reverse=True) and rows[-1] == 1
    assert sum(rows) <= sum(lengths) + len(lengths)


@pytest.mark.slow
def test_batch_logprobs_match_each_prompt_alone(decoded):
    alone, together, stop, _ = decoded
    for single, batched in zip(alone, together, strict=True):
        single = until_stop(single, stop)
        gap = np.abs(np.array([s.logprob for s in single]) - np.array([s.logprob for s in batched]))
        assert len(gap) == len(batched) and gap.max() < LOGPROB_TOLERANCE


def test_repetition_penalty_looks_at_each_rows_own_tokens(f32):
    """Greedy with a penalty below 1, which favours seen tokens, so the choices come from each
    row's own recent tokens (the 5-token row is shorter than the penalty's context)."""
    model, _ = f32
    rng = np.random.default_rng(3)
    prompts, limits = [rng.integers(0, 199_998, n).tolist() for n in (5, 30, 80)], [12, 20, 8]
    sampling = SamplingConfig(repetition_penalty=0.2, repetition_context=16)
    alone = [[s.token for s in generate_tokens(model, p, max_tokens=n, sampling=sampling)]
             for p, n in zip(prompts, limits, strict=True)]
    together = [[] for _ in prompts]
    for steps in generate_batch(model, prompts, max_tokens=limits, sampling=sampling):
        for row, step in steps.items():
            together[row].append(step.token)
    assert together == alone
    assert all(tokens[0] in p[-16:] for tokens, p in zip(alone, prompts, strict=True))  # the penalty decided


def test_generate_batch_rejects_an_empty_prompt(f32):
    with pytest.raises(ReliefError, match="at least one token"):
        next(generate_batch(f32[0], [[1, 2], []], max_tokens=3))


PROMPTS = ['{"prompt": "hello there", "id": 1}',
           '{"prompt": "What is the capital of France? Say why, in detail, and name two rivers."}',
           '{"prompt": ',  # bad JSON in the middle
           '',
           '{"messages": [{"role": "user", "content": "hi"}], "id": "x"}',
           '{"prompt": "' + "word " * 300 + '"}',  # longer than the context
           '{"prompt": "ok", "system": "be brief"}',
           '{"prompt": "last one"}']


def answer_twice(engine, tmp_path, config, batch_sizes=(1, 4)):
    """The records and on_answer calls of answering PROMPTS with each batch size."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    runs = []
    for size in batch_sizes:
        calls = []
        out = tmp_path / f"out-{size}.jsonl"
        answer_file(engine, prompts, out, config, batch_size=size,
                    on_answer=lambda line, answer, error, calls=calls: calls.append((line, error is None)))
        runs.append(([json.loads(x) for x in out.read_text().splitlines()], calls))
    return runs


@pytest.mark.slow
def test_answer_file_in_batches_equals_one_at_a_time(engine, tmp_path):
    config = GenerateConfig(max_tokens=40, logprobs=True)
    longest = len(engine.render(request_messages(PROMPTS[1])[0], config.reasoning))
    short = dataclasses.replace(engine, context_length=longest + 25)  # lines 2 and 7 run out of context
    (one, one_calls), (four, four_calls) = answer_twice(short, tmp_path, config)
    assert one_calls == four_calls == [(1, True), (2, True), (3, False), (5, True), (6, False), (7, True),
                                       (8, True)]
    assert [r["line"] for r in four] == [1, 2, 3, 5, 6, 7, 8]
    assert four[2]["error"].startswith("not valid JSON") and "context is" in four[4]["error"]
    assert [r.get("finish_reason") for r in four] == ["length", "context", None, "length", None, "context", "length"]
    assert four[1]["generated_tokens"] == 25
    for a, b in zip(one, four, strict=True):
        for record in (a, b):
            record.pop("prefill_tps", None), record.pop("decode_tps", None)
        assert np.allclose(a.pop("logprobs", []), b.pop("logprobs", []), atol=LOGPROB_TOLERANCE)
        assert a == b


def test_routing_stats_answer_one_at_a_time(engine, tmp_path):
    ((records, _),) = answer_twice(engine, tmp_path, GenerateConfig(max_tokens=2, moe_stats=True), (4,))
    assert all("routing" in r for r in records if "error" not in r)  # the batched path has no probe


@pytest.mark.parametrize("size", [0, -2, 1.5])
def test_a_bad_batch_size_is_a_relief_error(engine, tmp_path, size):
    with pytest.raises(ReliefError, match="batch-size"):
        answer_file(engine, tmp_path / "p.jsonl", tmp_path / "o.jsonl", GenerateConfig(), batch_size=size)
