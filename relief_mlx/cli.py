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
@click.option("--preset", default="mini", show_default=True,
              help="mini, gpt-oss-20b-2l, gpt-oss-20b-6l or gpt-oss-20b.")
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
@click.option("--experts", type=click.Choice(["auto", "mxfp4", "bfloat16", "float32"]), default="auto",
              show_default=True, help="Expert weights: keep MXFP4 (auto for MXFP4 sources), or dequantize; "
              "float32 is what MLX's CPU gather_mm needs.")
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
    click.echo("weights in memory")
    for k, v in info["memory_bytes"].items():
        click.echo(f"  {k:<34} {v / 2**30:>8.2f} GiB")
    if "lora" in info:
        lora = info["lora"]
        click.echo(f"LoRA of {recipe}: {lora['trainable']:,} trainable of {lora['total']:,} ({lora['percent']:.4f}%)")


# --- data (relief_mlx.data) ---------------------------------------------------------------
@cli.group()
def data() -> None:
    """Check and inspect JSON Lines datasets (file, folder of splits or Hub dataset id)."""


_TOKENIZER_HELP = "Folder with tokenizer.json (e.g. a converted model); default: o200k_harmony."


def _data_defaults():
    """The recipe's data defaults, so that a check sees what training would see."""
    from .recipe import DataSection

    return DataSection()


def _render_options():
    from .data.harmony import RenderOptions

    d = _data_defaults()
    return RenderOptions(reasoning_effort=d.reasoning_effort, current_date=d.current_date)


@data.command("check")
@click.argument("path")
@click.option("--max-length", type=int, help="Token budget per example [default: the recipe's].")
@click.option("--tokenizer", "--model", "tokenizer", type=click.Path(), help=_TOKENIZER_HELP)
@click.option("--skip-invalid", is_flag=True, help="Skip bad lines and count them.")
@click.option("--mask-mode", type=click.Choice(["final", "last", "final+analysis", "all"]),
              default="final", show_default=True, help="Which tokens are trained.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def data_check(ctx: click.Context, path: str, max_length: int | None, tokenizer: str | None,
               skip_invalid: bool, mask_mode: str, as_json: bool) -> None:
    """Validate PATH, count splits and categories, and look for duplicates and leakage."""
    import json

    from .data.check import check_dataset

    max_length = _data_defaults().max_length if max_length is None else max_length
    report = check_dataset(path, max_length, tokenizer, skip_invalid, mask_mode, _render_options())
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else "\n".join(report.lines()))
    if not report.ok:
        ctx.exit(1)


@data.command("show")
@click.argument("path")
@click.option("--index", required=True, type=int, help="Example number in the split, from 0.")
@click.option("--split", default=None, help="Split to read (default: train, else the first).")
@click.option("--max-length", type=int, help="Token budget per example [default: the recipe's].")
@click.option("--tokenizer", "--model", "tokenizer", type=click.Path(), help=_TOKENIZER_HELP)
@click.option("--mask-mode", type=click.Choice(["final", "last", "final+analysis", "all"]),
              default="final", show_default=True, help="Which tokens are trained.")
