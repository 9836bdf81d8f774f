"""The `relief` command as a whole: an option name means one thing in every command."""

from __future__ import annotations

from collections import defaultdict

import click

from relief_mlx.cli import cli


def _commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    out = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out |= _commands(command, f"{prefix}{name} ")
        else:
            out[prefix + name] = command
    return out


def test_an_option_name_offers_the_same_choices_in_every_command():
    """Regression: --experts was auto|mxfp4|bfloat16|float32 in convert but mxfp4|dense in bench,
    --preset free text, --tokenizer an alias of --model."""
    uses = defaultdict(dict)
    for name, command in _commands(cli).items():
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in param.opts:
                    uses[opt][name] = param
    for opt, by_command in uses.items():
        choices = {tuple(p.type.choices) if isinstance(p.type, click.Choice) else None for p in by_command.values()}
        assert len(choices) == 1, f"{opt}: {choices}"
    for opt in ("--preset", "--experts", "--dtype", "--mask", "--reasoning"):
        assert all(isinstance(p.type, click.Choice) for p in uses[opt].values()), opt
    for name, param in uses["--tokenizer"].items():
        assert param.opts == ["--tokenizer"], name
    for name, param in uses["--out"].items():  # a folder, or the one file a command writes: the help says which
        assert param.help.startswith(("Folder", "File")), name
