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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def doctor(as_json: bool) -> None:
    """Report the backend, versions, memory and BLAS MLX gets here, and a measured matmul speed."""
    import json

    from .doctor import diagnose, format_table

    info = diagnose()
    click.echo(json.dumps(info, indent=2) if as_json else format_table(info))


def _progress(label: str):
    """A click progress bar on stderr, driven by a library's (done, total, item) callback."""
    state: dict = {}

    def update(done: int, total: int, item: str) -> None:
        if "bar" not in state:
            state["bar"] = click.progressbar(length=total, label=label, file=sys.stderr,
                                             item_show_func=lambda _: item, show_pos=True)
            state["bar"].__enter__()
            state["done"] = 0
        state["bar"].update(done - state["done"])
        state["done"] = done
        if done >= total:
            state.pop("bar").__exit__(None, None, None)

    return update


@cli.command()
@click.option("--preset", default="mini", show_default=True, help="mini, gpt-oss-20b-2l, gpt-oss-20b-6l or gpt-oss-20b.")
@click.option("--out", required=True, type=click.Path(), help="Folder to write (must not exist or be empty).")
@click.option("--seed", default=0, show_default=True, help="Random seed for the weights.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out once the new folder is complete.")
def synth(preset: str, out: str, seed: int, overwrite: bool) -> None:
    """Write a random-weight gpt-oss checkpoint in the exact Hugging Face layout."""
    from .checkpoint.synth import synth as run

    click.echo(f"synthesized -> {run(preset, out, seed=seed, overwrite=overwrite, progress=_progress('synth'))}")


@cli.command()
@click.argument("src")
@click.option("--out", required=True, type=click.Path(), help="Folder to write (must not exist or be empty).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when SRC is a Hub id.")
@click.option("--experts", type=click.Choice(["auto", "mxfp4", "bfloat16", "float32"]), default="auto", show_default=True,
              help="Expert weights: keep MXFP4 (auto for MXFP4 sources), or dequantize; float32 is what MLX's CPU gather_mm needs.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="dtype of every non-expert weight.")
@click.option("--verify", is_flag=True, help="Compare the converted model's logits with a float reference from SRC.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out once the new folder is complete.")
def convert(src: str, out: str, revision: str | None, experts: str, dtype: str, verify: bool, overwrite: bool) -> None:
    """Convert a Hugging Face gpt-oss checkpoint (folder or Hub id) to MLX."""
    from .checkpoint import convert as conv

    path = conv.convert(src, out, revision=revision, experts=experts, dtype=dtype, overwrite=overwrite,
                        progress=_progress("convert"))
    click.echo(f"converted -> {path}")
    if verify:
        r = conv.verify(src, path)
        click.echo(f"verify: {r['layers']} layers x {r['tokens']} tokens, max relative logit error "
                   f"{r['max_relative_error']:.2e}, argmax agreement {r['argmax_agreement']:.1%}")
        if r["max_relative_error"] > 1e-3 and dtype != "float16":
            raise ReliefError(f"verification failed: {out} differs from {src}; report this with the manifest")


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(model: str, as_json: bool) -> None:
    """Architecture, parameter counts and memory of MODEL (folder, Hub id or preset), no weights loaded."""
    import json

    from .checkpoint.inspect import inspect_model

    info = inspect_model(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['source']}")
    for k, v in info["architecture"].items():
        click.echo(f"  {k:<22} {v}")
    click.echo("parameters")
    for k, v in info["parameters"].items():
        click.echo(f"  {k:<22} {v:>16,}")
    click.echo("weights in memory")
    for k, v in info["memory_bytes"].items():
        click.echo(f"  {k:<34} {v / 2**30:>8.2f} GiB")


# --- data (relief_mlx.data) ---------------------------------------------------------------
@cli.group()
def data() -> None:
    """Check and inspect JSON Lines datasets (file, folder of splits or Hub dataset id)."""


_TOKENIZER_HELP = "Folder with tokenizer.json (e.g. a converted model); default: o200k_harmony."


@data.command("check")
@click.argument("path")
@click.option("--max-length", default=2048, show_default=True, help="Token budget per example.")
@click.option("--tokenizer", "--model", "tokenizer", type=click.Path(), help=_TOKENIZER_HELP)
@click.option("--skip-invalid", is_flag=True, help="Skip bad lines and count them.")
@click.option("--mask-mode", type=click.Choice(["final", "last", "final+analysis", "all"]),
              default="final", show_default=True, help="Which tokens are trained.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def data_check(ctx: click.Context, path: str, max_length: int, tokenizer: str | None,
               skip_invalid: bool, mask_mode: str, as_json: bool) -> None:
    """Validate PATH, count splits and categories, and look for duplicates and leakage."""
    import json

    from .data.check import check_dataset

    report = check_dataset(path, max_length, tokenizer, skip_invalid, mask_mode)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else "\n".join(report.lines()))
    if not report.ok:
        ctx.exit(1)


@data.command("show")
@click.argument("path")
@click.option("--index", required=True, type=int, help="Example number in the split, from 0.")
@click.option("--split", default=None, help="Split to read (default: train, else the first).")
@click.option("--max-length", default=2048, show_default=True, help="Token budget per example.")
@click.option("--tokenizer", "--model", "tokenizer", type=click.Path(), help=_TOKENIZER_HELP)
@click.option("--mask-mode", type=click.Choice(["final", "last", "final+analysis", "all"]),
              default="final", show_default=True, help="Which tokens are trained.")
def data_show(path: str, index: int, split: str | None, max_length: int, tokenizer: str | None,
              mask_mode: str) -> None:
    """Print one example as rendered for training, trained text marked."""
    from .data.check import show_example

    report = show_example(path, index, split, max_length, tokenizer, mask_mode)
    click.echo("\n".join(report.lines()))
# --- end data -------------------------------------------------------------------------------
