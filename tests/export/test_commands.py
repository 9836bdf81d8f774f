"""`relief fuse` and `relief export` on bad input: one line that names the input and the fix,
exit code 1, nothing written (and nothing already there lost)."""

import json
import shutil

import mlx.core as mx
import pytest
from click.testing import CliRunner
from export_helpers import write_adapter

from relief_mlx.cli import cli


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output.strip()


def _assert_one_line_error(code, output, *words):
    assert code == 1, output
    assert output.startswith("error: ") and "\n" not in output and "Traceback" not in output
    for word in words:
        assert word in output, output


@pytest.fixture
def broken(qv_adapter, tmp_path):
    """A writable copy of the q/v adapter to damage."""
    return shutil.copytree(qv_adapter, tmp_path / "broken")


def _rewrite(adapter, change):
    file = adapter / "adapters.safetensors"
    tensors = dict(mx.load(str(file)))
    change(tensors)
    mx.save_safetensors(str(file), tensors)


@pytest.mark.parametrize("command", ["fuse", "export"])
def test_adapter_from_a_deeper_model(command, mini_mlx, broken, tmp_path):
    def deeper(tensors):
        for leaf in ("lora_a", "lora_b"):
            tensors[f"model.layers.9.self_attn.q_proj.{leaf}"] = tensors[f"model.layers.0.self_attn.q_proj.{leaf}"]

    _rewrite(broken, deeper)
    extra = ("--format", "hf") if command == "export" else ()
    _assert_one_line_error(*_run(command, "--model", mini_mlx, "--adapter", broken, "--out", tmp_path / "o", *extra),
                           "model.layers.9.self_attn.q_proj", "another model")
    assert not (tmp_path / "o").exists()


def test_adapter_from_a_wider_model(mini_mlx, broken, tmp_path):
    _rewrite(broken, lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_a": mx.zeros((2880, 4))}))
    _assert_one_line_error(*_run("fuse", "--model", mini_mlx, "--adapter", broken, "--out", tmp_path / "o"),
                           "model.layers.0.self_attn.q_proj", "(256, 128)", "another model")


def test_rank_mismatch(mini_mlx, broken, tmp_path):
    config = json.loads((broken / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 8
    (broken / "adapter_config.json").write_text(json.dumps(config))
    _assert_one_line_error(*_run("export", "--model", mini_mlx, "--adapter", broken, "--format", "peft",
                                 "--out", tmp_path / "o"), "rank 4", "rank 8")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [("fuse",), ("export", "--format", "gguf")])
def test_an_existing_output_is_left_alone(args, mini_mlx, qv_adapter, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _assert_one_line_error(*_run(*args, "--model", mini_mlx, "--adapter", qv_adapter, "--out", out),
                           "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_router_lora_has_no_peft_form(mini_mlx, tmp_path):
    adapter = write_adapter(mini_mlx, tmp_path / "router", ("self_attn.q_proj", "mlp.router"))
    _assert_one_line_error(*_run("export", "--model", mini_mlx, "--adapter", adapter, "--format", "peft",
                                 "--out", tmp_path / "o"), "mlp.router", "--format hf")
    assert not (tmp_path / "o").exists()


def test_requantizing_needs_the_loss_accepted(mini_mlx, expert_adapter, tmp_path):
    _assert_one_line_error(*_run("fuse", "--model", mini_mlx, "--adapter", expert_adapter, "--out", tmp_path / "o",
                                 "--requantize"), "relative error of", "--accept-requantize-loss")
    _assert_one_line_error(*_run("fuse", "--model", mini_mlx, "--adapter", expert_adapter, "--out", tmp_path / "o",
                                 "--accept-requantize-loss"), "goes with --requantize")
    _assert_one_line_error(*_run("fuse", "--model", mini_mlx, "--adapter", expert_adapter, "--out", tmp_path / "o",
                                 "--requantize", "--keep-adapter-for-experts"), "exclude each other")
    assert not list(tmp_path.iterdir())


def test_a_kept_adapter_is_not_silently_dropped(mini_mlx, expert_adapter, tmp_path):
    code, output = _run("fuse", "--model", mini_mlx, "--adapter", expert_adapter, "--out", tmp_path / "fused",
                        "--keep-adapter-for-experts")
    assert code == 0 and "kept adapter ->" in output and "fused ->" in output, output
    _assert_one_line_error(*_run("export", "--model", tmp_path / "fused", "--format", "gguf", "--out", tmp_path / "o"),
                           "--adapter", "fused/adapter")
    assert not (tmp_path / "o").exists()


def test_not_an_adapter(mini_mlx, tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(*_run("fuse", "--model", mini_mlx, "--adapter", tmp_path / "empty", "--out", tmp_path / "o"),
                           "adapter_config.json")
