"""`batch.answer_prompts` (what `relief eval` answers with): rendered prompts in memory, decoded
`batch_size` together, each answer the one a prompt gets alone."""

from __future__ import annotations

import dataclasses

import pytest

from relief_mlx.errors import ReliefError
from relief_mlx.generate import Engine, GenerateConfig
from relief_mlx.generate.batch import answer_prompts
from relief_mlx.generate.engine import complete

QUESTIONS = ["Where should the water point go?", "How much water per person per day, and why that much?", "Hi"]


@pytest.fixture(scope="module")
def engine(mini_mlx_f32):
    import relief_mlx

    return Engine.wrap(*relief_mlx.load(mini_mlx_f32))


def test_answers_in_batches_are_the_answers_alone_in_order(engine):
    config = GenerateConfig(max_tokens=12)
    prompts = [engine.render([{"role": "user", "content": q}], "low") for q in QUESTIONS]
    answers = list(answer_prompts(engine, prompts, config, batch_size=2))
    assert [index for index, _ in answers] == [0, 1, 2]
    for (_, batched), prompt in zip(answers, prompts, strict=True):
        alone = complete(engine, prompt, config)
        assert batched.tokens == alone.tokens and batched.prompt_tokens == len(prompt)
        assert batched.finish_reason == alone.finish_reason == "length"


def test_a_prompt_longer_than_the_context_raises(engine):
    prompts = [engine.render([{"role": "user", "content": q}], "low") for q in QUESTIONS]
    short = dataclasses.replace(engine, context_length=len(prompts[1]))
    with pytest.raises(ReliefError, match=f"the prompt is {len(prompts[1])} tokens"):
        list(answer_prompts(short, prompts, GenerateConfig(max_tokens=2), batch_size=2))
