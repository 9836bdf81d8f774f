"""`relief generate` and `relief chat`: what users see, and one clear line for each bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from gen_helpers import harmony_ids, write_random_adapter

from relief_mlx.cli import cli
from relief_mlx.data.harmony import CHANNEL, END, MESSAGE, RETURN, START
from relief_mlx.generate import Engine


@pytest.fixture
def fast_load(monkeypatch, mini_loaded, harmony_tokenizer):
    """Engine.load runs for real, but reuses the session's tokenizers (14 s to parse)."""
    import mlx_lm.utils

    from relief_mlx.data.harmony import HarmonyTokenizer

    monkeypatch.setattr(mlx_lm.utils, "load_tokenizer", lambda *a, **k: mini_loaded[1])
    monkeypatch.setattr(HarmonyTokenizer, "from_any", classmethod(lambda cls, tok: harmony_tokenizer))


@pytest.fixture
def scripted_cli(monkeypatch, scripted_engine):
    """Make `relief generate/chat` run a ScriptedModel; returns the engine."""

    def use(script):
        engine = scripted_engine(script)
        monkeypatch.setattr(Engine, "load", classmethod(lambda cls, model, adapter=None: engine))
        return engine

    return use


def run(*args, stdin=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=stdin)


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("loading ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def turn(tok, thinking, final):
    return harmony_ids(tok, CHANNEL, "analysis", MESSAGE, thinking, END,
                       START, "assistant", CHANNEL, "final", MESSAGE, final, RETURN)


def test_only_the_final_answer_is_printed(scripted_cli, harmony_tokenizer):
    scripted_cli(turn(harmony_tokenizer, "secret plan", "Boil water for one minute."))
    result = run("generate", "--model", "m", "--prompt", "Water?")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Boil water for one minute.\n"
    assert "tokens/s" in result.stderr and "peak memory" in result.stderr


def test_show_reasoning_labels_the_analysis(scripted_cli, harmony_tokenizer):
    scripted_cli(turn(harmony_tokenizer, "secret plan", "Boil water."))
    result = run("generate", "--model", "m", "--prompt", "Water?", "--show-reasoning")
    assert result.stdout == "[analysis] secret plan\nBoil water.\n"


def test_raw_prints_the_harmony_tokens(scripted_cli, harmony_tokenizer):
    scripted_cli(turn(harmony_tokenizer, "plan", "Boil."))
    result = run("generate", "--model", "m", "--prompt", "Water?", "--raw")
    assert "<|channel|>analysis<|message|>plan<|end|>" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "hi", "--top-p", "1.5"], "top-p 1.5 is not valid"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature -1.0 is not valid"),
    (["--prompt", "hi", "--max-tokens", "0"], "max-tokens 0 is not valid"),
    (["--prompts", "x.jsonl"], "pass either --prompt TEXT, or --prompts FILE.jsonl with --answers"),
    (["--prompts", "x.jsonl", "--answers", "o.jsonl", "--raw"], "--raw shapes what one --prompt prints; --prompts"),
    (["--prompts", "x.jsonl", "--answers", "o.jsonl", "--show-reasoning"], "--show-reasoning shapes what one"),
    (["--prompt", "x", "--seed", "3"], "--seed 3 has nothing to seed: --temperature 0 is greedy"),
])
def test_bad_arguments_fail_in_one_line(args, message, scripted_cli):
    scripted_cli([])
    assert message in one_error_line(run("generate", "--model", "m", *args))


def test_a_prompt_longer_than_the_context(fast_load, mini_mlx):
    line = one_error_line(run("generate", "--model", mini_mlx, "--prompt", "a " * 131_100))
    assert "the model's context is 131072; shorten the prompt" in line


def test_adapter_of_another_rank(fast_load, mini_mlx, tmp_path):
    adapter = write_random_adapter(mini_mlx, tmp_path / "a", rank=8)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 4
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    line = one_error_line(run("generate", "--model", mini_mlx, "--adapter", adapter, "--prompt", "hi"))
    assert "another model or LoRA rank" in line


def test_adapter_of_another_model(fast_load, mini_mlx, tmp_path):
    import mlx.core as mx

    adapter = write_random_adapter(mini_mlx, tmp_path / "a")
    weights = mx.load(str(adapter / "adapters.safetensors"))
    weights = {k.replace("layers.3.", "layers.23."): v for k, v in weights.items()}  # a deeper model
    mx.save_safetensors(str(adapter / "adapters.safetensors"), weights)
    line = one_error_line(run("generate", "--model", mini_mlx, "--adapter", adapter, "--prompt", "hi"))
    assert "trained for another model" in line


