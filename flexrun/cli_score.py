"""``flexrun score``: log-likelihoods and perplexities as JSONL; ``flexrun eval``: lm-evaluation-harness on flexrun."""

from __future__ import annotations

import json
from typing import Any

import click

from flexrun.cli_options import engine_options


def window_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """--window: a positive number of tokens, or off (a text must fit the model's context whole)."""
    if value is None:
        return 0
    if value == "off":
        return None
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number of tokens nor off") from None
    if n < 1:
        raise click.BadParameter("a window holds at least one token")
    return n


@click.command("score")
@engine_options()
@click.option(
    "--input",
    "-i",
    "input_file",
    help='JSONL records: {"id", "context", "continuation"} (text or token ids) for a log-likelihood, {"id", "text"} '
    "for a perplexity (- or none: stdin).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="Write JSONL results here (default or -: stdout); rerunning the same command resumes. A pipe, FIFO or "
    "device is written straight through (no resume).",
)
@click.option("--overwrite", is_flag=True, help="Start the --output file afresh instead of resuming it.")
@click.option("--tokens", is_flag=True, help="Add each scored token's id and log-probability to the records.")
@click.option(
    "--window",
    callback=window_size,
    metavar="TOKENS|off",
    help="Tokens a text record's windows predict at most (default: the model's context); off: a text must fit "
    "the context whole.",
)
@click.option(
    "--share-prefixes/--no-share-prefixes",
    "--share-prefix/--no-share-prefix",  # generate's spelling
    "share",
    default=True,
    show_default=True,
    help="Compute a prefix that several requests share (a question's context) once.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or plan line on stderr (the summary stays).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line on stderr.")
def score_cmd(
    input_file: str | None,
    output: str | None,
    overwrite: bool,
    tokens: bool,
    window: int | None,
    share: bool,
    quiet: bool,
    as_json: bool,
    engine: Any,
) -> None:
    """Score continuations and texts: JSONL in, one JSONL result per record out.

    A {"context", "continuation"} record gets {"id", "logprob", "is_greedy", "tokens", "context_tokens"}: the
    continuation's summed log-probability after the context, whether greedy decoding would produce it, and
    its token count. A {"text"} record gets its log-probability, token count and "perplexity", scored in
    windows of the model's context (each window after as many earlier tokens as fit). Text is tokenized
    as lm-evaluation-harness's hf backend does (the tokenizer's special tokens, the pair encoded whole; an
    empty context is the BOS token).

    Requests sharing a prefix (the choices of a question) compute it once. The LM head runs only where a
    token is scored, its log-softmax in float32. Results are written as their blocks finish; with --output,
    rerunning the same command resumes (OUTPUT.job.json records the model and settings).
    """
    from flexrun.jobs.score import ScoreOptions, run_score

    job = ScoreOptions(input_file, output, overwrite, tokens, window, share, quiet)
    result = run_score(engine, job)
    if result.stats is not None and result.placement is not None:
        _summary(result, as_json)
    if result.interrupted is not None:
        raise result.interrupted


def _summary(result: Any, as_json: bool) -> None:
    from flexrun.jobs.report import summary_dict, summary_text

    stats = result.stats
    counts = {
        "requests": result.requests,
        "rows": result.rows,
        "tokens_read": stats.input_tokens,
        "tokens_without_sharing": result.unshared_tokens,
        "scored_tokens": result.scored_tokens,
    }
    if as_json:
        click.echo(json.dumps({**summary_dict(result.cfg, result.placement, stats), **counts}), err=True)
        return
    rate = stats.input_tokens / stats.prefill_s if stats.prefill_s > 0 else 0.0
    pl = result.placement
    lines = [
        f"model: {result.cfg.name} ({result.cfg.dtype}"
        + (f" computed in {result.cfg.run_dtype}" if result.cfg.run_dtype != result.cfg.dtype else "")
        + ")",
        # The scorer keeps no KV cache: its placement is the weights, the activations and the batching.
        f"placement: weights {pl.weights.spec()} | activations {pl.activations.spec()} | "
        f"batch {pl.gpu_batch_size} x {pl.num_gpu_batches}" + ("" if pl.overlap else " | no-overlap"),
        f"requests: {stats.sequences} in {counts['rows']} row(s), {stats.blocks} block(s); tokens read "
        f"{stats.input_tokens} ({counts['tokens_without_sharing']} without prefix sharing, {stats.prompt_tokens} "
        f"with padding), {counts['scored_tokens']} scored",
        f"latency: {stats.prefill_s:.3f} s  throughput: {rate:.2f} token/s read",
    ]
    # The disk, planned-memory and peak-memory lines, as every job prints them.
    tail = summary_text(result.cfg, pl, stats, pooling="none").splitlines()[-3:]
    click.echo("\n".join(lines + tail), err=True)


@click.command(
    "eval",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def eval_cmd(args: tuple[str, ...]) -> None:
    """Run lm-evaluation-harness (lm-eval run ARGS) with flexrun registered as the model `flexrun`.

    --model defaults to flexrun; its options go in --model_args: pretrained=MODEL (a name, checkpoint
    directory or store), placement, weights / activations (tier shares spelled host:40/disk:60),
    gpu_batch_size (or --batch_size), num_gpu_batches, host_mem, dtype, compute_dtype, store_dir,
    offload_dir, max_length, share_prefixes. Every other option is lm-eval's (--tasks, --include_path,
    --limit, --output_path, --log_samples, ...): `flexrun eval --help` shows them. Needs the eval extra
    (pip install 'flexrun[eval]').
    """
    from flexrun.errors import InputError

    try:
        from flexrun.jobs.lmeval import run_cli
    except ImportError as exc:
        raise InputError(f"flexrun eval needs lm-eval ({exc}); install it with: pip install 'flexrun[eval]'") from None
    run_cli(list(args))
