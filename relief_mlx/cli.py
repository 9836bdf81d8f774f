"""The `relief` command: each subcommand parses options, calls one library function, prints."""

from __future__ import annotations

import sys

import click

from .errors import ReliefError


class _Group(click.Group):
    """Turns a ReliefError into one line on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ReliefError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="relief-mlx")
def cli() -> None:
    """Fine-tune gpt-oss into an emergency-relief assistant with MLX, and run it."""


def main() -> None:
    from .blas import ensure_fast_blas

    ensure_fast_blas()
    cli()
