"""The `relief` command: each subcommand parses options, calls one library function, prints.

Options mean one thing across commands: `--out` is what the command writes, a folder, except where
the output is one file (`bench --out r.json`, the chart beside it; `generate --answers` names its
JSONL for what it holds); `--model` is a
converted model, `--tokenizer` a folder holding tokenizer.json; `--preset`, `--experts`,
`--dtype`, `--mask` and `--reasoning` offer the same choices everywhere (`relief_mlx.choices`);
`--recipe` is a recipe file or a bundled recipe's name.
"""

from __future__ import annotations

import sys
import warnings

import click

from .checkpoint.presets import PRESETS
from .choices import DTYPES, EXPERT_FORMATS, MASK_MODES, REASONING_EFFORTS
from .errors import ReliefError, ReliefWarning

# Commands that finish in seconds whatever the BLAS; every other one gets the slow-BLAS notice.
_QUICK = ("doctor", "inspect", "data", "synth", "convert")


class _Group(click.Group):
    """Turns a ReliefError into one line on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ReliefError as e:
            click.echo(f"error: {one_line(str(e))}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="relief-mlx")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Fine-tune gpt-oss into an emergency-relief assistant with MLX, and run it."""
    _one_line_warnings()
    if ctx.invoked_subcommand not in _QUICK and (line := _slow_blas_notice()):
        click.echo(line, err=True)


def _slow_blas_notice() -> str | None:
    import os

    from . import blas

    return blas.slow_blas_notice(os.environ, system=sys.platform, reference_blas=blas.mlx_uses_reference_blas,
                                 candidates=blas.candidate_paths())


def main() -> None:
    from .blas import ensure_fast_blas

    ensure_fast_blas()
    _stop_on_sigterm()
    cli()


# --- safety (relief_mlx.io: warnings and signals) ------------------------------------------
def one_line(message: str, limit: int = 2000) -> str:
    """An error or warning as one printable line: what hostile input put in it (a line break in a
    key, a megabyte of value) is escaped or cut, never echoed raw."""
    text = message.encode("unicode_escape").decode("ascii") if not message.isprintable() else message
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line_warnings() -> None:
    """A ReliefWarning (a stale lock taken over, a damaged checkpoint passed over) prints as one
    line on stderr, like an error; other warnings keep Python's format."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ReliefWarning):
            click.echo(f"warning: {one_line(str(message))}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", ReliefWarning)


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C (`relief train` installs its own handler and checkpoints first),
    so every writer removes its partial output on the way out: exit 143, one line."""
    import signal

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends at once
        click.echo("stopped by SIGTERM", err=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
# --- end safety -----------------------------------------------------------------------------


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
@click.option("--preset", type=click.Choice(list(PRESETS)), default="mini", show_default=True,
              help="Shapes of the checkpoint (`relief inspect PRESET` describes one).")
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
@click.option("--experts", type=click.Choice(EXPERT_FORMATS), default="auto",
              show_default=True, help="Expert weights: keep MXFP4 (auto for MXFP4 sources), or dequantize; "
              "float32 is what MLX's CPU gather_mm needs.")
@click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True,
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
        if not r["ok"]:
            raise ReliefError(f"verification failed: the logits of {path} differ from a reference built from {src} "
                              f"by {r['max_relative_error']:.2e} (relative; tolerance {r['tolerance']:.0e}), so the "
                              f"conversion is wrong: report it with {path / conv.MANIFEST}")


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--recipe", type=click.Path(), help="A training recipe: also count the LoRA parameters it trains.")
def inspect(model: str, as_json: bool, recipe: str | None) -> None:
    """Architecture, parameter counts and memory of MODEL (folder, Hub id or preset), no weights loaded."""
    import json

    from .checkpoint.inspect import inspect_model

    info = inspect_model(model)
    if recipe:  # train (relief_mlx.train)
        from .checkpoint.inspect import model_config
        from .recipe import load_recipe
        from .train.targets import lora_summary

        info["lora"] = lora_summary(model_config(model)[0], load_recipe(recipe))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['source']}")
    for k, v in info["architecture"].items():
        click.echo(f"  {k:<22} {v}")
    click.echo("parameters")
    for k, v in info["parameters"].items():
        click.echo(f"  {k:<22} {v:>16,}")
    limit, where = info["available"]["bytes"], info["available"]["source"]
    click.echo("weights in memory" + (f" (this machine: {limit / 2**30:,.1f} GiB, {where})" if limit else ""))
    for k, v in info["memory_bytes"].items():
        click.echo(f"  {k:<34} {v / 2**30:>8.2f} GiB" + ("  does not fit" if limit and v > limit else ""))
    if "lora" in info:
        lora = info["lora"]
        click.echo(f"LoRA of {recipe}: {lora['trainable']:,} trainable of {lora['total']:,} ({lora['percent']:.4f}%)")


