"""Answers: Harmony parsing, stop rules, context limits and adapters around the token loop."""

from __future__ import annotations

import json

import pytest
from gen_helpers import BigramModel, cycle, harmony_ids

from relief_mlx.data.harmony import (
    CALL,
    CHANNEL,
    END,
    MESSAGE,
    RETURN,
    START,
    RenderOptions,
    render_prompt,
)
from relief_mlx.errors import ReliefError
from relief_mlx.generate.engine import (
    Engine,
    GenerateConfig,
    PromptCache,
    adapter_folder,
    answer,
    complete,
    stop_ids,
)

USER = [{"role": "user", "content": "How long should I boil water?"}]


def script(tok, final="Boil it for one minute.", closer=RETURN):
    return harmony_ids(tok, CHANNEL, "analysis", MESSAGE, "Need the CDC rule.", END,
                       START, "assistant", CHANNEL, "final", MESSAGE, final, closer, START, "more")


def test_answer_keeps_the_final_channel_and_stops_on_return(scripted_engine, harmony_tokenizer):
    engine = scripted_engine(script(harmony_tokenizer))
    seen = []
    reply = answer(engine, USER, GenerateConfig(max_tokens=200), on_delta=seen.append)
    assert reply.final == "Boil it for one minute."
    assert reply.analysis == "Need the CDC rule."
    assert reply.finish_reason == "stop" and reply.tokens[-1] == RETURN
    assert "".join(d.text for d in seen if d.channel == "final") == reply.final
    assert engine.model.calls == len(reply.tokens) + 1  # exactly one token computed ahead
    prompt = render_prompt(USER, RenderOptions(reasoning_effort="medium"), harmony_tokenizer)
    assert engine.model.fed[0][:len(prompt)] == prompt
    # every token went back in, the stop token too: token n+1 is computed while n is read
    assert engine.model.fed[0][len(prompt):] == reply.tokens


def test_end_closes_a_message_but_not_the_answer(scripted_engine, harmony_tokenizer):
    engine = scripted_engine(script(harmony_tokenizer))
    reply = answer(engine, USER, GenerateConfig())
    assert END in reply.tokens and reply.tokens.index(END) < len(reply.tokens) - 1


def test_call_stops_with_finish_reason_call(scripted_engine, harmony_tokenizer):
    reply = answer(scripted_engine(script(harmony_tokenizer, closer=CALL)), USER, GenerateConfig())
    assert reply.finish_reason == "call" and reply.tokens[-1] == CALL


def test_max_tokens_cuts_the_answer_mid_message(scripted_engine, harmony_tokenizer):
    reply = answer(scripted_engine(script(harmony_tokenizer)), USER, GenerateConfig(max_tokens=3))
    assert reply.finish_reason == "length" and len(reply.tokens) == 3
    assert reply.final == "" and not reply.messages[-1].complete


def test_the_context_limits_the_answer_and_rejects_long_prompts(scripted_engine, harmony_tokenizer):
    n = len(render_prompt(USER, RenderOptions(reasoning_effort="medium"), harmony_tokenizer))
    reply = answer(scripted_engine(script(harmony_tokenizer), context_length=n + 2), USER, GenerateConfig())
    assert reply.finish_reason == "context" and len(reply.tokens) == 2
    with pytest.raises(ReliefError, match=f"the prompt is {n} tokens, the model's context is {n}"):
        answer(scripted_engine([], context_length=n), USER, GenerateConfig())


def test_reused_prompt_tokens_count_toward_the_context(scripted_engine, harmony_tokenizer):
    follow_up = [*USER, {"role": "assistant", "content": "One minute."}, {"role": "user", "content": "At altitude?"}]
    first, second = (render_prompt(m, RenderOptions(reasoning_effort="medium"), harmony_tokenizer)
                     for m in (USER, follow_up))
    engine, cache = scripted_engine([], context_length=len(second) + 2), PromptCache()
    answer(engine, USER, GenerateConfig(max_tokens=2), prompt_cache=cache)
    assert cache.prefixes == [tuple(first[:-1])]
    reply = answer(engine, follow_up, GenerateConfig(), prompt_cache=cache)
    assert reply.reused_tokens == len(first) - 1 and engine.model.fed[1][:-1] == second[len(first) - 1:]
    assert reply.finish_reason == "context" and len(reply.tokens) == 2  # the whole prompt filled the context
    assert reply.to_dict()["reused_tokens"] == len(first) - 1
    with pytest.raises(ReliefError, match=f"the prompt is {len(second)} tokens"):
        answer(scripted_engine([], context_length=len(second)), follow_up, GenerateConfig(), prompt_cache=cache)


def test_reasoning_effort_reaches_the_system_message(scripted_engine, harmony_tokenizer):
    engine = scripted_engine(script(harmony_tokenizer))
    answer(engine, USER, GenerateConfig(reasoning="high"))
    assert "Reasoning: high" in harmony_tokenizer.decode(engine.model.fed[0])


