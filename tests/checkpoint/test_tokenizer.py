"""The offline o200k_harmony tokenizer: files, ids, and token-for-token equality with
openai-harmony's own encoding."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from relief_mlx.checkpoint import tokenizer as tk
from relief_mlx.errors import ReliefError

TEXTS = [
    "Hello, world! How are you today?",
    "Café, naïve, résumé, Ærøskøbing, façade, São Paulo, Kraków, Übermäßig",
    "🚑🔥 shelter at 20 sq ft/person 👩‍⚕️🏳️‍🌈 ✅",
    "1 12 123 1234 12345 3.14159 -0.5 1,000,000 2024-06-01 0x1F",
    "def chlorine_dose(litres: float) -> float:\n    return litres * 0.2  # mg/L\n",
    "a    b\t\t\tc\n\n\n  d   \n\t\n",
    "   leading spaces and trailing   ",
    "I'm sure they'LL say HE'S fine, don't they?",
    "中文字符，日本語のテキスト、한국어 텍스트",
    "Привет, мир! Ελληνικά. עברית. العربية.",
    "path/to/file.txt // comment\r\n\r\nnext",
    "CAPS and MixedCase and camelCaseWords and snake_case_words",
    "\u00a0nbsp\u2003em-space\u200bzero-width",
]


def test_ranks_path_has_the_real_sha256():
    path = tk.o200k_ranks_path()
    assert path.name == "o200k_base.tiktoken"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tk.O200K_SHA256


def test_ranks_come_from_the_wheel_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RELIEF_CACHE", str(tmp_path))
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    path = tk.o200k_ranks_path()
    assert path == tmp_path / "o200k_base.tiktoken"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tk.O200K_SHA256
    assert len(tk.load_ranks(path)) == tk.NUM_BASE_TOKENS


def test_env_ranks_are_preferred(tmp_path, monkeypatch):
    (tmp_path / "o200k_base.tiktoken").write_bytes(tk.o200k_ranks_path().read_bytes())
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    assert tk.o200k_ranks_path() == tmp_path / "o200k_base.tiktoken"


def test_env_ranks_with_wrong_content_are_refused(tmp_path, monkeypatch):
    (tmp_path / "o200k_base.tiktoken").write_text("not ranks")
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    with pytest.raises(ReliefError, match="o200k_base.tiktoken.*sha256"):
        tk.o200k_ranks_path()


def test_no_ranks_anywhere_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RELIEF_CACHE", str(tmp_path))
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setattr(tk.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(ReliefError, match="pip install bpe-openai"):
        tk.o200k_ranks_path()


def test_files_match_the_hub_repo_layout(tokenizer_dir: Path):
    names = {p.name for p in tokenizer_dir.iterdir()}
    assert names == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    }
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == (
        "<|return|>",
        "<|endoftext|>",
        "<|startoftext|>",
    )
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    decoder = config["added_tokens_decoder"]
    assert len(decoder) == 201_088 - 199_998
    assert decoder["200005"]["content"] == "<|channel|>"
    assert decoder["200004"]["content"] == "<|reserved_200004|>"
    assert all(entry["special"] for entry in decoder.values())


def test_special_token_ids(hf_tokenizer):
    expected = {
        "<|startoftext|>": 199998,
        "<|endoftext|>": 199999,
        "<|reserved_200000|>": 200000,
        "<|reserved_200001|>": 200001,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|reserved_200004|>": 200004,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|reserved_200009|>": 200009,
        "<|reserved_200011|>": 200011,
        "<|call|>": 200012,
        "<|reserved_200013|>": 200013,
        "<|reserved_201087|>": 201087,
    }
    assert {t: hf_tokenizer.convert_tokens_to_ids(t) for t in expected} == expected
    assert len(hf_tokenizer) == 201_088
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id, hf_tokenizer.bos_token_id) == (
        200002,
        199999,
        199998,
    )


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_matches_openai_harmony(text, hf_tokenizer, harmony_encoding):
    ours = hf_tokenizer.encode(text, add_special_tokens=False)
    assert ours == harmony_encoding.encode(text, allowed_special=set())
    assert hf_tokenizer.decode(ours) == text


def test_special_token_text_encodes_to_its_id(hf_tokenizer, harmony_encoding):
    text = "<|start|>user<|message|>Hi<|end|>"
    ours = hf_tokenizer.encode(text, add_special_tokens=False)
    assert ours == harmony_encoding.encode(text, allowed_special="all")
    assert ours[0] == 200006 and ours[-1] == 200007


def test_mlx_lm_loads_it(tokenizer_dir, harmony_encoding):
    from mlx_lm import tokenizer_utils

    load = getattr(tokenizer_utils, "load_tokenizer", None) or tokenizer_utils.load
    wrapper = load(Path(tokenizer_dir))
    assert 200002 in wrapper.eos_token_ids
    for text in TEXTS[:4]:
        ids = wrapper.encode(text, add_special_tokens=False)
        assert ids == harmony_encoding.encode(text, allowed_special=set())
        assert wrapper.decode(ids) == text


def _harmony_conversation(harmony, messages, date, effort):
    h = harmony
    system = (
        h.SystemContent.new()
        .with_conversation_start_date(date)
        .with_reasoning_effort(h.ReasoningEffort(effort.capitalize()))
    )
    out = [h.Message.from_role_and_content(h.Role.SYSTEM, system)]
    for m in messages:
        if m["role"] == "system":
            content = h.DeveloperContent.new().with_instructions(m["content"])
            out.append(h.Message.from_role_and_content(h.Role.DEVELOPER, content))
        elif m["role"] == "user":
            out.append(h.Message.from_role_and_content(h.Role.USER, m["content"]))
        else:
            if "thinking" in m:
                msg = h.Message.from_role_and_content(h.Role.ASSISTANT, m["thinking"])
                out.append(msg.with_channel("analysis"))
            msg = h.Message.from_role_and_content(h.Role.ASSISTANT, m["content"])
            out.append(msg.with_channel("final"))
    return h.Conversation.from_messages(out)


CHAT = [
    {"role": "system", "content": "Answer as a shelter manager."},
    {"role": "user", "content": "How much floor space per person?"},
    {"role": "assistant", "content": "20 sq ft short stay.", "thinking": "ARC 4496."},
    {"role": "user", "content": "And for a long stay?"},
    {"role": "assistant", "content": "40 sq ft.", "thinking": "Post-impact shelter."},
]


def test_chat_template_renders_like_openai_harmony(hf_tokenizer, harmony_encoding):
    harmony = pytest.importorskip("openai_harmony")
    kwargs = {"current_date": "2025-08-05", "reasoning_effort": "high", "tokenize": False}
    conv = _harmony_conversation(harmony, CHAT, "2025-08-05", "high")
    text = hf_tokenizer.apply_chat_template(CHAT, **kwargs)
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert ids == harmony_encoding.render_conversation_for_training(conv)

    prompt_conv = _harmony_conversation(harmony, CHAT[:4], "2025-08-05", "high")
    text = hf_tokenizer.apply_chat_template(CHAT[:4], add_generation_prompt=True, **kwargs)
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    want = harmony_encoding.render_conversation_for_completion(prompt_conv, harmony.Role.ASSISTANT)
    assert ids == want


def test_tokenizer_json_is_built_once(tokenizer_dir):
    cached = tk.cached_tokenizer_json()
    before = cached.stat().st_mtime_ns
    assert tk.cached_tokenizer_json() == cached
    assert cached.stat().st_mtime_ns == before
    assert (tokenizer_dir / "tokenizer.json").read_bytes() == cached.read_bytes()
