"""The token loop against mlx-lm and against a full-sequence forward pass, on the mini model."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
from gen_helpers import write_random_adapter
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate

from relief_mlx.errors import ReliefError
from relief_mlx.generate.loop import decode, generate_tokens, prefill
from relief_mlx.model.lora import apply_adapter

PROMPT_LEN, NEW_TOKENS = 200, 300  # the prompt alone is longer than the 128-token window


def random_prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 199_998, n).tolist()


def mlx_lm_greedy(model, tokenizer, prompt: list[int], n: int) -> list[int]:
    never_stop = copy.copy(tokenizer)
    never_stop._eos_token_ids = set()  # compare the full n tokens even if <|return|> comes up
    return [r.token for r in stream_generate(model, never_stop, prompt, max_tokens=n)]


def ours_greedy(model, prompt: list[int], n: int) -> list[int]:
    return [s.token for s in generate_tokens(model, prompt, max_tokens=n)]


@pytest.mark.slow
def test_greedy_equals_mlx_lm_stream_generate(mini_loaded):
    model, tokenizer = mini_loaded
    prompt = random_prompt(PROMPT_LEN)
    ours = ours_greedy(model, prompt, NEW_TOKENS)
    assert len(ours) == NEW_TOKENS
    assert ours == mlx_lm_greedy(model, tokenizer, prompt, NEW_TOKENS)


@pytest.mark.slow
def test_greedy_equals_mlx_lm_with_a_random_adapter(mini_mlx, mini_loaded, fresh_mini, tmp_path):
    _, tokenizer = mini_loaded
    base = {k: np.array(v) for k, v in tree_flatten(fresh_mini.parameters())}
    adapter = write_random_adapter(mini_mlx, tmp_path / "adapter", keys=(
        "self_attn.q_proj", "self_attn.v_proj", "mlp.router", "mlp.experts.up_proj"))
    apply_adapter(fresh_mini, adapter)
    after = dict(tree_flatten(fresh_mini.parameters()))
    # the base weights are untouched: each one is still there, under its LoRA wrapper
    for name, value in base.items():
        wrapped = name.replace("q_proj.", "q_proj.linear.").replace("v_proj.", "v_proj.linear.") \
            .replace("router.", "router.linear.").replace("up_proj.", "up_proj.linear.")
        assert np.array_equal(np.array(after[wrapped]), value), name
    prompt = random_prompt(PROMPT_LEN, seed=1)
    ours = ours_greedy(fresh_mini, prompt, NEW_TOKENS)
    assert ours == mlx_lm_greedy(fresh_mini, tokenizer, prompt, NEW_TOKENS)
    base_model, _ = mini_loaded
    assert ours[:20] != ours_greedy(base_model, prompt, 20)  # the adapter does change the answer


def test_incremental_decoding_equals_full_forward_across_the_window(mini_loaded):
    """Logits at every position from prefill + one-token steps equal one full-sequence pass.

    Tolerance: 1e-4 absolute on logits of magnitude ~5 (float32; the measured gap is ~1e-5).
    """
    model, _ = mini_loaded
    ids = mx.array(random_prompt(272, seed=2), dtype=mx.int32)
    start = 96  # prefill 96 tokens in chunks of 40, then decode across 128 (window) and 256 (cache step)
    cache = model.make_cache()
    rows = [prefill(model, ids[None, :start], cache, chunk=40)[0]]
    rows += [decode(model, ids[t:t + 1], cache)[0] for t in range(start, ids.size)]  # (1,) rows
    incremental = np.array(mx.stack(rows))  # (positions, V) for positions start-1 .. end-1
    hidden = model.model(ids[None])[0, start - 1:]  # full pass, no cache: masks instead
    # lm_head of the full pass in numpy (fast BLAS); the model's own lm_head runs in `rows`
    full = np.array(hidden) @ np.array(model.lm_head.weight).T
    assert incremental.shape == full.shape
    assert np.abs(incremental - full).max() < 1e-4
    assert (incremental.argmax(-1) == full.argmax(-1)).all()


def test_prefill_chunk_size_does_not_change_the_answer(mini_loaded):
    model, _ = mini_loaded
    prompt = random_prompt(300, seed=3)
    one = np.array(prefill(model, mx.array([prompt]), model.make_cache(), chunk=512))
    many = np.array(prefill(model, mx.array([prompt]), model.make_cache(), chunk=70))
    assert np.abs(one - many).max() < 1e-4


def test_steps_carry_counts_timings_and_logprobs(mini_loaded):
    model, _ = mini_loaded
    steps = list(generate_tokens(model, random_prompt(20), max_tokens=4, logprobs=True))
    assert [s.n for s in steps] == [1, 2, 3, 4]
    assert all(s.prompt_tokens == 20 and s.prefill_s > 0 for s in steps)
    assert steps[0].decode_s == 0 and steps[-1].decode_s > 0 and steps[-1].decode_tps > 0
    assert all(s.logprob is not None and s.logprob <= 0 for s in steps)
    greedy = [s.token for s in generate_tokens(model, random_prompt(20), max_tokens=4)]
    assert greedy == [s.token for s in steps]  # asking for log-probabilities changes nothing


def test_seeded_sampling_reproduces(mini_loaded):
    from relief_mlx.generate.sampling import SamplingConfig

    model, _ = mini_loaded
    config = SamplingConfig(temperature=1.0, top_p=0.9, seed=5)
    first = [s.token for s in generate_tokens(model, [1, 2, 3], max_tokens=5, sampling=config)]
    again = [s.token for s in generate_tokens(model, [1, 2, 3], max_tokens=5, sampling=config)]
    assert first == again


def test_empty_prompt_is_a_relief_error(mini_loaded):
    model, _ = mini_loaded
    with pytest.raises(ReliefError, match="no tokens"):
        next(generate_tokens(model, [], max_tokens=3))


def test_feed_returns_each_prefill_chunk_to_the_os(mini_loaded, monkeypatch):
    """As mlx-lm's prefill: the buffer cache is cleared after every chunk, so on a Mac the chunks'
    activations do not stay cached beside the model."""
    from relief_mlx.generate.loop import feed

    cleared = []
    monkeypatch.setattr(mx, "clear_cache", lambda: cleared.append(1))
    model = mini_loaded[0]
    feed(model, random_prompt(70), model.make_cache(), chunk=32)
    assert len(cleared) == 3  # 32 + 32 + 6 tokens
