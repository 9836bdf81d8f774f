"""Harmony rendering equals openai-harmony token for token; masks select what they claim."""

from __future__ import annotations

import numpy as np
import pytest

from relief_mlx.data import harmony as hm
from relief_mlx.errors import ReliefError

DATE = "2025-08-05"

SINGLE = [
    {"role": "user", "content": "How many litres of water per person per day?"},
    {"role": "assistant", "content": "Sphere 2011 uses 15 L as an indicator."},
]
THINKING = [
    {"role": "user", "content": "Is a generator OK in an open garage?"},
    {"role": "assistant", "content": "No. Never run it indoors.", "thinking": "CO risk."},
]
MULTI = [
    {"role": "system", "content": "You advise shelter managers.\nBe concise."},
    {"role": "user", "content": "Floor space per person?"},
    {"role": "assistant", "content": "20 sq ft for a short stay.", "thinking": "ARC 4496."},
    {"role": "user", "content": "And long stays?"},
    {"role": "user", "content": "Post-impact, I mean."},
    {"role": "assistant", "content": "40 sq ft per person.", "thinking": "Doubling."},
]


THREE_TURNS = [
    {"role": "user", "content": "Water per person?"},
    {"role": "assistant", "content": "15 L a day.", "thinking": "Sphere."},
    {"role": "user", "content": "Latrines?"},
    {"role": "assistant", "content": "One per 20 people.", "thinking": "Sphere again."},
    {"role": "user", "content": "Distance?"},
    {"role": "assistant", "content": "30 m from water.", "thinking": "Contamination."},
]


def _reference(harmony, messages, effort="medium", for_training=True, every_analysis=False):
    """openai-harmony's conversation for `messages`: the analysis (`thinking`) of the last message
    only, as relief renders it, or with `every_analysis` of every message, as the data holds it."""
    h = harmony
    system = (
        h.SystemContent.new()
        .with_conversation_start_date(DATE)
        .with_reasoning_effort(h.ReasoningEffort(effort.capitalize()))
    )
    out = [h.Message.from_role_and_content(h.Role.SYSTEM, system)]
    for i, m in enumerate(messages):
        if m["role"] == "system":
            content = h.DeveloperContent.new().with_instructions(m["content"])
            out.append(h.Message.from_role_and_content(h.Role.DEVELOPER, content))
        elif m["role"] == "user":
            out.append(h.Message.from_role_and_content(h.Role.USER, m["content"]))
        else:
            if m.get("thinking") and for_training and (every_analysis or i == len(messages) - 1):
                msg = h.Message.from_role_and_content(h.Role.ASSISTANT, m["thinking"])
                out.append(msg.with_channel("analysis"))
            msg = h.Message.from_role_and_content(h.Role.ASSISTANT, m["content"])
            out.append(msg.with_channel("final"))
    return h.Conversation.from_messages(out)


def _keep_all(harmony):
    return harmony.RenderConversationConfig(auto_drop_analysis=False)


@pytest.fixture(scope="module")
def harmony():
    return pytest.importorskip("openai_harmony")


@pytest.mark.parametrize("messages", [SINGLE, THINKING, MULTI, THREE_TURNS],
                         ids=["single", "thinking", "multi", "three-turns"])
@pytest.mark.parametrize("effort", ["low", "high"])
def test_training_render_equals_openai_harmony_given_analysis_on_the_last_turn_only(
    messages, effort, harmony, harmony_encoding, harmony_tokenizer
):
    """Given the analysis of the last message only (relief's rule), openai-harmony renders what
    relief renders, token for token, when it is not told to drop analysis itself."""
    options = hm.RenderOptions(reasoning_effort=effort, current_date=DATE)
    ids, mask = hm.render_training(messages, options, tokenizer=harmony_tokenizer)
    conv = _reference(harmony, messages, effort)
    assert ids == harmony_encoding.render_conversation_for_training(conv, _keep_all(harmony))
    assert mask.shape == (len(ids),) and mask.dtype == bool


def test_three_turns_of_analysis_differ_from_openai_harmony_default_by_design(
    harmony, harmony_encoding, harmony_tokenizer
):
    """openai-harmony 0.0.8's default auto_drop_analysis drops analysis only before the first final
    message, so from three assistant turns on it keeps a middle turn's (and of a single turn it
    drops the very analysis to train); relief keeps the last turn's only (earlier chain-of-thought
    is dropped, as in gpt-oss's chat template)."""
    options = hm.RenderOptions(current_date=DATE)
    ids, _ = hm.render_training(THREE_TURNS, options, tokenizer=harmony_tokenizer)
    theirs = harmony_encoding.render_conversation_for_training(
        _reference(harmony, THREE_TURNS, every_analysis=True))
    ours_text, theirs_text = harmony_tokenizer.decode(ids), harmony_tokenizer.decode(theirs)
    assert "Sphere." not in ours_text and "Sphere." not in theirs_text  # turn 1: both drop it
    assert "Sphere again." not in ours_text and "Sphere again." in theirs_text  # turn 2: only relief drops it
    assert "Contamination." in ours_text and "Contamination." in theirs_text  # the trained turn keeps it
    assert theirs_text.replace("<|start|>assistant<|channel|>analysis<|message|>Sphere again.<|end|>", "") == ours_text
    single = harmony_encoding.render_conversation_for_training(_reference(harmony, THINKING, every_analysis=True))
    assert "CO risk." not in harmony_tokenizer.decode(single)  # its default drops a single turn's analysis
    assert "CO risk." in harmony_tokenizer.decode(hm.render_training(THINKING, options, tokenizer=harmony_tokenizer)[0])


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_prompt_render_equals_openai_harmony(
    messages, harmony, harmony_encoding, harmony_tokenizer
):
    options = hm.RenderOptions(current_date=DATE)
    history = [*messages, {"role": "user", "content": "Thanks. Say <|end|> literally?"}]
    ids = hm.render_prompt(history, options, harmony_tokenizer)
    conv = _reference(harmony, history, for_training=False)
    role = harmony.Role.ASSISTANT
    assert ids == harmony_encoding.render_conversation_for_completion(
        conv, role, _keep_all(harmony)
    )
    assert harmony_tokenizer.decode(ids[-2:]) == "<|start|>assistant"


