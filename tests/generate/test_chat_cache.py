"""Prompt-cache reuse in `relief chat`: the same tokens as a fresh prefill each turn, with only
the new tokens prefilled, on the float32 mini model past its 128-token sliding window."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from gen_helpers import build_mini

from relief_mlx.data.harmony import RenderOptions, render_prompt
from relief_mlx.generate import Engine, GenerateConfig, SamplingConfig
from relief_mlx.generate import engine as engine_module
from relief_mlx.generate.chat import ChatSession, stats_text
from relief_mlx.generate.engine import PromptCache
from relief_mlx.generate.loop import feed, generate_tokens

SYSTEM = "Answer field medics in short, numbered steps, and say when a case needs a clinic."
ANSWER = "Boil the water for one minute, then let it cool in a covered pot before anyone drinks it."
QUESTIONS = [  # ~60-70 tokens each: turn 1's prompt alone is longer than the 128-token window
    "We have one well and forty people; the water looks clear but smells of mud after the rain. "
    "How long must we boil it, and can we store it in the plastic cans the army left behind?",
    "The youngest children have had diarrhoea since yesterday evening, and we are running out of "
    "the oral rehydration sachets. How do we mix a replacement from salt, sugar and clean water?",
    "A volunteer cut her hand on a rusty sheet of metal while clearing the roof of the school. "
    "What should we do now, and which signs mean she has to be taken to the clinic in town today?",
]


class CountingModel:
    """The mini model, recording the tokens of every chunked prefill pass (`model.model`)."""

    def __init__(self, model):
        self.inner = model
        self.chunks: list[list[int]] = []

    def make_cache(self):
        return self.inner.make_cache()

    def model(self, tokens: mx.array, cache=None) -> mx.array:
        self.chunks.append(tokens[0].tolist())
        return self.inner.model(tokens, cache=cache)

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:  # one prompt or generated token
        return self.inner(tokens, cache=cache)

    def taken(self) -> list[int]:
        """The tokens prefilled in chunks since the last call."""
        out, self.chunks = [t for chunk in self.chunks for t in chunk], []
        return out


@pytest.fixture(scope="module")
def mini_f32(mini_mlx_f32):
    return build_mini(mini_mlx_f32)


def sessions(model, harmony_tokenizer, **sampling):
    config = GenerateConfig(max_tokens=12, sampling=SamplingConfig(**sampling))
    engine = Engine(CountingModel(model), harmony_tokenizer)
    return ChatSession(engine, config, SYSTEM), ChatSession(engine, config, SYSTEM, reuse=False)


def turn(session: ChatSession, text: str, give_final: bool = False) -> tuple[list[int], list[int], object]:
    """Ask `text`; return the rendered prompt, the tokens prefilled in chunks and the answer. The
    mini model's random weights never write a final message: `give_final` adds one to the
    history, as `ask` does when the model writes one."""
    prompt = session.engine.render(session.messages(text), session.config.reasoning)
    session.engine.model.taken()
    reply = session.ask(text)
    if give_final:
        session.history.append({"role": "assistant", "content": ANSWER})
    return prompt, session.engine.model.taken(), reply


def test_turn_prompts_grow_by_appending(harmony_tokenizer):
    """The observation the cache rests on, with the real renderer: turn k's prompt (but its last
    token when the turn wrote no final answer) starts turn k+1's; a new reasoning effort does not."""
    def render(messages, effort="medium"):
        return render_prompt(messages, RenderOptions(reasoning_effort=effort), harmony_tokenizer)

    one = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    two = [*one, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": QUESTIONS[1]}]
    three = [*two, {"role": "user", "content": QUESTIONS[2]}]  # turn 2 wrote no final answer
    p1, p2, p3 = render(one), render(two), render(three)
    assert p2[:len(p1)] == p1 and len(p2) > len(p1)
    assert p3[:len(p2) - 1] == p2[:-1] and p3[:len(p2)] != p2  # `<|start|>` then `user`, not `assistant`
    other = render(three, "high")
    assert other[:len(p2) - 1] != p2[:-1] and other[:2] == p2[:2]  # differs inside the system message


def test_reuse_gives_the_fresh_tokens_and_prefills_only_new_ones(mini_f32, harmony_tokenizer):
    reuse, fresh = sessions(mini_f32, harmony_tokenizer)
    kept = None  # the previous turn's prompt, with reuse
    for i, question in enumerate(QUESTIONS):
        prompt, taken, reply = turn(reuse, question, give_final=i == 0)
        fresh_prompt, fresh_taken, fresh_reply = turn(fresh, question, give_final=i == 0)
        assert prompt == fresh_prompt and fresh_taken == prompt[:-1]
        assert reply.tokens == fresh_reply.tokens, f"turn {i + 1}"
        assert len(reply.tokens) == 12 and reply.finish_reason == "length"
        if kept is None:
            assert len(prompt) > 128 and reply.reused_tokens == 0 and taken == prompt[:-1]
        else:  # only the tokens after the last turn's prompt (but its last token) go through the model
            assert reply.reused_tokens == len(kept) - 1 > 128  # the restored sliding window had wrapped
            assert taken == prompt[len(kept) - 1:-1]
        assert reply.prompt_tokens == len(prompt) and fresh_reply.reused_tokens == 0
        kept = prompt
    assert f"{reply.reused_tokens} reused from the last turn" in stats_text(reply)


def test_a_new_system_message_or_reset_prefills_from_scratch(mini_f32, harmony_tokenizer):
    reuse, fresh = sessions(mini_f32, harmony_tokenizer)
    for session in (reuse, fresh):
        turn(session, QUESTIONS[0], give_final=True)
        assert session.command("/reasoning high") == "reasoning: high"
    prompt, taken, reply = turn(reuse, QUESTIONS[1])
    assert reply.reused_tokens == 0 and taken == prompt[:-1]  # the system message changed
    assert reply.tokens == turn(fresh, QUESTIONS[1])[2].tokens
    reuse.command("/reset")
    assert reuse.prompt_cache.prefixes == []
    prompt, taken, reply = turn(reuse, QUESTIONS[2])
    assert reply.reused_tokens == 0 and taken == prompt[:-1]


def test_reuse_with_a_repetition_penalty_keeps_its_look_back(mini_f32, harmony_tokenizer, monkeypatch):
    """Guards the sampler's look-back: it reads the recent tokens from the prompt generate_tokens
    receives, so that must be the prompt's last `repetition_context` (64) tokens, not the last one."""
    given = []
    real = engine_module.generate_tokens
    monkeypatch.setattr(engine_module, "generate_tokens",
                        lambda model, prompt, **kw: given.append(list(prompt)) or real(model, prompt, **kw))
    reuse, fresh = sessions(mini_f32, harmony_tokenizer, repetition_penalty=5.0)
    first, _, _ = turn(reuse, QUESTIONS[0], give_final=True)
    turn(fresh, QUESTIONS[0], give_final=True)
    prompt, taken, reply = turn(reuse, QUESTIONS[1])
    assert given[-1] == prompt[-64:]
    assert reply.tokens == turn(fresh, QUESTIONS[1])[2].tokens
    assert reply.reused_tokens == len(first) - 64 and taken == prompt[len(first) - 64:-1]


def kv(snapshot: PromptCache, model, prompt) -> list[np.ndarray]:
    """The K/V a snapshot holds: a full cache's first `offset` rows, a rotating cache's window."""
    states = [c.state for c in snapshot.restore(model, prompt)[0]]
    return [np.array(x[..., :min(state[2], x.shape[2]), :]) for state in states for x in state[:2]]


def test_the_snapshot_survives_the_generation_that_follows(mini_f32, harmony_tokenizer):
    """Caches write K/V in place; the snapshot must still hold the prompt's K/V afterwards."""
    prompt = render_prompt([{"role": "user", "content": " ".join(QUESTIONS)}], RenderOptions(), harmony_tokenizer)
    cache, snapshot = mini_f32.make_cache(), PromptCache()
    feed(mini_f32, prompt[:-3], cache, chunk=64)
    feed(mini_f32, prompt[-3:-1], cache, chunk=1)  # one-token steps: the window is now written in place
    snapshot.keep(cache, prompt[:-1])
    before = kv(snapshot, mini_f32, prompt)
    steps = list(generate_tokens(mini_f32, prompt[-1:], max_tokens=150, cache=cache))  # past the window
    assert len(steps) == 150 and cache[0].offset == len(prompt) + 149
    after = kv(snapshot, mini_f32, prompt)
    assert len(before) == 2 * len(cache) and all((a == b).all() for a, b in zip(before, after, strict=True))
    restored, reused = snapshot.restore(mini_f32, prompt)
    assert reused == len(prompt) - 1 and [c.offset for c in restored] == [len(prompt) - 1] * len(cache)
    assert snapshot.restore(mini_f32, prompt[:-2])[1] == 0  # shorter than the snapshot: nothing to reuse