def test_an_adapter_answers_differently(fast_load, mini_mlx, tmp_path):
    adapter = write_random_adapter(mini_mlx, tmp_path / "run")
    args = ["generate", "--model", mini_mlx, "--prompt", "hi", "--max-tokens", "6", "--raw"]
    base, tuned = run(*args), run(*args, "--adapter", adapter)
    assert base.exit_code == tuned.exit_code == 0, tuned.output
    assert base.stdout != tuned.stdout


def test_prompts_file_with_a_bad_line_answers_the_rest(fast_load, mini_mlx, tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    prompts.write_text('{"prompt": "first", "id": 7}\n{"prompt": \n\n'
                       '{"messages": [{"role": "user", "content": "third"}]}\n{"prompt": ""}\n')
    result = run("generate", "--model", mini_mlx, "--prompts", prompts, "--answers", out, "--max-tokens", "3")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: 2 line(s) of")
    assert f"{prompts}:2: error: not valid JSON" in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 4, 5]
    assert records[0]["id"] == 7 and records[0]["generated_tokens"] == 3
    assert records[2]["generated_tokens"] == 3 and "error" in records[1] and "error" in records[3]


def test_a_line_is_printed_while_the_model_loads(fast_load, mini_mlx):
    result = run("generate", "--model", mini_mlx, "--prompt", "hi", "--max-tokens", "2")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == f"loading {mini_mlx} ..."


def test_generation_wires_the_model_memory_where_the_backend_recommends_it(fast_load, mini_mlx, monkeypatch):
    """Metal's call path, run on any backend: mlx-lm's wired_limit reads the recommended working set
    from mx.device_info() and sets it around generation, then restores the old limit."""
    import mlx.core as mx

    calls = []
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 3 * 2**30})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 0)
    assert run("generate", "--model", mini_mlx, "--prompt", "hi", "--max-tokens", "2").exit_code == 0
    assert calls == [3 * 2**30, 0]


def test_batch_size_below_one_is_refused(scripted_cli, tmp_path):
    scripted_cli([])
    result = run("generate", "--model", "m", "--prompts", tmp_path / "p.jsonl", "--answers", tmp_path / "o.jsonl",
                 "--batch-size", "0")
    assert result.exit_code == 2 and "--batch-size" in result.output and "0 is not in the range x>=1" in result.output


def test_moe_stats_table(fast_load, mini_mlx):
    result = run("generate", "--model", mini_mlx, "--prompt", "hi", "--max-tokens", "3", "--moe-stats",
                 "--check-routing")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stderr.splitlines() if line.split()[:1] in (["0"], ["3"])]
    assert [r[:2] for r in rows] == [["0", "prompt"], ["3", "prompt"], ["0", "answer"], ["3", "answer"]]


def test_chat_keeps_finals_drops_analysis_and_obeys_commands(scripted_cli, harmony_tokenizer):
    tok = harmony_tokenizer
    engine = scripted_cli([*turn(tok, "first thoughts", "Answer one."), 11,
                           *turn(tok, "second thoughts", "Answer two."), 11,
                           *turn(tok, "third thoughts", "Answer three.")])
    result = run("chat", "--model", "m", stdin="Question one\nQuestion two\n/reasoning high\n/stats\n"
                                                "/reset\nQuestion three\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "Answer one.\n" in result.stdout and "Answer three.\n" in result.stdout
    assert "reasoning: high" in result.stdout and "tokens/s" in result.stdout
    first = tok.decode(engine.model.fed[0])
    assert "Reasoning: medium" in first and "Question one" in first
    second = tok.decode(engine.model.fed[1])  # turn two's new prompt tokens (the rest is cached), its answer
    assert second.startswith("assistant<|channel|>final<|message|>Answer one.<|end|><|start|>user<|message|>"
                             "Question two<|end|><|start|>assistant<|channel|>analysis")
    assert "first thoughts" not in second
    reused = len(engine.model.fed[0]) - len(turn(tok, "first thoughts", "Answer one.")) - 1  # turn one's prompt[:-1]
    assert f"{reused} reused from the last turn" in result.stdout  # /stats
    third = tok.decode(engine.model.fed[2])
    assert "Reasoning: high" in third and "Question one" not in third  # /reset forgot it