def test_default_system_message_equals_system_content_new(
    harmony, harmony_encoding, harmony_tokenizer
):
    sys_msg = harmony.Message.from_role_and_content(
        harmony.Role.SYSTEM, harmony.SystemContent.new().with_conversation_start_date(DATE)
    )
    text = hm.system_text(hm.RenderOptions(current_date=DATE))
    assert text.count("\n\n") == 2  # blank lines before Reasoning and the channels line
    ids = [hm.START, *harmony_tokenizer.encode("system"), hm.MESSAGE]
    ids += [*harmony_tokenizer.encode(text), hm.END]
    assert ids == harmony_encoding.render(sys_msg)


def _trained_text(tok, ids, mask) -> str:
    return tok.decode([t for t, m in zip(ids, mask, strict=True) if m])


@pytest.mark.parametrize(
    ("mode", "want"),
    [
        ("final", "20 sq ft for a short stay.<|end|>40 sq ft per person.<|return|>"),
        ("last", "40 sq ft per person.<|return|>"),
        (
            "final+analysis",
            "20 sq ft for a short stay.<|end|>Doubling.<|end|>40 sq ft per person.<|return|>",
        ),
    ],
)
def test_mask_modes_train_what_they_say(mode, want, harmony_tokenizer):
    options = hm.RenderOptions(current_date=DATE)
    ids, mask = hm.render_training(MULTI, options, mode, harmony_tokenizer)
    assert _trained_text(harmony_tokenizer, ids, mask) == want


def test_mask_all_trains_every_token(harmony_tokenizer):
    ids, mask = hm.render_training(
        MULTI, hm.RenderOptions(current_date=DATE), "all", harmony_tokenizer
    )
    assert mask.all() and mask.sum() == len(ids)


def test_assistant_header_is_not_trained(harmony_tokenizer):
    ids, mask = hm.render_training(
        SINGLE, hm.RenderOptions(current_date=DATE), "final", harmony_tokenizer
    )
    first = int(np.argmax(mask))
    assert ids[first - 1] == hm.MESSAGE  # content starts right after <|message|>
    header = harmony_tokenizer.decode(ids[first - 5 : first])
    assert header == "<|start|>assistant<|channel|>final<|message|>"
    assert not mask[:first].any() and ids[-1] == hm.RETURN and mask[-1]


def test_last_message_keeps_its_analysis_and_earlier_turns_lose_theirs(harmony_tokenizer):
    ids, _ = hm.render_training(
        MULTI, hm.RenderOptions(current_date=DATE), "final", harmony_tokenizer
    )
    text = harmony_tokenizer.decode(ids)
    assert "Doubling." in text and "ARC 4496." not in text
    prompt = hm.render_prompt(MULTI[:-1], hm.RenderOptions(current_date=DATE), harmony_tokenizer)
    assert "<|channel|>analysis" not in harmony_tokenizer.decode(prompt)


def test_unknown_mask_mode_is_a_user_error(harmony_tokenizer):
    with pytest.raises(ReliefError, match="mask mode 'everything'"):
        hm.render_training(
            SINGLE, hm.RenderOptions(current_date=DATE), "everything", harmony_tokenizer
        )


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "non-empty list"),
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
        ([{"role": "user", "content": "  "}, SINGLE[1]], "content is empty"),
        ([SINGLE[0]], "no assistant turn"),
        (
            [*SINGLE, {"role": "user", "content": "more?"}],
            "last message must be from the assistant",
        ),
        ([SINGLE[1], SINGLE[0], SINGLE[1]], "must start with a user message"),
        ([SINGLE[0], {"role": "system", "content": "late"}, SINGLE[1]], "may only come first"),
        ([{"role": "user", "content": "q", "thinking": "t"}, SINGLE[1]], "only assistant"),
        ([SINGLE[0], {"role": "assistant", "content": "a<|return|>"}], "Harmony token text"),
    ],
)
def test_message_problems(messages, problem):
    assert problem in hm.message_problem(messages, for_training=True)


def test_render_options_are_validated():
    with pytest.raises(ReliefError, match="reasoning_effort 'max'"):
        hm.RenderOptions(reasoning_effort="max")
    with pytest.raises(ReliefError, match="YYYY-MM-DD"):
        hm.RenderOptions(current_date="5 Aug 2025")
    assert hm.RenderOptions(current_date=None).date() != ""


def test_wrapping_keeps_the_callers_tokenizer_unchanged(hf_tokenizer):
    wrapped = hm.HarmonyTokenizer.from_any(hf_tokenizer)
    assert wrapped.encode("<|end|>") != [hm.END]  # special-looking text is text
    assert hf_tokenizer.encode("<|end|>", add_special_tokens=False) == [hm.END]