def test_logprobs_are_kept_on_request(scripted_engine, harmony_tokenizer):
    reply = complete(scripted_engine(script(harmony_tokenizer)), [1, 2, 3], GenerateConfig(logprobs=True))
    assert len(reply.logprobs) == len(reply.tokens)
    assert all(lp > -1e-3 for lp in reply.logprobs)  # one-hot logits of 30: p ~ 1


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"reasoning": "extreme"}, {"prefill_chunk": 0}])
def test_bad_settings_are_relief_errors(kwargs):
    with pytest.raises(ReliefError):
        GenerateConfig(**kwargs)


def make_adapter_files(folder, config=True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapters.safetensors").write_bytes(b"")
    if config:
        (folder / "adapter_config.json").write_text(json.dumps({"num_layers": 1}))
    return folder


def test_adapter_folder_accepts_runs_best_checkpoints_and_weight_files(tmp_path):
    run = make_adapter_files(tmp_path / "run")
    best = make_adapter_files(run / "best")
    last = make_adapter_files(run / "checkpoint", config=False)
    (run / "0000100_adapters.safetensors").write_bytes(b"")
    assert adapter_folder(run, tmp_path) == run
    assert adapter_folder(best, tmp_path) == best
    (tmp_path / "s1").mkdir()
    scratch = adapter_folder(last, tmp_path / "s1")  # weights only: the run's config joins them
    assert (scratch / "adapter_config.json").resolve() == (run / "adapter_config.json").resolve()
    assert (scratch / "adapters.safetensors").resolve() == (last / "adapters.safetensors").resolve()
    (tmp_path / "s2").mkdir()
    scratch = adapter_folder(run / "0000100_adapters.safetensors", tmp_path / "s2")
    assert (scratch / "adapters.safetensors").resolve() == (run / "0000100_adapters.safetensors").resolve()


def test_adapter_folder_errors_name_the_way_out(tmp_path):
    with pytest.raises(ReliefError, match="does not exist"):
        adapter_folder(tmp_path / "nope", tmp_path)
    make_adapter_files(tmp_path / "runs" / "a" / "best")
    with pytest.raises(ReliefError, match="try .*best"):
        adapter_folder(tmp_path / "runs" / "a", tmp_path)


def final_then_more(tok, closer=END):
    """A bigram cycle: final message "Boil it." closed by `closer`, then another message, forever."""
    return cycle(harmony_ids(tok, "assistant", CHANNEL, "final", MESSAGE, "Boil it.", closer, START))


def test_end_after_a_final_message_stops_the_answer(harmony_tokenizer):
    """Guards issue #10 item 2 on the single-sequence path."""
    engine = Engine(BigramModel(final_then_more(harmony_tokenizer)), harmony_tokenizer)
    reply = answer(engine, USER, GenerateConfig(max_tokens=50))
    assert reply.final == "Boil it." and reply.finish_reason == "stop"
    assert reply.tokens[-1] == END and reply.tokens.count(END) == 1


def test_every_eos_id_of_the_checkpoint_stops_the_answer(harmony_tokenizer, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 200002}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [200002, 199999, 200012]}))
    assert stop_ids(tmp_path) == {RETURN, 199_999, CALL}
    table = final_then_more(harmony_tokenizer, closer=199_999)
    reply = answer(Engine(BigramModel(table), harmony_tokenizer, stop_ids=stop_ids(tmp_path)), USER, GenerateConfig())
    assert reply.final == "Boil it." and reply.finish_reason == "stop" and reply.tokens[-1] == 199_999
    endless = answer(Engine(BigramModel(table), harmony_tokenizer), USER, GenerateConfig(max_tokens=30))
    assert endless.finish_reason == "length"  # the same stream without the checkpoint's eos ids


def test_engine_load_reads_the_tokenizer_without_mlx_lms_wrapper(mini_mlx, monkeypatch):
    """Guards issue #10 item 8: the wrapper (an HF tokenizer) took seconds only to be copied."""
    import mlx_lm.utils

    def refuse(*args, **kwargs):
        raise AssertionError("Engine.load built mlx-lm's tokenizer wrapper")

    monkeypatch.setattr(mlx_lm.utils, "load_tokenizer", refuse)
    engine = Engine.load(mini_mlx)
    assert engine.harmony.encode("hello world") == engine.harmony.backend.encode("hello world").ids
    assert engine.stop_ids == {RETURN, 199_999, CALL}



def test_head_length_covers_the_system_and_developer_messages(scripted_engine, harmony_tokenizer):
    engine = scripted_engine([])
    for messages in (USER, [{"role": "system", "content": "Be brief."}, *USER]):
        prompt = engine.render(messages, "low")
        head = engine.head_length(prompt)
        assert harmony_tokenizer.decode(prompt[head:]).startswith("<|start|>user<|message|>How long")
        assert harmony_tokenizer.decode(prompt[:head]).endswith(("Channel must be included for every message.<|end|>",
                                                                "Be brief.<|end|>"))