def data_show(path: str, index: int, split: str | None, max_length: int | None,
              tokenizer: str | None, mask_mode: str) -> None:
    """Print one example as rendered for training, trained text marked."""
    from .data.check import show_example

    max_length = _data_defaults().max_length if max_length is None else max_length
    report = show_example(path, index, split, max_length, tokenizer, mask_mode, _render_options())
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
        click.option("--reasoning", type=click.Choice(["low", "medium", "high"]), default="medium", show_default=True,
                     help="Reasoning effort in the system message."),
        click.option("--temperature", default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass; 1 is off."),
        click.option("--top-k", default=0, show_default=True, help="Keep the k most likely tokens; 0 is off."),
        click.option("--min-p", default=0.0, show_default=True,
                     help="Drop tokens below min-p x the top probability; 0 is off."),
        click.option("--repetition-penalty", default=1.0, show_default=True, help="1 is off."),
        click.option("--repetition-context", default=64, show_default=True, help="Tokens the penalty looks back on."),
        click.option("--seed", type=int, help="Seed for sampling (reproducible draws)."),
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
@click.option("--out", type=click.Path(), help="JSONL answers for --prompts, written atomically.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts of --prompts decoded together (one forward pass per step for all).")
@click.option("--logprobs", is_flag=True, help="Keep per-token log-probabilities (printed, or in --out).")
@click.option("--raw", is_flag=True, help="Stream the generated tokens as text, Harmony tokens included.")
def generate(prompt, prompts_file, out, batch_size, logprobs, raw, **o) -> None:
    """Answer a prompt (or a JSONL file of prompts) with a model and optional LoRA adapter."""
    from .generate import Engine
    from .generate.batch import answer_file, conversation
    from .generate.chat import stats_text
    from .generate.engine import answer

    if (prompt is None) == (prompts_file is None) or (prompts_file is None) != (out is None):
        raise ReliefError("pass either --prompt TEXT, or --prompts FILE.jsonl with --out FILE.jsonl")
    config = _generate_config(o, logprobs)
    messages = conversation(prompt, o["system"]) if prompt is not None else None
    engine = Engine.load(o["model"], o["adapter"])
    if prompts_file is not None:
        def progress(line, reply, error):
            click.echo(f"{prompts_file}:{line}: " + (f"error: {error}" if error else
                       f"{reply.generated_tokens} tokens, {reply.decode_tps:.1f} tokens/s"), err=True)

        result = answer_file(engine, prompts_file, out, config, batch_size, on_answer=progress)
        click.echo(f"answers -> {result.out} ({result.answered} answered, {len(result.failed)} failed)")
        if result.failed:
            line, reason = result.failed[0]
            raise ReliefError(f"{len(result.failed)} line(s) of {prompts_file} got no answer, first line {line}: "
                              f"{reason}; fix them and run again")
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


@cli.command()
@_generation_options
def chat(**o) -> None:
    """Talk to a model turn by turn (/help lists the commands)."""
    from .generate import Engine
    from .generate.chat import QUIT, ChatSession

    session = ChatSession(Engine.load(o["model"], o["adapter"]), _generate_config(o), o["system"])
    click.echo(f"chatting with {o['model']}: /help for commands, Ctrl-D to leave")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            break
        if line.startswith("/"):
            shown = session.command(line)
            if shown is QUIT:
                break
            click.echo(shown)
            continue
        try:
            reply = session.ask(line, on_delta=_DeltaPrinter(o["show_reasoning"]))
        except ReliefError as e:
            click.echo(f"error: {e}", err=True)
            continue
        except KeyboardInterrupt:
            click.echo("\n(interrupted; the turn is forgotten)", err=True)
            continue
        _after_answer(reply, o["show_reasoning"])
# --- end generate / chat --------------------------------------------------------------------


# --- demo (relief_mlx.demo) ----------------------------------------------------------------
@cli.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(),
              help="Folder for the demo's model, converted model and adapter (reused when complete).")
@click.option("--recipe", default="recipes/mini.toml", show_default=True, type=click.Path())
def demo(out: str, recipe: str) -> None:
    """Synthesize a mini gpt-oss, convert it, train LoRA on the bundled data, answer with and without it."""
    from .demo import run_demo
    from .train.report import step_line, summary_lines

    def show(kind: str, event: dict) -> None:
        if kind == "step":
            click.echo("    " + step_line(event), err=True)
        elif kind == "done":
            click.echo("\n".join("    " + line for line in summary_lines(event)), err=True)

    result = run_demo(out, recipe, say=lambda line: click.echo(line, err=True), train_event=show)
    curve = " ".join(f"{loss:.2f}" for _, loss in result["summary"]["loss_curve"])
    click.echo(f"train loss by step: {curve}")
    for name, reply in result["answers"].items():
        channel = "final channel" if reply["final_channel"] else "raw tokens: no final channel"
        click.echo(f"--- {name} ({channel}, {reply['decode_tps']:.1f} tokens/s)\n{reply['text'].strip()}")
    click.echo(f"adapters -> {result['adapter']}")