# --- data (relief_mlx.data) ---------------------------------------------------------------
@cli.group()
def data() -> None:
    """Check and inspect JSON Lines datasets (file, folder of splits or Hub dataset id)."""


_TOKENIZER_HELP = "Folder with tokenizer.json (e.g. a converted model); default: o200k_harmony."


def _data_options(f):
    """What `data check` and `data show` share: the recipe's data settings, each overridable."""
    options = [
        click.argument("path", required=False),
        click.option("--recipe", help="Take data.path, max_length, mask, reasoning_effort, current_date and "
                                      "skip_invalid from this recipe (file or bundled name), as training would."),
        click.option("--max-length", type=click.IntRange(min=2),
                     help="Token budget per example [default: the recipe's, else 512]."),
        click.option("--mask", type=click.Choice(MASK_MODES),
                     help="Which tokens are trained, as the recipe's data.mask [default: the recipe's, else final]."),
        click.option("--tokenizer", type=click.Path(), help=_TOKENIZER_HELP),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _data_section(path: str | None, recipe: str | None, max_length: int | None, mask: str | None):
    """The recipe's [data] section (or its defaults), PATH and the options given over it."""
    import dataclasses

    from .recipe import DataSection, load_recipe

    data = load_recipe(recipe).data if recipe else DataSection()
    if path is None and recipe is None:
        raise ReliefError("pass a dataset PATH (file, folder, bundled name or Hub id) or --recipe FILE")
    changes = {"path": path, "max_length": max_length, "mask": mask}
    return dataclasses.replace(data, **{k: v for k, v in changes.items() if v is not None})


@data.command("check")
@_data_options
@click.option("--skip-invalid", is_flag=True, help="Skip bad lines and count them [default: the recipe's].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def data_check(ctx: click.Context, path: str | None, recipe: str | None, max_length: int | None, mask: str | None,
               tokenizer: str | None, skip_invalid: bool, as_json: bool) -> None:
    """Validate PATH (scoring fields too), count splits and categories, and look for duplicates,
    scenario leakage between splits and reading-history phrases in answers."""
    import json

    from .data.check import check_dataset
    from .data.harmony import RenderOptions

    d = _data_section(path, recipe, max_length, mask)
    report = check_dataset(d.path, d.max_length, tokenizer, skip_invalid or d.skip_invalid, d.mask,
                           RenderOptions.of(d))
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else "\n".join(report.lines()))
    if not report.ok:
        ctx.exit(1)


@data.command("show")
@_data_options
@click.option("--index", required=True, type=int, help="Example number in the split, from 0.")
@click.option("--split", default=None, help="Split to read (default: train, else the first).")
def data_show(path: str | None, recipe: str | None, max_length: int | None, mask: str | None,
              tokenizer: str | None, index: int, split: str | None) -> None:
    """Print one example as rendered for training, trained text marked."""
    from .data.check import show_example
    from .data.harmony import RenderOptions

    d = _data_section(path, recipe, max_length, mask)
    report = show_example(d.path, index, split, d.max_length, tokenizer, d.mask, RenderOptions.of(d))
    click.echo("\n".join(report.lines()))
# --- end data -------------------------------------------------------------------------------


