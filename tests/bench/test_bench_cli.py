"""`relief bench` end to end on the mini preset at tiny lengths, the refusal, and the report."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from relief_mlx.cli import cli

TINY = ["bench", "--preset", "mini", "--prompt-lengths", "16", "--gen-lengths", "8", "--trials", "1",
        "--train-seq", "32", "--bandwidth-mib", "8"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """(CLI result, JSON) of one tiny run with --compare mlx-lm."""
    out = tmp_path_factory.mktemp("bench") / "compared.json"
    result = CliRunner().invoke(cli, [*TINY, "--compare", "mlx-lm", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text())


def test_tiny_run_writes_sane_figures(compared):
    result, data = compared
    assert data["format"] == "relief-bench/1"
    assert data["machine"]["backend"] in ("cpu", "metal", "cuda") and data["machine"]["versions"]["mlx"]
    assert data["model"]["source"] == "preset mini (synthesized)" and data["model"]["experts"] == "mxfp4"
    assert data["bandwidth"]["limit_gbps"] > 0
    relief = data["generation"]["runners"]["relief"]
    (prefill,), (decode,) = relief["prefill"], relief["decode"]
    assert prefill["prompt_tokens"] == 16 and prefill["tokens_per_s"]["median"] > 0
    assert 0 < prefill["ttft_s"]["median"] < 60
    assert decode["generated_tokens"] == 8 and decode["tokens_per_s"]["median"] > 0
    assert decode["bytes_per_token"]["total"] > decode["bytes_per_token"]["lm_head"] == 201_088 * 128 * 4
    speed = decode["tokens_per_s"]["median"]
    assert decode["bandwidth_fraction"] == pytest.approx(speed / decode["ceiling_tokens_per_s"])
    weights = data["model"]["weights_bytes"]
    assert 0.2e9 < weights < 0.22e9  # the mini preset in float32 with MXFP4 experts: 208 MB
    assert data["model"]["build_peak_bytes"] < 1.1 * weights  # built a tensor at a time, not twice
    assert prefill["peak_memory_bytes"] >= weights
    training = data["training"]
    assert training["shape"]["rank"] == 8 and training["shape"]["targets"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert training["shape"]["seq"] == 32 and training["runners"]["relief"]["tokens_per_s"]["median"] > 0
    assert "prefill 16 tok/s" in result.output and "LoRA r8 q_proj+v_proj 1x32 tok/s" in result.output


def test_compare_adds_mlx_lm_and_ratios(compared):
    _, data = compared
    ours, theirs = (data["generation"]["runners"][n] for n in ("relief", "mlx-lm"))
    assert theirs["decode"][0]["tokens_per_s"]["median"] > 0
    ours, theirs = (r["decode"][0]["tokens_per_s"]["median"] for r in (ours, theirs))
    # one trial: the trial-by-trial ratio is the ratio of the two speeds
    assert data["ratios"]["decode"][0]["tokens_per_s"]["median"] == pytest.approx(ours / theirs)
    assert data["ratios"]["prefill"][0]["tokens_per_s"]["min"] > 0
    assert data["ratios"]["training"]["tokens_per_s"]["max"] > 0
    assert data["ratios"]["training"]["peak_memory"] > 0
    assert data["training"]["runners"]["mlx-lm"]["peak_memory_bytes"] > 0


def test_chart_or_one_line_notice(compared, tmp_path):
    result, data = compared
    from relief_mlx.bench.report import plot

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no chart: matplotlib is not installed" in result.output
        return
    assert "chart -> " in result.output
    png = plot(data, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_matplotlib_means_no_chart(compared, tmp_path, monkeypatch):
    from relief_mlx.bench.report import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert plot(compared[1], tmp_path / "chart.png") is None
    assert not (tmp_path / "chart.png").exists()


def test_without_compare_there_are_no_ratios(tmp_path):
    out = tmp_path / "alone.json"
    result = CliRunner().invoke(cli, [*TINY, "--no-training", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert list(data["generation"]["runners"]) == ["relief"]
    assert data["ratios"] is None and data["training"] is None
    assert "relief/mlx-lm" not in result.output


def test_refuses_in_one_line_before_allocating(monkeypatch, tmp_path):
    from relief_mlx.bench import memory, run, source

    def must_not_run(*args, **kwargs):
        raise AssertionError("the bench allocated before checking memory")

    monkeypatch.setattr(memory, "available_memory", lambda: (2**30, "available RAM"))
    monkeypatch.setattr(memory, "measure_bandwidth", must_not_run)
    monkeypatch.setattr(source, "build", must_not_run)
    monkeypatch.setattr("relief_mlx.doctor.diagnose", must_not_run)
    result = CliRunner().invoke(cli, ["bench", "--preset", "gpt-oss-20b", "--out", str(tmp_path / "x.json")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: preset gpt-oss-20b (synthesized) needs about ")
    assert "this machine has 1.0 GiB (available RAM)" in lines[0]
    assert not (tmp_path / "x.json").exists()
    assert run.memory is memory  # the patched module is the one run_bench reads


@pytest.mark.parametrize("args, wrong", [
    (["--preset", "mini", "--model", "x"], "exactly one of --model"),
    (["--preset", "mini", "--prompt-lengths", "0"], "--prompt-lengths"),
    (["--preset", "mini", "--compare", "vllm"], "vllm"),
    (["--preset", "nano"], "unknown preset 'nano'"),
])
def test_bad_options_are_one_line_errors(args, wrong):
    result = CliRunner().invoke(cli, ["bench", *args])
    assert result.exit_code != 0 and wrong in result.output
    assert "Traceback" not in result.output


def test_agreement_compares_min_max_ranges(compared):
    import copy

    from relief_mlx.bench.report import agreement, markdown

    _, data = compared
    assert all(row["agree"] for row in agreement(data, data))
    faster = copy.deepcopy(data)
    speed = faster["generation"]["runners"]["relief"]["decode"][0]["tokens_per_s"]
    speed.update(median=speed["max"] * 3, min=speed["max"] * 2, max=speed["max"] * 4)
    rows = {row["figure"]: row["agree"] for row in agreement(data, faster)}
    assert rows["relief decode 8 tok/s"] is False and rows["relief prefill 16 tok/s"] is True
    assert "| prefill 16 tok/s |" in markdown(data)


def test_json_keeps_the_command_and_the_memory_breakdown(compared):
    result, data = compared
    assert data["command"].startswith("relief bench --preset mini") and "--compare mlx-lm" in data["command"]
    memory = data["training"]["memory"]
    for part in ("weights", "activations", "loss_head", "lora_state"):
        assert memory["forecast"][part] > 0 and memory["measured"][part] > 0, part
    assert memory["measured"]["weights"] == data["model"]["weights_bytes"] or memory["measured"]["weights"] > 0
    assert memory["measured"]["peak"] >= memory["measured"]["weights"]
    assert "relief LoRA step memory, GiB" in result.output and "allocator cache" in result.output
