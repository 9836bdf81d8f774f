"""`relief bench` end to end on the mini preset at tiny lengths, the refusal, the measurement-error
guard, and the report and chart."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from click.testing import CliRunner
from PIL import Image

from relief_mlx.checkpoint.presets import count_parameters, hf_config
from relief_mlx.cli import cli

TINY = ["bench", "--preset", "mini", "--prompt-lengths", "16", "--gen-lengths", "8", "--trials", "1",
        "--train-seq", "32", "--bandwidth-mib", "8"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """(CLI result, JSON, its path) of one tiny run with --compare mlx-lm."""
    out = tmp_path_factory.mktemp("bench") / "compared.json"
    result = CliRunner().invoke(cli, [*TINY, "--compare", "mlx-lm", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text()), out


def test_tiny_run_writes_sane_figures(compared):
    result, data, _ = compared
    assert data["format"] == "relief-bench/1"
    assert data["machine"]["backend"] in ("cpu", "metal", "cuda") and data["machine"]["versions"]["mlx"]
    assert data["model"]["source"] == "preset mini (synthesized)" and data["model"]["experts"] == "mxfp4"
    bw = data["bandwidth"]
    assert bw["sizes_bytes"]["host"] == [2 * 2**20, 4 * 2**20, 8 * 2**20]  # --bandwidth-mib 8: a quarter, half, all
    assert bw["limit_gbps"] == bw["kernels_gbps"][bw["limit_kernel"]]["best"] > 0
    if data["machine"]["backend"] == "cpu":  # the host's read counts on a CPU backend
        assert bw["limit_gbps"] == max(k["best"] for k in bw["kernels_gbps"].values())
    assert "the arrays fit in it" in result.output or bw["last_level_cache_bytes"] is None
    relief = data["generation"]["runners"]["relief"]
    (prefill,), (decode,) = relief["prefill"], relief["decode"]
    assert prefill["prompt_tokens"] == 16 and prefill["tokens_per_s"]["median"] > 0
    assert 0 < prefill["ttft_s"]["median"] < 60
    assert decode["generated_tokens"] == 8 and decode["tokens_per_s"]["median"] > 0
    # float weights run in float32 on the CPU backend (its gather_mm), bfloat16 on GPUs
    dtype_bytes = 4 if mx.default_device() == mx.cpu else 2
    assert data["model"]["dtype"] == {4: "float32", 2: "bfloat16"}[dtype_bytes]
    assert decode["bytes_per_token"]["total"] > decode["bytes_per_token"]["lm_head"] == 201_088 * 128 * dtype_bytes
    speed = decode["tokens_per_s"]["median"]
    assert decode["bandwidth_fraction"] == pytest.approx(speed / decode["ceiling_tokens_per_s"])
    assert decode["bandwidth_fraction"] == pytest.approx(speed * decode["bytes_per_token"]["total"]
                                                         / (bw["limit_gbps"] * 1e9))
    # the bytes behind the share are stated: 201,088 x 128 float32 lm_head = 103 MB
    assert "decode 8 after 16 reads " in result.output and "MB/token (mean over the run): lm_head 103," in result.output
    weights = data["model"]["weights_bytes"]
    counts = count_parameters(hf_config("mini"))  # MXFP4: 4.25 bits a value (a scale per 32)
    expected = counts["experts"] * 4.25 / 8 + (counts["total"] - counts["experts"]) * dtype_bytes
    assert weights == pytest.approx(expected, rel=0.03)  # 208 MB in float32, 105 MB in bfloat16
    assert data["model"]["build_peak_bytes"] < 1.1 * weights  # built a tensor at a time, not twice
    assert prefill["peak_memory_bytes"] >= weights
    training = data["training"]
    assert training["shape"]["rank"] == 8 and training["shape"]["targets"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert training["shape"]["seq"] == 32 and training["runners"]["relief"]["tokens_per_s"]["median"] > 0
    assert "prefill 16 tok/s" in result.output and "LoRA r8 q_proj+v_proj 1x32 tok/s" in result.output


def test_compare_adds_mlx_lm_and_ratios(compared):
    _, data, _ = compared
    ours, theirs = (data["generation"]["runners"][n] for n in ("relief", "mlx-lm"))
    assert theirs["decode"][0]["tokens_per_s"]["median"] > 0
    ours, theirs = (r["decode"][0]["tokens_per_s"]["median"] for r in (ours, theirs))
    # one trial: the trial-by-trial ratio is the ratio of the two speeds
    assert data["ratios"]["decode"][0]["tokens_per_s"]["median"] == pytest.approx(ours / theirs)
    assert data["ratios"]["prefill"][0]["tokens_per_s"]["min"] > 0
    assert data["ratios"]["training"]["tokens_per_s"]["max"] > 0
    assert data["ratios"]["training"]["peak_memory"] > 0
    assert data["training"]["runners"]["mlx-lm"]["peak_memory_bytes"] > 0


def test_chart_is_written_beside_the_json(compared):
    """`--out r.json` writes r.png with the default install: a 3-panel chart, 546 x 3 x 598 pixels."""
    result, _, out = compared
    png = out.with_suffix(".png")
    assert f"chart -> {png}" in result.output
    with Image.open(png) as image:
        image.load()  # decodes every pixel
        assert image.format == "PNG" and image.size == (1794, 546)


def test_without_compare_there_are_no_ratios(tmp_path):
    out = tmp_path / "alone.json"
    result = CliRunner().invoke(cli, [*TINY, "--no-training", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert list(data["generation"]["runners"]) == ["relief"]
    assert data["ratios"] is None and data["training"] is None
    assert "relief/mlx-lm" not in result.output
    with Image.open(tmp_path / "alone.png") as image:  # no training panel
        image.load()
        assert image.size == (1196, 546)


def test_a_decode_faster_than_the_limit_is_a_measurement_error(monkeypatch, tmp_path):
    """A limit the decode beats is wrong: the run says so and exits 1, and prints no share."""
    from relief_mlx.bench import memory

    real = memory.measure_bandwidth
    monkeypatch.setattr(memory, "measure_bandwidth", lambda largest: real(largest) | {"limit_gbps": 1e-3})
    out = tmp_path / "wrong.json"
    result = CliRunner().invoke(cli, [*TINY, "--no-training", "--out", str(out)])
    assert result.exit_code == 1
    (row,) = json.loads(out.read_text())["generation"]["runners"]["relief"]["decode"]  # written all the same
    assert row["bandwidth_fraction"] is None and "of the measured bandwidth limit 0.001 GB/s" in row["bandwidth_error"]
    share = next(line for line in result.output.splitlines() if "share of bandwidth limit" in line)
    assert share.split()[-1] == "ERROR" and "%" not in share
    assert "MEASUREMENT ERROR: relief decode of 8 tokens at " in result.output
    assert result.output.rstrip().splitlines()[-1].startswith("error: relief decode of 8 tokens at ")
    assert (tmp_path / "wrong.png").is_file()


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
    (["--preset", "mini", "--bandwidth-mib", "0"], "--bandwidth-mib 0 is not valid"),
    (["--preset", "nano"], "'nano' is not one of 'mini'"),
    (["--preset", "mini", "--experts", "dense"], "'dense' is not one of 'auto', 'mxfp4', 'bfloat16', 'float32'"),
    (["--preset", "mini", "--shared-experts"], "--shared-experts shares dense experts; pass --experts"),
    (["--preset", "mini", "--dtype", "float32", "--experts", "bfloat16"],
     "--experts bfloat16: the bench runs in float32, so dense experts are float32"),
    (["--preset", "mini", "--dtype", "int8"], "'int8' is not one of 'float32', 'bfloat16', 'float16'"),
])
def test_bad_options_are_one_line_errors(args, wrong):
    result = CliRunner().invoke(cli, ["bench", *args])
    assert result.exit_code != 0 and wrong in result.output
    assert "Traceback" not in result.output


def test_agreement_compares_min_max_ranges(compared):
    import copy

    from relief_mlx.bench.report import agreement, markdown

    _, data, _ = compared
    within = copy.deepcopy(data)  # another run whose medians moved inside the first run's min-max
    speed = within["generation"]["runners"]["relief"]["decode"][0]["tokens_per_s"]
    speed.update(median=(speed["min"] + speed["max"]) / 2, min=speed["min"] * 0.99, max=speed["max"] * 1.01)
    rows = {row["figure"]: row["agree"] for row in agreement(data, within)}
    assert rows["relief decode 8 tok/s"] is True and all(rows.values())
    faster = copy.deepcopy(data)
    speed = faster["generation"]["runners"]["relief"]["decode"][0]["tokens_per_s"]
    speed.update(median=speed["max"] * 3, min=speed["max"] * 2, max=speed["max"] * 4)
    rows = {row["figure"]: row["agree"] for row in agreement(data, faster)}
    assert rows["relief decode 8 tok/s"] is False and rows["relief prefill 16 tok/s"] is True
    assert "| prefill 16 tok/s |" in markdown(data)


def test_json_keeps_the_command_and_the_memory_breakdown(compared):
    result, data, _ = compared
    assert data["command"].startswith("relief bench --preset mini") and "--compare mlx-lm" in data["command"]
    memory = data["training"]["memory"]
    for part in ("weights", "activations", "loss_head", "lora_state"):
        assert memory["forecast"][part] > 0 and memory["measured"][part] > 0, part
    assert memory["measured"]["weights"] == data["model"]["weights_bytes"] or memory["measured"]["weights"] > 0
    assert memory["measured"]["peak"] >= memory["measured"]["weights"]
    assert "relief LoRA step memory, GiB" in result.output and "allocator cache" in result.output


def test_pooled_runs_summarize_every_trial_of_every_run(compared):
    import copy

    from relief_mlx.bench.report import markdown, pool_runs

    _, data, _ = compared
    runs = [copy.deepcopy(data) for _ in range(3)]
    for k, run in enumerate(runs):
        speed = run["generation"]["runners"]["relief"]["decode"][0]["tokens_per_s"]
        speed["trials"] = [(k + 1) * t for t in speed["trials"]]
        run["model"]["build_s"] = 10.0 * k
    runs[1]["bandwidth"]["limit_gbps"] *= 4  # the best run's limit is the machine's
    pooled = pool_runs(runs)
    decode = pooled["generation"]["runners"]["relief"]["decode"][0]
    (t,) = data["generation"]["runners"]["relief"]["decode"][0]["tokens_per_s"]["trials"]
    assert decode["tokens_per_s"] == {"median": 2 * t, "min": t, "max": 3 * t, "trials": [t, 2 * t, 3 * t]}
    assert pooled["model"]["build_s"] == 10.0 and pooled["config"]["trials"] == 3 and pooled["runs"] == 3
    assert pooled["bandwidth"]["limit_gbps"] == 4 * data["bandwidth"]["limit_gbps"]
    assert decode["bandwidth_fraction"] == pytest.approx(
        2 * t * decode["bytes_per_token"]["total"] / (pooled["bandwidth"]["limit_gbps"] * 1e9))
    assert "median (min-max) of 3 trials in 3 runs (processes)" in markdown(pooled)
