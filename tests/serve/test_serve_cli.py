"""`relief serve`'s bad input: one line naming the problem, exit 1, before anything is served."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from relief_mlx.cli import cli
from relief_mlx.errors import ReliefError
from relief_mlx.serve import adapter_names


@pytest.mark.parametrize(("args", "message"), [
    (["--adapter", "missing/run"], "adapter missing/run does not exist"),
    (["--adapter", "=runs/x"], "is not NAME=PATH or PATH"),
    (["--max-batch", "0"], "max-batch 0 is not valid"),
    (["--max-body-mb", "0"], "max-body-mb 0.0 is not valid"),
    (["--api-key", " "], "the API key is empty"),
])
def test_bad_options_fail_in_one_line(mini_mlx, args, message):
    result = CliRunner().invoke(cli, ["serve", "--model", str(mini_mlx), *args])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("error: ") and message in result.output


def test_adapter_ids_are_unique_and_default_to_the_path():
    assert adapter_names("base", ["runs/a/", "b=runs/b"]) == {"runs/a": "runs/a/", "b": "runs/b"}
    for specs in (["base=runs/a"], ["x=runs/a", "x=runs/b"]):
        with pytest.raises(ReliefError, match="is taken"):
            adapter_names("base", specs)


def test_help_names_the_loopback_default():
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0 and "127.0.0.1" in result.output and "--api-key" in result.output