# --- end demo -------------------------------------------------------------------------------


# --- train (relief_mlx.train) ---------------------------------------------------------------
@cli.command()
@click.argument("recipe", required=False, type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe value (repeatable), e.g. --set train.learning_rate=2e-4.")
@click.option("--resume", type=click.Path(), help="Continue the run folder RUN_DIR where its checkpoint left off.")
def train(recipe: str | None, overrides: tuple[str, ...], resume: str | None) -> None:
    """Fine-tune with LoRA as RECIPE (a TOML file, e.g. recipes/mini.toml) says; prints the run folder."""
    from .recipe import load_recipe
    from .train import resume_recipe
    from .train import train as run
    from .train.report import event_line, step_line, summary_lines

    if resume is None and recipe is None:
        raise ReliefError("pass a recipe (e.g. recipes/mini.toml) or --resume RUN_DIR")
    resolved = resume_recipe(resume, recipe, overrides) if resume else load_recipe(recipe, overrides)
    live = sys.stderr.isatty()

    def show(kind: str, event: dict) -> None:
        if kind == "step":
            click.echo(("\r" if live else "") + step_line(event), err=True, nl=not live)
        elif kind == "done":
            click.echo("\n".join([""] * live + summary_lines(event)), err=True)
        elif line := event_line(kind, event):
            click.echo(("\n" if live and kind != "start" else "") + line, err=True)

    result = run(resolved, resume=resume, on_event=show)
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
@click.option("--preset", help="Instead of --model: random weights at a preset's shapes, in memory "
                               "(mini, gpt-oss-20b-2l, gpt-oss-20b-6l, gpt-oss-20b).")
@click.option("--experts", type=click.Choice(["mxfp4", "dense", "dense-shared"]),
              help="A preset's experts: mxfp4 (as published), dense (dequantized to the model's dtype) or "
                   "dense-shared (every layer holds layer 0's: a deep float32 model timed in less memory) "
                   "[default: mxfp4].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]),
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
@click.option("--bandwidth-mib", default=256, show_default=True, help="Size of the array the bandwidth test reads.")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Write the results as JSON here, the chart beside it (.png).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Chart path [default: --out with .png].")
def bench(model: str | None, preset: str | None, experts: str | None, dtype: str | None,
          prompt_lengths: tuple[int, ...],
          gen_lengths: tuple[int, ...], trials: int, prefill_chunk: int, recipe: str | None, train_seq: int | None,
          no_training: bool, compare: tuple[str, ...], seed: int, bandwidth_mib: int, out: str | None,
          plot_path: str | None) -> None:
    """Tokens/s and memory of generation and LoRA training, against the machine's bandwidth."""
    from pathlib import Path

    from .bench import BenchConfig, run_bench
    from .bench.report import format_table, plot, write

    config = BenchConfig(model=model, preset=preset, experts=experts, dtype=dtype, prompt_lengths=prompt_lengths,
                         gen_lengths=gen_lengths, trials=trials, prefill_chunk=prefill_chunk,
                         training=not no_training, recipe=recipe, train_seq=train_seq, compare=compare, seed=seed,
                         bandwidth_mib=bandwidth_mib)
    result = run_bench(config, on_event=lambda message: click.echo(f"bench: {message}", err=True))
    click.echo(format_table(result))
    if out:
        click.echo(f"results -> {write(result, out)}")
    plot_path = plot_path or (str(Path(out).with_suffix(".png")) if out else None)
    if plot_path:
        chart = plot(result, plot_path)
        click.echo(f"chart -> {chart}" if chart
                   else "no chart: matplotlib is not installed (pip install 'relief-mlx[plot]')")
# --- end bench ------------------------------------------------------------------------------
