"""`relief eval` end to end on the mini model with a trained adapter: every file for base and
adapter, the Markdown's tables, resume after an interruption, the teacher-forced loss against
plain cross-entropy, the statistics on known answers, and one line for each bad input."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from eval_helpers import ITEMS

from relief_mlx.cli import cli
from relief_mlx.eval import run as run_module
from relief_mlx.eval.run import EvalConfig, Variant, evaluate, load_items, paired_bootstrap, rescore, summarize
from relief_mlx.recipe import DataSection, EvalSection

FIELDS = {"id", "variant", "category", "prompt", "answer", "analysis", "matched", "missed", "violations",
          "coverage", "generated_tokens", "prompt_tokens", "time_s", "loss", "trained_tokens", "finished"}


def invoke(*args):
    return CliRunner().invoke(cli, ["eval", *map(str, args)])


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cli_run(mini_mlx_f32, trained_adapter, eval_data, tmp_path_factory):
    """`relief eval` of the base and the run's best adapter on the six items, 8 tokens each."""
    out = tmp_path_factory.mktemp("eval-cli") / "report"
    result = invoke("--model", mini_mlx_f32, "--adapter", trained_adapter / "best", "--data", eval_data,
                    "--out", out, "--max-tokens", 8, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    return out, result


def test_eval_writes_every_file_for_base_and_adapter(cli_run):
    out, result = cli_run
    assert {p.name for p in out.iterdir()} == {"examples.jsonl", "examples.partial.jsonl", "summary.json",
                                               "report.md", "coverage.png"}
    records = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["id"]) for r in records] == [
        (v, f"{it['category']}-{n}") for v in ("base", "run/best") for n, it in enumerate(ITEMS, start=1)]
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["generated_tokens"] == 8 and r["finish_reason"] == "length" and r["unfinished"]
        assert r["loss"] > 0 and r["trained_tokens"] > 0 and r["time_s"] > 0
        assert len(r["matched"]) + len(r["missed"]) == len(ITEMS[int(r["id"].split("-")[1]) - 1]["key_facts"])
    summary = json.loads((out / "summary.json").read_text())
    assert [v["name"] for v in summary["variants"]] == ["base", "run/best"]
    assert summary["categories"] == ["hazmat", "shelter", "wash"] and summary["items"] == 6
    assert set(summary["comparisons"]["run/best"]["by_category"]) == {"hazmat", "shelter", "wash"}
    assert summary["overall"]["base"]["teacher_forced_samples_per_s"] > 0
    # the adapter was trained on similar text: its loss differs from the base's on the same tokens
    assert summary["overall"]["base"]["trained_tokens"] == summary["overall"]["run/best"]["trained_tokens"]
    assert summary["overall"]["base"]["loss"] != summary["overall"]["run/best"]["loss"]
    assert (out / "coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stdout.splitlines()[0].startswith("run/best vs base on 6 items: key-fact coverage")


def test_the_markdown_renders_with_its_tables(cli_run):
    from markdown_it import MarkdownIt

    out, _ = cli_run
    tokens = MarkdownIt("commonmark").enable("table").parse((out / "report.md").read_text())
    tables, table, row = [], None, None
    for t in tokens:
        if t.type == "table_open":
            table = []
        elif t.type == "tr_open":
            row = []
        elif t.type == "inline" and row is not None:
            row.append(t.content)
        elif t.type == "tr_close":
            table.append(row)
            row = None
        elif t.type == "table_close":
            tables.append(table)
    overall, by_category = tables
    assert [r[0] for r in overall] == ["variant", "base", "run/best", "run/best - base"]
    assert [r[0] for r in by_category] == ["category", "hazmat", "shelter", "wash"]
    assert all(len(r) == len(t[0]) for t in tables for r in t)  # every row has the header's cells
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert "Answers that changed most: run/best vs base" in headings and "must_not violations" in headings
    assert any(t.type == "image" or (t.children and any(c.type == "image" for c in t.children)) for t in tokens)


@pytest.mark.slow
def test_an_interrupted_eval_resumes_without_redoing_finished_items(mini_mlx_f32, trained_adapter, eval_data,
                                                                    tmp_path, monkeypatch):
    config = EvalConfig(model=str(mini_mlx_f32), adapters=(str(trained_adapter),),
                        data=DataSection(path=str(eval_data)), out=str(tmp_path / "out"), max_tokens=4, batch_size=2)

    def stop_after_three(kind, event):
        if kind == "answer" and event["done"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(config, stop_after_three)
    partial = tmp_path / "out" / "examples.partial.jsonl"
    first = [json.loads(line) for line in partial.read_text().splitlines()]
    assert [r["variant"] for r in first] == ["base"] * 3 and not (tmp_path / "out" / "report.md").exists()
    with open(partial, "a") as f:
        f.write('{"key": "torn", "variant": "ba')  # a write the interruption cut short

    asked, real = [], run_module._run_variant
    monkeypatch.setattr(run_module, "_run_variant",
                        lambda engine, variant, items, *a: asked.append((variant.name, [i.id for i in items]))
                        or real(engine, variant, items, *a))
    events = []
    evaluate(config, lambda kind, e: events.append((kind, e)))
    finished = {r["id"] for r in first}
    all_ids = [f"{it['category']}-{n}" for n, it in enumerate(ITEMS, start=1)]
    assert asked == [("base", [i for i in all_ids if i not in finished]), ("run", all_ids)]
    assert ("dropped", {"lines": 1, "path": str(partial)}) in events
    assert next(e for k, e in events if k == "start")["resumed"] == 3
    records = {(r["variant"], r["id"]): r for r in map(json.loads, (tmp_path / "out" / "examples.jsonl").open())}
    assert len(records) == 12
    for r in first:  # the finished answers are the ones written before the interruption
        assert records["base", r["id"]]["time_s"] == r["time_s"] and records["base", r["id"]]["key"] == r["key"]

    asked.clear()
    evaluate(config)  # a third run answers nothing
    assert asked == []


def test_teacher_forced_loss_is_plain_cross_entropy_on_the_trained_tokens(mini_mlx_f32, eval_data, harmony_tokenizer):
    import mlx.nn as nn

    from relief_mlx.model.load import build_model, read_weights

    model = build_model(json.loads((mini_mlx_f32 / "config.json").read_text()), read_weights(mini_mlx_f32))
    items = load_items(EvalConfig(model="m", data=DataSection(path=str(eval_data))), harmony_tokenizer)
    got = run_module.teacher_forced(model, [i.example for i in items], 4, 512)
    for item, (total, trained) in zip(items, got, strict=True):
        tokens, mask = item.example.tokens, item.example.mask
        logits = model(mx.array(tokens[None, :-1]))[0].astype(mx.float32)  # (T-1, V), one example alone
        losses = nn.losses.cross_entropy(logits, mx.array(tokens[1:]))
        want = float((losses * mx.array(mask[1:].astype(np.float32))).sum())
        assert trained == int(mask[1:].sum()) > 0
        assert total == pytest.approx(want, rel=1e-4)


def _records(items, answers_by_variant):
    variants = [Variant(name, None, None, name) for name in answers_by_variant]
    records = []
    for v in variants:
        for item in items:
            answer = answers_by_variant[v.name](item)
            records.append(rescore({"variant": v.name, "id": item.id, "category": item.category, "prompt": "p",
                                    "answer": answer, "finished": True, "finish_reason": "stop",
                                    "generated_tokens": 10, "time_s": 0.1, "tf_time_s": 0.01, "loss": 2.0,
                                    "loss_sum": 20.0, "trained_tokens": 10}, item))
    return variants, records


def test_statistics_and_report_on_known_answers(eval_data, harmony_tokenizer):
    from relief_mlx.eval.report import markdown

    config = EvalConfig(model="m", data=DataSection(path=str(eval_data)))
    items = load_items(config, harmony_tokenizer)
    variants, records = _records(items, {
        "base": lambda item: "Go back in and switch the lights on." if item.category != "wash" else "",
        "good": lambda item: item.reference,
        "same": lambda item: "Go back in and switch the lights on." if item.category != "wash" else "",
    })
    summary = summarize(config, variants, items, records)
    assert summary["overall"]["base"]["coverage"] == 0.0 and summary["overall"]["good"]["coverage"] == 1.0
    assert summary["overall"]["base"]["items_with_violations"] == 2  # the generator item and the gas item
    assert summary["overall"]["base"]["empty"] == 2
    good, same = summary["comparisons"]["good"]["overall"], summary["comparisons"]["same"]["overall"]
    assert good["coverage"]["difference"] == 1.0 and good["coverage"]["verdict"] == "higher"
    assert same["coverage"]["ci95"] == [0.0, 0.0] and same["coverage"]["verdict"] == "no significant difference"
    assert summary["comparisons"]["good"]["by_category"]["wash"]["coverage"]["verdict"] == "too few items"
    assert "(+100.0 points, 95% CI +100.0 to +100.0: significantly higher)" in summary["sentences"][0]
    assert "no significant difference" in summary["sentences"][1]
    text = markdown(summary, records)
    assert text.count("`base` on `shelter-2` (shelter): someone goes back in to switch the generator off: "
                      "\"Go back in and switch the lights on\"") == 1
    assert "`base` on `hazmat-5` (hazmat): switch the lights on to look" in text
    assert "## Answers that changed most: same vs base\n\nNo answer changed." in text
    assert text.count("### ") == 6  # every answer of `good` changed; `same` lists none


def test_paired_bootstrap_is_seeded_and_says_what_the_interval_covers():
    rng = np.random.default_rng(1)
    base, other = rng.normal(size=40), rng.normal(size=40)
    first, again = paired_bootstrap(base, other, seed=3), paired_bootstrap(base, other, seed=3)
    assert first == again and first != paired_bootstrap(base, other, seed=4)
    assert first["difference"] == pytest.approx(float(np.mean(other - base)))
    assert first["ci95"][0] < first["difference"] < first["ci95"][1]
    assert first["verdict"] == "no significant difference"
    assert paired_bootstrap(base, base + 1.0, seed=0)["verdict"] == "higher"
    assert paired_bootstrap(base, base - 0.5, seed=0)["verdict"] == "lower"
    assert paired_bootstrap([0, 0, 0], [1, 1, 1], seed=0)["verdict"] == "too few items"
    weighted = paired_bootstrap([1.0, 2.0], [2.0, 2.0], seed=0, weights=[3, 1])
    assert weighted["difference"] == pytest.approx(0.75)  # (3 * 1 + 1 * 0) / 4


def test_the_cli_defaults_are_the_recipe_defaults():
    params = {p.name: p.default for p in cli.commands["eval"].params}
    section = EvalSection()
    assert (params["split"], params["limit"], params["batch_size"], params["max_tokens"], params["seed"]) == (
        section.split, section.limit, section.batch_size, section.max_tokens, section.seed)
    assert (params["data"], params["reasoning"]) == (DataSection().path, DataSection().reasoning_effort)


# ---------------------------------------------------------------- bad input: one line each


def test_an_adapter_for_another_model_is_one_line(mini_mlx_f32, eval_data, tmp_path):
    adapter = tmp_path / "other"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 4,
         "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}}))
    mx.save_safetensors(str(adapter / "adapters.safetensors"),
                        {"model.layers.0.self_attn.q_proj.lora_a": mx.zeros((256, 4))})  # hidden 256, not 128
    line = one_error_line(invoke("--model", mini_mlx_f32, "--adapter", adapter, "--data", eval_data,
                                 "--out", tmp_path / "out"))
    assert f"adapter {adapter}:" in line and "has shape (256, 4), the model expects (128, 4)" in line
    assert not (tmp_path / "out").exists()


def test_an_adapter_whose_base_model_differs_is_one_line(mini_mlx_f32, trained_adapter, eval_data, tmp_path):
    other = tmp_path / "other-model"
    other.mkdir()
    config = json.loads((mini_mlx_f32 / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 24}))
    adapter = shutil.copytree(trained_adapter / "best", tmp_path / "adapter")
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(settings | {"base_model": str(other)}))
    line = one_error_line(invoke("--model", mini_mlx_f32, "--adapter", adapter, "--data", eval_data))
    assert f"adapter {adapter} was trained on {other} (num_hidden_layers 24), not on {mini_mlx_f32}" in line


