"""``flexrun generate`` (text for a person at a terminal, JSONL records for programs) and ``flexrun chat``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from flexrun.cli_options import engine_options, positive_int, sampling_options


def stop_strings(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    if any(s == "" for s in value):
        raise click.BadParameter("an empty stop string would end every sequence at once")
    return value


def output_format(fmt: str, output: str | None) -> str:
    """``text`` or ``jsonl``: auto is text when stdout is a terminal and no --output is given."""
    if fmt == "auto":
        return "text" if output is None and sys.stdout.isatty() else "jsonl"
    if fmt == "text" and output == "-":
        raise click.UsageError("--format text writes the text to stdout; give --output a file for the records")
    return fmt


@click.command("generate")
@engine_options()
@click.argument("prompt_args", nargs=-1, metavar="[PROMPT]...")
@click.option("--prompt", "-p", "prompts", multiple=True, help="A prompt text (repeatable), as PROMPT.")
@click.option(
    "--input", "-i", "input_file", help='JSONL file of {"prompt": ...} or {"input_ids": [...]} records (- for stdin).'
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="Write JSONL results here (-: stdout); rerunning the same command resumes. One job per file at a "
    "time; a pipe, FIFO or device is written straight through (no resume).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "text", "jsonl"]),
    default="auto",
    show_default=True,
    help="text: each completion's text on stdout, streamed, in input order; jsonl: one record per completion. "
    "auto: text at a terminal, jsonl when piped or with --output.",
)
@click.option("--overwrite", is_flag=True, help="Start the --output file afresh instead of resuming it.")
@click.option(
    "--max-new-tokens",
    callback=positive_int,
    type=int,
    help="Tokens to generate per completion [default: 32; a chat answer: what the context leaves, up to 512].",
)
@sampling_options("Sampling seed; a rerun reproduces its outputs.")
@click.option(
    "--stop", multiple=True, callback=stop_strings, help="Stop a sequence when this text appears (repeatable)."
)
@click.option(
    "--num-return-sequences",
    "-n",
    default=1,
    show_default=True,
    callback=positive_int,
    help="Sampled completions per prompt (records carry their `seq` index).",
)
@click.option(
    "--truncate",
    type=click.Choice(["none", "left"]),
    default="none",
    show_default=True,
    help="A prompt longer than the context: none = error, left = keep its end.",
)
@click.option(
    "--order",
    type=click.Choice(["length", "input"]),
    help="length: longest prompts first (least padding); input: the input's order. Default: input for text, "
    "length for JSONL.",
)
@click.option(
    "--share-prefix/--no-share-prefix",
    "--share-prefixes/--no-share-prefixes",  # score's spelling
    "share_prefix",
    default=True,
    show_default=True,
    help="Prompts of a block that share a prefix (few-shot examples, a system prompt) prefill it once.",
)
@click.option("--stream", is_flag=True, hidden=True, help="The same as --format text.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or plan line on stderr (the summary stays).")
@click.option("--verbose", is_flag=True, help="The plan line and the full report on stderr, not one summary line.")
@click.option(
    "--chat/--no-chat",
    default=None,
    help="Wrap each text prompt as a user turn in the checkpoint's chat template. Default: on for prompts "
    "typed (PROMPT, --prompt, plain text on stdin) when the checkpoint ships a template, off for JSONL.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the summary as one JSON line on stderr (stdout is for the records).",
)
def generate_cmd(
    prompt_args: tuple[str, ...],
    prompts: tuple[str, ...],
    input_file: str | None,
    output: str | None,
    fmt: str,
    overwrite: bool,
    max_new_tokens: int | None,
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float,
    seed: int,
    stop: tuple[str, ...],
    num_return_sequences: int,
    truncate: str,
    order: str | None,
    share_prefix: bool,
    stream: bool,
    quiet: bool,
    verbose: bool,
    chat: bool | None,
    as_json: bool,
    engine: Any,
) -> None:
    """Generate completions for PROMPT (or --prompt, --input FILE.jsonl, or text or JSONL on stdin).

    At a terminal each completion's text is printed as it is generated, in the order asked, with a one-line
    summary on stderr. Piped, or with --output, each completion is a JSON record (id, prompt, input_ids,
    output_ids, text, finish_reason); a record's id defaults to its place in the input, counted from 1.
    With --output, records are written block by block as they finish and rerunning the same command
    resumes the job where it stopped (OUTPUT.job.json records its settings); Ctrl-C (or SIGTERM) stops it
    after the block in flight.
    """
    from flexrun.jobs.generate import run_generate
    from flexrun.jobs.options import JobOptions
    from flexrun.runtime.sampling import SamplingParams

    typed = prompt_args + prompts
    if typed and input_file:
        raise click.UsageError("give prompts either as PROMPT/--prompt or with --input, not both")
    if num_return_sequences > 1 and temperature == 0:
        raise click.BadParameter(
            "more than one sequence per prompt needs sampling (--temperature > 0)", param_hint="--num-return-sequences"
        )
    text = output_format("text" if stream else fmt, output) == "text"
    params = SamplingParams(
        max_new_tokens=max_new_tokens or SamplingParams.max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
    )
    job = JobOptions(
        params=params,
        prompts=typed,
        input_file=input_file,
        output=output,
        num_return_sequences=num_return_sequences,
        truncate=truncate,
        order=order or ("input" if text else "length"),
        share_prefix=share_prefix,
        overwrite=overwrite,
        text=text,
        quiet=quiet,
        verbose=verbose,
        chat=chat,
        max_new_tokens_given=max_new_tokens is not None,
    )
    result = run_generate(engine, job)
    if result.stats is not None and result.placement is not None:
        from flexrun.jobs.report import summary_dict, summary_line, summary_text

        if as_json:  # one line on stderr, since the records may be on stdout
            click.echo(json.dumps(summary_dict(result.cfg, result.placement, result.stats)), err=True)
        elif verbose:
            click.echo(summary_text(result.cfg, result.placement, result.stats), err=True)
        else:
            click.echo(summary_line(result.cfg, result.placement, result.stats, result.new_tokens), err=True)
    if result.interrupted is not None:
        raise result.interrupted


@click.command("chat")
@engine_options()
@click.option("--system", help="A system message opening the conversation.")
@click.option(
    "--max-new-tokens",
    callback=positive_int,
    type=int,
    help="The longest reply [default: 512, or a quarter of the model's context if less].",
)
@sampling_options("Sampling seed.")
@click.option("--verbose", is_flag=True, help="Print the plan line on stderr.")
def chat_cmd(
    system: str | None,
    max_new_tokens: int | None,
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float,
    seed: int,
    verbose: bool,
    engine: Any,
) -> None:
    """Chat with a model: type a message, read its reply as it is generated.

    The conversation goes through the checkpoint's chat template, history kept (the oldest turns dropped
    when the context is full). Ctrl-C ends a reply, Ctrl-D ends the session. Messages are read a line at a
    time, so piped input works too: `printf 'Hi\\nAnd then?\\n' | flexrun chat -m MODEL`.
    """
    from flexrun.jobs.chat import ChatOptions, run_chat
    from flexrun.runtime.sampling import SamplingParams

    if getattr(engine, "tp", 1) > 1:
        raise click.BadParameter("a chat runs in one process", param_hint="--tp")

    params = SamplingParams(
        max_new_tokens=max_new_tokens or SamplingParams.max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    options = ChatOptions(params, system, max_new_tokens is not None, verbose=verbose)

    def notify(line: str) -> None:
        click.echo(line, err=True)

    result = run_chat(engine, options, sys.stdin, sys.stdout, notify)
    rate = result.new_tokens / result.seconds if result.seconds > 0 else 0.0
    click.echo(
        f"{result.turns} replies, {result.new_tokens} tokens in {result.seconds:.1f} s ({rate:.1f} tok/s) "
        f"from {result.model}; {result.prefilled} of the conversations' {result.prompt_tokens} prompt tokens "
        "computed, the rest reused from the cache",
        err=True,
    )
