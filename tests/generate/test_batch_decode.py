"""Batched decoding against one prompt at a time, on the float32 mini model: `generate_batch` and
`BatchDecoder` with rows joining and leaving against `generate_tokens`, and `answer_file` in
batches against `answer_file` one by one."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from gen_helpers import BigramModel, cycle, harmony_ids

from relief_mlx.data.harmony import CHANNEL, END, MESSAGE, START
from relief_mlx.errors import ReliefError
from relief_mlx.generate import Engine, GenerateConfig, SamplingConfig
from relief_mlx.generate.batch import answer_file, request_messages
from relief_mlx.generate.loop import BatchDecoder, PromptCache, feed, generate_batch, generate_tokens

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


# Continuous batching: (prompt length, max tokens, step at which the row is added, step after which
# the caller removes it). Row 3 joins once rows 0-2 are past the 128-token window (its own prompt
# is longer than the window and is fed in 64-token chunks over four steps); row 2 leaves early (a
# client gone); row 4 joins a batch that all others have left.
JOINS = [(3, 160, 0, None), (150, 60, 0, None), (40, 100, 20, 30), (200, 50, 140, None), (2, 10, None, None)]


@pytest.mark.slow
def test_rows_that_join_and_leave_get_their_tokens_alone(f32):
    model, _ = f32
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 199_998, n).tolist() for n, *_ in JOINS]
    counter = RowCounter(model)
    decoder = BatchDecoder(counter, prefill_chunk=CHUNK)
    rows, got, step = {}, [[] for _ in JOINS], 0
    while len(rows) < len(JOINS) or len(decoder):
        for i, (_, limit, at, _) in enumerate(JOINS):
            if i not in rows and (at == step or (at is None and rows and not len(decoder))):
                rows[i] = decoder.add(prompts[i], max_tokens=limit)
        by_id = {rid: i for i, rid in rows.items()}
        for rid, s in decoder.step().items():
            got[by_id[rid]].append(s.token)
            if len(got[by_id[rid]]) == JOINS[by_id[rid]][3]:
                decoder.remove(rid)
        step += 1
    alone = [[s.token for s in generate_tokens(model, p, max_tokens=n, prefill_chunk=CHUNK)]
             for p, (_, n, _, _) in zip(prompts, JOINS, strict=True)]
    assert got == [a[:stop] if stop else a for a, (*_, stop) in zip(alone, JOINS, strict=True)]
    assert max(counter.rows) == 3 and counter.rows[-10:] == [1] * 10  # rows 0-2 together; row 4 alone
    assert sum(counter.rows) <= sum(map(len, got)) + len(JOINS)  # a finished row costs one step at most


def test_the_decoder_restores_prompt_cache_snapshots(f32):
    model, _ = f32
    rng = np.random.default_rng(6)
    first = rng.integers(0, 199_998, 40).tolist()
    second = first + rng.integers(0, 199_998, 30).tolist()  # a follow-up: the first prompt, then more
    cache = PromptCache(capacity=4)
    decoder = BatchDecoder(model, prefill_chunk=CHUNK)
    decoder.add(first, max_tokens=3, prompt_cache=cache, snapshots=[10])
    steps = []
    while len(decoder):
        steps += decoder.step().values()
    assert cache.prefixes == [tuple(first[:10]), tuple(first[:-1])]
    decoder.add(second, max_tokens=5, prompt_cache=cache)
    again = []
    while len(decoder):
        again += decoder.step().values()
    assert [s.reused_tokens for s in again] == [39] * 5 and steps[0].reused_tokens == 0
    assert [s.token for s in again] == [s.token for s in generate_tokens(model, second, max_tokens=5)]
    assert cache.prefixes[-1] == tuple(second[:-1])


def test_a_prompt_cache_keeps_the_most_recently_used_snapshots(f32):
    model, _ = f32
    cache = PromptCache(capacity=2)
    for tokens in ([1, 2], [1, 2, 3, 4], [7, 8]):
        caches = model.make_cache()
        feed(model, tokens, caches, CHUNK)
        cache.keep(caches, tokens)
    assert cache.prefixes == [(1, 2, 3, 4), (7, 8)]  # [1, 2] was the least recently used
    assert cache.restore(model, [1, 2, 3, 4, 5])[1] == 4 and cache.restore(model, [1, 2, 9])[1] == 0
    assert cache.prefixes == [(7, 8), (1, 2, 3, 4)]  # the restored one is the most recent now
    with pytest.raises(ReliefError, match="prompt cache size"):
        PromptCache(capacity=0)


def test_the_batch_path_stops_after_a_final_messages_end(harmony_tokenizer, tmp_path):
    """Guards issue #10 item 2 on the batched path (`relief generate --prompts`)."""
    table = cycle(harmony_ids(harmony_tokenizer, "assistant", CHANNEL, "final", MESSAGE, "Boil it.", END, START))
    engine = Engine(BigramModel(table), harmony_tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(3)))
    answer_file(engine, prompts, tmp_path / "out.jsonl", GenerateConfig(max_tokens=50), batch_size=2)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    n = len(harmony_ids(harmony_tokenizer, CHANNEL, "final", MESSAGE, "Boil it.", END))  # to the <|end|>
    assert [(r["answer"], r["finish_reason"], r["generated_tokens"]) for r in records] == [("Boil it.", "stop", n)] * 3


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