def test_a_split_without_key_facts_is_one_line(mini_mlx_f32, eval_data):
    line = one_error_line(invoke("--model", mini_mlx_f32, "--data", eval_data, "--split", "valid"))
    assert f"{eval_data / 'valid.jsonl'}:1 has no key_facts" in line and "--split" in line


def test_an_unknown_category_is_one_line(mini_mlx_f32, eval_data):
    line = one_error_line(invoke("--model", mini_mlx_f32, "--data", eval_data, "--categories", "wash,medical"))
    assert line == f"error: unknown category 'medical'; the test split of {eval_data} has hazmat, shelter, wash"


def test_limit_spreads_over_categories_and_categories_filter(eval_data, harmony_tokenizer):
    def ids(**kw):
        return [i.id for i in load_items(EvalConfig(model="m", data=DataSection(path=str(eval_data)), **kw),
                                         harmony_tokenizer)]

    assert ids(limit=3) == ["wash-1", "shelter-2", "hazmat-5"]  # one per category, file order
    assert ids(categories=("shelter",)) == ["shelter-2", "shelter-4"]
    assert ids(categories=("wash", "hazmat"), limit=3) == ["wash-1", "wash-3", "hazmat-5"]


# ---------------------------------------------------------------- [eval] after training


def _recipe(mini_mlx_f32, eval_data, out, **eval_section):
    from relief_mlx.recipe import from_dict

    return from_dict({
        "model": {"path": str(mini_mlx_f32)}, "data": {"path": str(eval_data), "max_length": 128},
        "lora": {"targets": ["self_attn.q_proj"], "rank": 4, "alpha": 8},
        "train": {"iterations": 2, "learning_rate": 1e-2, "loss_chunk": 32}, "validation": {"every": 2},
        "output": {"dir": str(out), "checkpoint_every": 0}, "eval": {"enabled": True, **eval_section},
    })


