"""Request validation and OpenAI <-> Harmony mapping, without a model: each bad field is a 400
naming it, incoming assistant turns render as `relief chat` renders them, stop strings."""

from __future__ import annotations

import pytest

from relief_mlx.data.harmony import RenderOptions, render_prompt
from relief_mlx.serve.protocol import ApiError, Job, StopText, check_room, final_text, parse_chat, parse_responses

USER = {"role": "user", "content": "Where is the nearest shelter?"}


@pytest.fixture
def harmony(harmony_tokenizer):
    return lambda text: final_text(text, harmony_tokenizer.encode, harmony_tokenizer.decode)


def chat(harmony, **fields):
    return parse_chat({"model": "m", "messages": [USER]} | fields, harmony)


def test_a_valid_request_becomes_a_job(harmony):
    job = chat(harmony, reasoning_effort="high", max_completion_tokens=50, temperature=0, top_p=0.5, seed=3,
               stop="END", logprobs=True, stream=True, stream_options={"include_usage": True})
    assert (job.reasoning, job.max_tokens, job.max_tokens_field, job.stop) == ("high", 50, "max_completion_tokens",
                                                                                ("END",))
    assert (job.sampling.temperature, job.sampling.top_p, job.sampling.seed) == (0.0, 0.5, 3)
    assert job.logprobs and job.stream and job.include_usage
    defaults = chat(harmony)
    assert (defaults.reasoning, defaults.max_tokens, defaults.sampling.temperature, defaults.stop) == \
        ("medium", None, 1.0, ())  # OpenAI's default temperature is 1


@pytest.mark.parametrize(("fields", "param"), [
    ({"max_tokens": -5}, "max_tokens"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"), ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"seed": -1}, "seed"), ({"reasoning_effort": "extreme"}, "reasoning_effort"), ({"n": 2}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stream": "yes"}, "stream"), ({"model": ""}, "model"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
    ({"messages": [USER, {"role": "system", "content": "late"}]}, "messages"),
    ({"tools": [{"type": "function"}]}, "tools"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"top_logprobs": 3}, "top_logprobs"),
])
def test_each_bad_field_is_a_400_that_names_it(harmony, fields, param):
    with pytest.raises(ApiError) as e:
        chat(harmony, **fields)
    assert e.value.status == 400 and e.value.param == param and e.value.message.startswith(param)
    assert e.value.body()["error"]["param"] == param and e.value.body()["error"]["type"] == "invalid_request_error"


def test_earlier_assistant_turns_keep_their_final_text_only(harmony, harmony_tokenizer):
    """Raw Harmony text (what mlx-lm's server returns as content) and reasoning_content render as
    the final answer alone, exactly like `relief chat`'s history."""
    raw = ("<|channel|>analysis<|message|>The user asks about shelters.<|end|><|start|>assistant"
           "<|channel|>final<|message|>The school on Main Street.<|return|>")
    job = chat(harmony, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Cite sources."}, USER,
        {"role": "assistant", "content": raw},
        {"role": "user", "content": "Is it open?"},
        {"role": "assistant", "content": "Yes, all night.", "reasoning_content": "Check the hours."},
        {"role": "assistant", "content": "<|channel|>analysis<|message|>unfinished"},  # no final: dropped
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}, {"type": "text", "text": "!"}]}])
    clean = [{"role": "system", "content": "Be brief.\n\nCite sources."}, USER,
             {"role": "assistant", "content": "The school on Main Street."}, {"role": "user", "content": "Is it open?"},
             {"role": "assistant", "content": "Yes, all night."}, {"role": "user", "content": "Thanks!"}]
    assert job.messages == clean
    prompt = harmony_tokenizer.decode(render_prompt(job.messages, RenderOptions(), harmony_tokenizer))
    assert "shelters" not in prompt and "Check the hours" not in prompt and "unfinished" not in prompt
    assert prompt.count("<|channel|>final<|message|>") == 2


def test_responses_input_instructions_and_effort(harmony):
    job = parse_responses({"model": "m", "input": "Hi", "instructions": "Be brief.", "reasoning": {"effort": "low"},
                           "max_output_tokens": 20, "temperature": 0}, harmony)
    assert job.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (job.reasoning, job.max_tokens, job.max_tokens_field) == ("low", 20, "max_output_tokens")
    listed = parse_responses({"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Q"}]},
        {"type": "reasoning", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "A"}]},
        {"role": "user", "content": "Q2"}]}, harmony)
    assert [m["content"] for m in listed.messages] == ["Q", "A", "Q2"]
    for body, param in [({"input": ""}, "input"), ({"input": [{"type": "function_call"}]}, "input[0].type"),
                        ({"input": "x", "previous_response_id": "r"}, "previous_response_id"),
                        ({"input": "x", "reasoning": {"effort": "max"}}, "reasoning.effort")]:
        with pytest.raises(ApiError) as e:
            parse_responses({"model": "m"} | body, harmony)
        assert e.value.param == param


def test_stop_strings_hold_back_what_could_start_one():
    stop = StopText(["STOP", "##"])
    out = [stop.feed(t) for t in ["Boil wa", "ter. S", "T", "ay #", "x", " then ST", "OP and more"]]
    assert out == ["Boil wa", "ter. ", "", "STay ", "#x", " then ", ""]
    assert stop.stopped and stop.feed("more") == "" and stop.finish() == ""
    tail = StopText(["STOP"])
    assert tail.feed("end ST") == "end " and tail.finish() == "ST"  # no stop came: the held text is sent


def test_context_errors_say_the_numbers():
    job = Job(model="m", messages=[USER], max_tokens=100)
    assert check_room(50, job, context=200, limit=1000) == 100
    assert check_room(50, Job(model="m", messages=[USER]), context=200, limit=1000) == 150  # no max: what fits
    with pytest.raises(ApiError) as e:
        check_room(150, job, context=200, limit=1000)
    assert e.value.code == "context_length_exceeded" and "maximum context length is 200 tokens" in e.value.message
    assert "you requested 250 tokens (150 in the messages, 100 in the completion)" in e.value.message
    with pytest.raises(ApiError, match="more than this server allows") as e:
        check_room(10, Job(model="m", messages=[USER], max_tokens=2000), context=4096, limit=1000)
    assert e.value.param == "max_tokens"