# --- generate / chat (relief_mlx.generate) --------------------------------------------------
def _generation_options(f):
    """Options shared by `generate` and `chat`; they map 1:1 to GenerateConfig / SamplingConfig."""
    options = [
        click.option("--model", required=True, help="Converted checkpoint folder or Hub id."),
        click.option("--adapter", type=click.Path(),
                     help="LoRA adapter: a run folder, its best/ or checkpoint/, or a weights file."),
        click.option("--system", help="Instructions, rendered as the developer message."),
        click.option("--max-tokens", default=1024, show_default=True,
                     help="Most tokens to generate, reasoning included."),
        click.option("--reasoning", type=click.Choice(REASONING_EFFORTS), default="medium", show_default=True,
                     help="Reasoning effort in the system message."),
        click.option("--temperature", default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass; 1 is off."),
        click.option("--top-k", default=0, show_default=True, help="Keep the k most likely tokens; 0 is off."),
        click.option("--min-p", default=0.0, show_default=True,
                     help="Drop tokens below min-p x the top probability; 0 is off."),
        click.option("--repetition-penalty", default=1.0, show_default=True, help="1 is off."),
        click.option("--repetition-context", default=64, show_default=True, help="Tokens the penalty looks back on."),
        click.option("--seed", type=int, help="Seed for sampling (reproducible draws; needs --temperature above 0)."),
        click.option("--show-reasoning", is_flag=True, help="Also print the analysis (and commentary), dimmed."),
        click.option("--moe-stats", is_flag=True, help="Report expert routing per layer, prompt and answer apart."),
        click.option("--check-routing", is_flag=True, help="Assert routing invariants at every step (slower)."),
        click.option("--prefill-chunk", default=512, show_default=True, help="Prompt tokens per forward pass."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _generate_config(o: dict, logprobs: bool = False):
    from .generate import GenerateConfig, SamplingConfig

    if o["seed"] is not None and o["temperature"] == 0:
        raise ReliefError(f"--seed {o['seed']} has nothing to seed: --temperature 0 is greedy, with no random "
                          "draws; set --temperature above 0 or drop --seed")

    sampling = SamplingConfig(temperature=o["temperature"], top_p=o["top_p"], top_k=o["top_k"], min_p=o["min_p"],
                              repetition_penalty=o["repetition_penalty"],
                              repetition_context=o["repetition_context"], seed=o["seed"])
    return GenerateConfig(max_tokens=o["max_tokens"], reasoning=o["reasoning"], sampling=sampling,
                          logprobs=logprobs, prefill_chunk=o["prefill_chunk"], moe_stats=o["moe_stats"],
                          check_routing=o["check_routing"])


class _DeltaPrinter:
    """Streams parsed text: the final answer plain; other channels dimmed and labelled, if shown."""

    def __init__(self, show_reasoning: bool):
        self.show_reasoning = show_reasoning
        self.channel: str | None = "<none yet>"

    def __call__(self, delta) -> None:
        hidden = delta.channel != "final"
        if hidden and not self.show_reasoning:
            return
        if delta.channel != self.channel:
            if self.channel != "<none yet>":
                click.echo()
            if hidden:
                click.echo(click.style(f"[{delta.channel or 'no channel'}] ", dim=True, bold=True), nl=False)
            self.channel = delta.channel
        click.echo(click.style(delta.text, dim=True) if hidden else delta.text, nl=False)


def _load_engine(o: dict):
    """The model (and adapter) of `generate` / `chat`, saying so first: a 13 GB load takes a while."""
    from .generate import Engine

    with_adapter = f" with adapter {o['adapter']}" if o["adapter"] else ""
    click.echo(f"loading {o['model']}{with_adapter} ...", err=True)
    return Engine.load(o["model"], o["adapter"])


def _after_answer(reply, show_reasoning: bool) -> None:
    """End the streamed line; say on stderr why nothing was printed, when nothing was."""
    click.echo()
    if not reply.final:
        hints = ["more --max-tokens" if reply.finish_reason in ("length", "context") else None,
                 None if show_reasoning else "--show-reasoning", "--raw"]
        click.echo(f"no final answer: {reply.generated_tokens} tokens ({reply.finish_reason}) without a final "
                   f"message; try {' or '.join(h for h in hints if h)}", err=True)


@cli.command()
@_generation_options
@click.option("--prompt", help="One prompt; the answer streams to the terminal.")
@click.option("--prompts", "prompts_file", type=click.Path(), help="JSONL of prompts ({\"prompt\"} or {\"messages\"}).")
@click.option("--answers", type=click.Path(dir_okay=False),
              help="JSONL file of the --prompts answers, written atomically.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts of --prompts decoded together (one forward pass per step for all).")
@click.option("--logprobs", is_flag=True, help="Keep per-token log-probabilities (printed, or in --answers).")
@click.option("--raw", is_flag=True, help="Stream the generated tokens as text, Harmony tokens included.")
def generate(prompt, prompts_file, answers, batch_size, logprobs, raw, **o) -> None:
    """Answer a prompt (or a JSONL file of prompts) with a model and optional LoRA adapter."""
    from mlx_lm.generate import wired_limit

    from .generate.batch import answer_file, conversation
    from .generate.chat import stats_text
    from .generate.engine import answer

    if (prompt is None) == (prompts_file is None) or (prompts_file is None) != (answers is None):
        raise ReliefError("pass either --prompt TEXT, or --prompts FILE.jsonl with --answers FILE.jsonl")
    if prompts_file is not None and (raw or o["show_reasoning"]):
        raise ReliefError(f"{'--raw' if raw else '--show-reasoning'} shapes what one --prompt prints; --prompts "
                          "writes every channel to --answers: drop it")
    config = _generate_config(o, logprobs)
    messages = conversation(prompt, o["system"]) if prompt is not None else None
    engine = _load_engine(o)
    with wired_limit(engine.model):  # on Metal: keep the model's memory wired (mlx-lm's mechanism)
        if prompts_file is not None:
            _answer_prompts(engine, prompts_file, answers, config, batch_size, answer_file)
            return
        if raw:
            reply = answer(engine, messages, config, on_text=lambda text: click.echo(text, nl=False))
            click.echo()
        else:
            reply = answer(engine, messages, config, on_delta=_DeltaPrinter(o["show_reasoning"]))
            _after_answer(reply, o["show_reasoning"])
    if logprobs:
        for token, lp in zip(reply.tokens, reply.logprobs, strict=True):
            click.echo(f"{token}\t{engine.harmony.decode([token])!r}\t{lp:.4f}", err=True)
    click.echo(click.style(stats_text(reply), dim=True), err=True)


def _answer_prompts(engine, prompts_file: str, answers: str, config, batch_size: int, answer_file) -> None:
    def progress(line, reply, error):
        click.echo(f"{prompts_file}:{line}: " + (f"error: {error}" if error else
                   f"{reply.generated_tokens} tokens, {reply.decode_tps:.1f} tokens/s"), err=True)

    result = answer_file(engine, prompts_file, answers, config, batch_size, on_answer=progress)
    click.echo(f"answers -> {result.out} ({result.answered} answered, {len(result.failed)} failed)")
    if result.failed:
        line, reason = result.failed[0]
        raise ReliefError(f"{len(result.failed)} line(s) of {prompts_file} got no answer, first line {line}: "
                          f"{reason}; fix them and run again")


@cli.command()
@_generation_options
def chat(**o) -> None:
    """Talk to a model turn by turn (/help lists the commands)."""
    from mlx_lm.generate import wired_limit

    from .generate.chat import QUIT, ChatSession

    config = _generate_config(o)
    session = ChatSession(_load_engine(o), config, o["system"])
    click.echo(f"chatting with {o['model']}: /help for commands, Ctrl-D to leave")
    with wired_limit(session.engine.model):  # on Metal: keep the model's memory wired (mlx-lm's mechanism)
        _chat_loop(session, o["show_reasoning"], QUIT)


def _chat_loop(session, show_reasoning: bool, quit_marker) -> None:
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            break
        if line.startswith("/"):
            shown = session.command(line)
            if shown is quit_marker:
                break
            click.echo(shown)
            continue
        try:
            reply = session.ask(line, on_delta=_DeltaPrinter(show_reasoning))
        except ReliefError as e:
            click.echo(f"error: {e}", err=True)
            continue
        except KeyboardInterrupt:
            click.echo("\n(interrupted; the turn is forgotten)", err=True)
            continue
        _after_answer(reply, show_reasoning)
# --- end generate / chat --------------------------------------------------------------------


# --- demo (relief_mlx.demo) ----------------------------------------------------------------
@cli.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(),
              help="Folder for the demo's model, converted model and adapter (reused when complete).")
@click.option("--recipe", default="recipes/mini.toml", show_default=True,
              help="Recipe file; a bundled name (recipes/mini.toml) works from any folder.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe value (repeatable), e.g. --set train.iterations=5.")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="Tokens each of the two answers may generate.")
def demo(out: str, recipe: str, overrides: tuple[str, ...], max_tokens: int) -> None:
    """Synthesize a mini gpt-oss, convert it, train LoRA on the bundled data, answer with and without it."""
    from .demo import run_demo
    from .eval.report import event_line as eval_line
    from .train.report import event_line, step_line, summary_lines

    def show(kind: str, event: dict) -> None:
        if kind == "step":
            click.echo("    " + step_line(event), err=True)
        elif kind == "done":
            click.echo("\n".join("    " + line for line in summary_lines(event)), err=True)
        elif kind in ("load", "compile") and (line := event_line(kind, event)):
            click.echo("    " + line, err=True)

    def show_eval(kind: str, event: dict) -> None:
        if kind != "done" and (line := eval_line(kind, event)):
            click.echo("    " + line, err=True)

    result = run_demo(out, recipe, say=lambda line: click.echo(line, err=True), train_event=show,
                      max_tokens=max_tokens, overrides=overrides, eval_event=show_eval)
    curve = " ".join(f"{loss:.2f}" for _, loss in result["summary"]["loss_curve"])
    click.echo(f"train loss by step: {curve}")
    for name, reply in result["answers"].items():
        channel = "final channel" if reply["final_channel"] else "raw tokens: no final channel"
        click.echo(f"--- {name} ({channel}, {reply['decode_tps']:.1f} tokens/s)\n{reply['text'].strip()}")
    click.echo("\n".join(result["eval"]["sentences"]) + f"\neval report -> {result['eval']['report']}")
    click.echo(f"adapters -> {result['adapter']}")
# --- end demo -------------------------------------------------------------------------------


# --- train (relief_mlx.train) ---------------------------------------------------------------
@cli.command()
@click.argument("recipe", required=False, type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe value (repeatable), e.g. --set train.learning_rate=2e-4.")
@click.option("--resume", type=click.Path(), help="Continue the run folder RUN_DIR where its checkpoint left off.")
@click.option("--overwrite", is_flag=True, help="Start over in an output.dir that already holds a run (its files "
              "are deleted).")
def train(recipe: str | None, overrides: tuple[str, ...], resume: str | None, overwrite: bool) -> None:
    """Fine-tune with LoRA as RECIPE (a TOML file, e.g. recipes/mini.toml) says; prints the run folder."""
    from .recipe import load_recipe
    from .train import resume_recipe
    from .train import train as run
    from .train.report import event_line, step_line, summary_lines

    if resume is None and recipe is None:
        raise ReliefError("pass a recipe (e.g. recipes/mini.toml) or --resume RUN_DIR")
    if resume and overwrite:
        raise ReliefError("--resume continues a run and --overwrite starts one over; pass one of them")
    resolved = resume_recipe(resume, recipe, overrides) if resume else load_recipe(recipe, overrides)
    live = sys.stderr.isatty()

    def show(kind: str, event: dict) -> None:
        if kind == "step":
            click.echo(("\r" if live else "") + step_line(event), err=True, nl=not live)
        elif kind == "done":
            click.echo("\n".join([""] * live + summary_lines(event)), err=True)
        elif line := event_line(kind, event):
            click.echo(("\n" if live and kind != "start" else "") + line, err=True)

    result = run(resolved, resume=resume, on_event=show, overwrite=overwrite)
    click.echo(f"adapters -> {result.run_dir}")
    if result.status == "interrupted":
        click.echo(f"interrupted at step {result.summary['steps']}; continue with "
                   f"`relief train --resume {result.run_dir}`", err=True)
        sys.exit(130)
# --- end train ------------------------------------------------------------------------------


# --- bench (relief_mlx.bench) ---------------------------------------------------------------
def _lengths(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of whole numbers, e.g. 128,512") from None


@cli.command()
@click.option("--model", help="Converted checkpoint folder or Hub id.")
@click.option("--preset", type=click.Choice(list(PRESETS)),
              help="Instead of --model: random weights at a preset's shapes, in memory.")
@click.option("--experts", type=click.Choice(EXPERT_FORMATS),
              help="A preset's experts: mxfp4 (as published; auto is the same) or dequantized to the dtype the "
                   "model runs in (--dtype) [default: mxfp4].")
@click.option("--shared-experts", is_flag=True,
              help="Every layer holds layer 0's dense experts: a deep float32 model timed in less memory.")
@click.option("--dtype", type=click.Choice(DTYPES),
              help="Float weights [default: the backend's: float32 on the CPU, bfloat16 on GPUs].")
@click.option("--prompt-lengths", default="128,512,2048", show_default=True, callback=_lengths,
              help="Prompt lengths whose prefill is timed; decode follows the shortest.")
@click.option("--gen-lengths", default="128,512", show_default=True, callback=_lengths,
              help="Generated tokens whose decode is timed.")
@click.option("--trials", default=3, show_default=True, help="Timed trials per figure (median and min-max).")
@click.option("--prefill-chunk", default=512, show_default=True, help="Prompt tokens per forward pass, both loops.")
@click.option("--recipe", type=click.Path(dir_okay=False),
              help="Recipe whose [lora] and [train] shape the training step [default: the seed replica's].")
@click.option("--train-seq", type=int,
              help="Tokens per training sequence [default: the recipe's max_length, else 512].")
@click.option("--no-training", is_flag=True, help="Time generation only.")
@click.option("--compare", type=click.Choice(["mlx-lm"]), multiple=True,
              help="Also run mlx-lm's generation and LoRA step on the same model, with ratios.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights, prompts and LoRA.")
@click.option("--bandwidth-mib", type=int,
              help="Largest array the bandwidth probe reads, MiB (also half and a quarter of it) "
                   "[default: 16x the last-level cache, at least 256 MiB; 2 GiB on a GPU].")
@click.option("--out", type=click.Path(dir_okay=False),
              help="File to write the results to as JSON; the chart goes beside it (.png).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Chart file [default: --out with .png].")
def bench(model: str | None, preset: str | None, experts: str | None, shared_experts: bool, dtype: str | None,
          prompt_lengths: tuple[int, ...],
          gen_lengths: tuple[int, ...], trials: int, prefill_chunk: int, recipe: str | None, train_seq: int | None,
          no_training: bool, compare: tuple[str, ...], seed: int, bandwidth_mib: int | None, out: str | None,
          plot_path: str | None) -> None:
    """Tokens/s and memory of generation and LoRA training, against the machine's bandwidth.

    Exits 1, after writing everything, when a decode reads faster than the measured bandwidth
    limit: that is an error in the measurement, not a result."""
    from pathlib import Path

    from .bench import BenchConfig, run_bench
    from .bench.memory import MeasurementError
    from .bench.report import format_table, measurement_errors, plot, write

    config = BenchConfig(model=model, preset=preset, experts=experts, shared_experts=shared_experts, dtype=dtype,
                         prompt_lengths=prompt_lengths,
                         gen_lengths=gen_lengths, trials=trials, prefill_chunk=prefill_chunk,
                         training=not no_training, recipe=recipe, train_seq=train_seq, compare=compare, seed=seed,
                         bandwidth_mib=bandwidth_mib)
    result = run_bench(config, say=lambda message: click.echo(f"bench: {message}", err=True))
    click.echo(format_table(result))
    if out:
        click.echo(f"results -> {write(result, out)}")
    plot_path = plot_path or (str(Path(out).with_suffix(".png")) if out else None)
    if plot_path:
        click.echo(f"chart -> {plot(result, plot_path)}")
    errors = measurement_errors(result)
    if errors:
        raise MeasurementError(errors[0] + (f" ({len(errors) - 1} more decode figures too)" if len(errors) > 1 else ""))
# --- end bench ------------------------------------------------------------------------------


# --- eval (relief_mlx.eval) -------------------------------------------------------------------
@cli.command("eval")
@click.option("--model", required=True, help="Converted checkpoint folder or Hub id.")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(),
              help="LoRA adapter to compare with the base (repeatable): a run folder, its best/ or checkpoint/, "
                   "or a weights file.")
@click.option("--data", default="datasets/emergency_relief", show_default=True,
              help="Dataset folder, .jsonl file or Hub dataset id.")
@click.option("--split", default="test", show_default=True, help="Split to answer; its items need key_facts.")
@click.option("--out", default="runs/eval", show_default=True, type=click.Path(),
              help="Folder for the report; an interrupted eval into it resumes.")
@click.option("--limit", default=0, show_default=True, help="At most N items, spread over categories; 0: all.")
@click.option("--categories", multiple=True, help="Only these categories (repeatable or comma-separated).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Answers decoded together, and examples per teacher-forced pass.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Most tokens per answer, reasoning included.")
@click.option("--reasoning", type=click.Choice(REASONING_EFFORTS), default="low", show_default=True,
              help="Reasoning effort in the system message (training renders with low).")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap confidence intervals.")
def eval_command(model, adapters, data, split, out, limit, categories, batch_size, max_tokens, reasoning,
                 seed) -> None:
    """Answer a test split with the base model and each adapter; score key facts, must_not violations and
    loss; compare with bootstrap confidence intervals; write examples.jsonl, summary.json, report.md, a chart."""
    from .eval.report import event_line
    from .eval.run import EvalConfig, evaluate
    from .recipe import DataSection

    config = EvalConfig(model=model, adapters=adapters, data=DataSection(path=data, reasoning_effort=reasoning),
                        split=split, out=out, limit=limit, batch_size=batch_size, max_tokens=max_tokens, seed=seed,
                        categories=tuple(c.strip() for text in categories for c in text.split(",") if c.strip()))

    def show(kind: str, event: dict) -> None:
        if kind != "done" and (line := event_line(kind, event)):  # the summary goes to stdout below
            click.echo(line, err=True)

    result = evaluate(config, on_event=show)
    for line in result.summary["sentences"]:
        click.echo(line)
    click.echo(f"report -> {result.files['report']}")
# --- end eval ---------------------------------------------------------------------------------


# --- serve (relief_mlx.serve) ---------------------------------------------------------------
@cli.command()
@click.option("--model", required=True, help="Converted checkpoint folder or Hub id (also its model id in the API).")
@click.option("--adapter", "adapters", multiple=True, metavar="[NAME=]PATH",
              help="A LoRA adapter served as model id NAME (default: PATH); repeatable.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="RELIEF_API_KEY",
              help="Require `Authorization: Bearer KEY` on /v1 (or set RELIEF_API_KEY).")
@click.option("--max-batch", default=8, show_default=True, help="Requests decoded together in one forward pass.")
@click.option("--max-queue", default=64, show_default=True, help="Requests waiting for a row before new ones get 429.")
@click.option("--max-tokens-limit", default=4096, show_default=True,
              help="Most tokens one request may generate (its default too).")
@click.option("--max-body-mb", default=1.0, show_default=True, help="Largest request body; larger ones get 413.")
@click.option("--prompt-cache", default=8, show_default=True, help="Prompt-cache snapshots kept per model id.")
@click.option("--prefill-chunk", default=512, show_default=True, help="Prompt tokens per forward pass.")
def serve(model, adapters, host, port, api_key, max_batch, max_queue, max_tokens_limit, max_body_mb, prompt_cache,
          prefill_chunk) -> None:
    """Serve a model (and adapters) over an OpenAI-compatible API, with a chat page at /."""
    from .serve import ServeConfig
    from .serve import serve as run

    config = ServeConfig(model=model, adapters=adapters, host=host, port=port, api_key=api_key, max_batch=max_batch,
                         max_queue=max_queue, max_tokens_limit=max_tokens_limit, max_body_mb=max_body_mb,
                         prompt_cache=prompt_cache, prefill_chunk=prefill_chunk)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use the model",
                   err=True)
    run(config, say=lambda line: click.echo(line, err=True))
# --- end serve ------------------------------------------------------------------------------


# --- fuse / export (relief_mlx.export) ------------------------------------------------------
_MERGE_DTYPE = click.option("--dtype", type=click.Choice(DTYPES),
                            help="dtype of every merged weight [default: each weight's own; a dequantized "
                                 "expert takes its bias dtype]. float32 keeps the delta exactly.")
_EVAL = click.option("--eval", "eval_summary", type=click.Path(dir_okay=False),
                     help="summary.json written by `relief eval`, quoted in the model card.")


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _print_merged(result: dict) -> None:
    by_kind: dict[str, list[dict]] = {}
    for m in result["merged"]:
        by_kind.setdefault(m["kind"], []).append(m)
    for kind, group in by_kind.items():
        before, after = sum(m["bytes_before"] for m in group), sum(m["bytes_after"] for m in group)
        sizes = f", {_megabytes(before)} -> {_megabytes(after)}" if kind == "dequantized" else ""
        worst = max(m["delta_error"] for m in group)
        click.echo(f"{kind}: {len(group)} modules ({group[0]['dtype']}{sizes}); relative error of the stored "
                   f"delta up to {worst:.2e}")


@cli.command()
@click.option("--model", required=True, help="Base MLX model folder (written by `relief convert`) or Hub id.")
@click.option("--adapter", required=True, type=click.Path(), help="LoRA adapter folder (`relief train`, mlx-lm).")
@click.option("--out", required=True, type=click.Path(), help="Folder to write (must not exist or be empty).")
@click.option("--keep-adapter-for-experts", is_flag=True,
              help="Leave the MXFP4 experts the adapter touches as they are and keep their LoRA as an adapter "
                   "in OUT/adapter (load with --adapter OUT/adapter) [default: dequantize exactly those].")
@click.option("--requantize", is_flag=True,
              help="Re-quantize the touched MXFP4 experts; prints how much of the delta survives and stops "
                   "unless --accept-requantize-loss is also given.")
@click.option("--accept-requantize-loss", is_flag=True, help="Write the re-quantized experts despite the loss.")
@_MERGE_DTYPE
@_EVAL
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out once the new folder is complete.")
def fuse(model: str, adapter: str, out: str, keep_adapter_for_experts: bool, requantize: bool,
         accept_requantize_loss: bool, dtype: str | None, eval_summary: str | None, overwrite: bool) -> None:
    """Merge a LoRA adapter into the model; check the result against base + adapter before writing it."""
    from pathlib import Path

    from .export.fuse import fuse as run

    if keep_adapter_for_experts and requantize:
        raise ReliefError("--keep-adapter-for-experts and --requantize exclude each other; choose one")
    if accept_requantize_loss and not requantize:
        raise ReliefError("--accept-requantize-loss goes with --requantize; add it or drop the flag")
    quantized = "keep-adapter" if keep_adapter_for_experts else "requantize" if requantize else "dequantize"
    result = run(model, adapter, out, quantized=quantized, dtype=dtype, accept_requantize_loss=accept_requantize_loss,
                 overwrite=overwrite, eval_summary=Path(eval_summary) if eval_summary else None,
                 progress=_progress("fuse"))
    _print_merged(result)
    if loss := result["requantize_loss"]:
        click.echo(f"re-quantized: the delta stored with a relative error of {loss['delta_error']:.2f} "
                   f"(up to {loss['delta_error_max']:.2f}; 1 = as if dropped); accepted")
    check = result["check"]
    click.echo(f"check: {check['tokens']} tokens, logits {check['median_relative_error']:.2e} from base + adapter "
               f"(median relative error; allowed {result['tolerance']:.0e}; max {check['max_relative_error']:.2e}), "
               f"argmax agreement {check['argmax_agreement']:.1%}; the adapter moves them by "
               f"{check['adapter_effect']:.2e}")
    for note in result["notes"]:
        click.echo(f"note: {note}")
    if result["kept_adapter"]:
        click.echo(f"kept adapter -> {Path(out) / result['kept_adapter']} (pass it with --adapter)")
    click.echo(f"fused -> {result['out']}")


@cli.command("export")
@click.option("--model", required=True, help="MLX model folder (base or fused) or Hub id.")
@click.option("--adapter", type=click.Path(), help="LoRA adapter folder; merged for hf and gguf, converted for peft.")
@click.option("--format", "fmt", required=True, type=click.Choice(["hf", "peft", "gguf"]),
              help="hf: transformers' gpt-oss layout; peft: a PEFT adapter for the HF checkpoint; "
                   "gguf: one file for llama.cpp / Ollama, with a Modelfile.")
@click.option("--out", required=True, type=click.Path(),
              help="Folder to write (must not exist or be empty); for gguf also a FILE.gguf, its Modelfile, "
                   "card and manifest written beside it as FILE.Modelfile, FILE.md, FILE.manifest.json.")
@_MERGE_DTYPE
@_EVAL
@click.option("--overwrite", is_flag=True, help="Replace an existing --out once the new output is complete.")
def export_command(model: str, adapter: str | None, fmt: str, out: str, dtype: str | None, eval_summary: str | None,
                   overwrite: bool) -> None:
    """Export a model (+ adapter) to Hugging Face, PEFT or GGUF, with a model card and checksums."""
    from pathlib import Path

    from .export import export as run

    result = run(model, out, fmt, adapter=adapter, dtype=dtype, overwrite=overwrite,
                 eval_summary=Path(eval_summary) if eval_summary else None, progress=_progress(f"export {fmt}"))
    _print_merged(result)
    if fmt == "hf":
        click.echo(f"experts: MXFP4 in layers {result['mxfp4_expert_layers'] or 'none'}, dense in "
                   f"{result['dense_expert_layers'] or 'none'}")
    elif fmt == "peft":
        click.echo(f"{result['target_modules']} modules and {result['target_parameters']} expert parameters; "
                   f"base model: {result['base_model_name_or_path']}")
    else:
        click.echo(f"tensors: {', '.join(f'{n} {k}' for k, n in result['tensor_types'].items())}; "
                   f"then: ollama create NAME -f {Path(out) / 'Modelfile'}")
    for note in result["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"exported -> {result['out']}")
# --- end fuse / export ----------------------------------------------------------------------