def test_train_evaluates_base_and_best_adapter_at_the_end(mini_mlx_f32, eval_data, tmp_path):
    from relief_mlx.train import train

    events = []
    result = train(_recipe(mini_mlx_f32, eval_data, tmp_path / "run", limit=3, max_tokens=2, categories=["wash",
                                                                                                          "hazmat"]),
                   on_event=lambda kind, e: events.append((kind, e)))
    eval_dir = tmp_path / "run" / "eval"
    assert {p.name for p in eval_dir.iterdir()} >= {"examples.jsonl", "summary.json", "report.md", "coverage.png"}
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert [v["adapter"] for v in summary["variants"]] == [None, str(tmp_path / "run" / "best")]
    assert summary["items"] == 3 and summary["categories"] == ["hazmat", "wash"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["eval"] == result.summary["eval"]
    assert result.summary["eval"]["sentences"][0].startswith("run/best vs base on 3 items")
    kinds = [e["kind"] for kind, e in events if kind == "eval"]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("answer") == 6
    assert [kind for kind, _ in events][-1] == "done"  # the trainer's own last event


def test_train_refuses_an_eval_section_it_cannot_run_before_training(mini_mlx_f32, eval_data, tmp_path):
    from relief_mlx.errors import ReliefError
    from relief_mlx.train import train

    with pytest.raises(ReliefError, match="valid.jsonl:1 has no key_facts"):
        train(_recipe(mini_mlx_f32, eval_data, tmp_path / "run", split="valid"))
    assert not (tmp_path / "run").exists()  # no step was trained
