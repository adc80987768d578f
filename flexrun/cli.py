"""The ``flexrun`` command line: parsing and output only; the work happens in the library."""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import click

from flexrun.cli_options import (
    DTYPES,
    compress_weight_options,
    compression_kind,
    engine_options,
    non_negative_int,
    positive_int,
)
from flexrun.errors import FlexrunError

try:
    __version__ = version("flexrun")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"


def compress_options(fn: Any) -> Any:
    for option in reversed(compress_weight_options()):
        fn = option(fn)
    return fn


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class FlexrunGroup(click.Group):
    """Turns every expected failure (FlexrunError) into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlexrunError as exc:
            if str(exc):  # a tensor-parallel rank other than 0 leaves the saying to rank 0
                click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:  # the reader of stdout (or of a FIFO --output) went away: end quietly, as Unix tools do
            ctx.exit(0)
        except KeyboardInterrupt:
            click.echo("Aborted.", err=True)
            ctx.exit(130)


def _setup_logging(verbose: int) -> None:
    env = os.environ.get("FLEXRUN_LOG_LEVEL")
    level = env.upper() if env else ("DEBUG" if verbose >= 2 else "INFO" if verbose == 1 else "WARNING")
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


@click.group(cls=FlexrunGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="flexrun")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """flexrun: high-throughput inference for models bigger than your GPU (or RAM).

    Weights, KV cache and activations are streamed between device memory, host RAM and disk following a
    placement chosen by a cost model, so big offline batches run at full speed on one machine.
    """
    _setup_logging(verbose)


@cli.command("config")
@click.argument("name")
@click.option("--batch-size", default=1, show_default=True, callback=positive_int, help="Sequences in the batch.")
@click.option("--prompt-len", default=512, show_default=True, callback=positive_int, help="Prompt tokens.")
@click.option("--gen-len", default=32, show_default=True, callback=non_negative_int, help="Generated tokens.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Override the dtype.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output with exact byte counts.")
def config_cmd(name: str, batch_size: int, prompt_len: int, gen_len: int, dtype: str | None, as_json: bool) -> None:
    """Print the resolved config of NAME (a model name or checkpoint directory) and its memory sizes.

    The KV cache is sized for BATCH_SIZE sequences of PROMPT_LEN + GEN_LEN tokens; the hidden state for
    one prefill step (BATCH_SIZE x PROMPT_LEN).
    """
    from flexrun.layout import active_params
    from flexrun.resolver import resolve
    from flexrun.units import format_bytes

    cfg = resolve(name, **({"dtype": dtype} if dtype else {}))
    seq = prompt_len + gen_len
    sizes = {
        "model_bytes": cfg.model_bytes(),
        "cache_bytes": cfg.cache_bytes(batch_size, seq),
        "hidden_bytes": cfg.hidden_bytes(batch_size, prompt_len),
        # A mixture of experts computes each token with its routed experts only.
        "params": cfg.model_bytes() // cfg.dtype_bytes,
        "active_params": active_params(cfg),
    }
    if as_json:
        shape = {"batch_size": batch_size, "prompt_len": prompt_len, "gen_len": gen_len}
        click.echo(json.dumps({"config": cfg.to_dict(), **shape, **sizes}, indent=2))
        return
    for key, value in cfg.to_dict().items():
        click.echo(f"{key:<22} {value}")
    click.echo("")
    click.echo(f"{'weights':<22} {format_bytes(sizes['model_bytes'])}")
    active = f"  ({sizes['active_params'] / 1e6:,.2f}M active per token)" if cfg.moe else ""
    click.echo(f"{'parameters':<22} {sizes['params'] / 1e6:,.2f}M{active}")
    click.echo(f"{'kv cache':<22} {format_bytes(sizes['cache_bytes'])}  (batch {batch_size} x {seq} tokens)")
    click.echo(
        f"{'hidden state':<22} {format_bytes(sizes['hidden_bytes'])}  (batch {batch_size} x {prompt_len} tokens)"
    )


@cli.command("convert")
@click.option("--model", "-m", required=True, help="Checkpoint directory, GGUF file, packaged model or hub name.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output store directory.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Store dtype (default: the checkpoint's).")
@click.option("--overwrite", is_flag=True, help="Replace a store already at --out (atomically).")
@click.option(
    "--tp",
    default=1,
    show_default=True,
    callback=positive_int,
    help="One store per tensor-parallel rank, OUT/rank0 ... OUT/rankN-1 (run with --model OUT/rank0 --tp N).",
)
@compress_options
def convert_cmd(
    model: str,
    out: str,
    dtype: str | None,
    overwrite: bool,
    tp: int,
    compress_weight: str | None,
    group_size: int | None,
) -> None:
    """Convert a Hugging Face checkpoint (or a GGUF file, dequantized) into flexrun's tensor store, one
    tensor at a time, optionally with its layers' matmul weights compressed. A store already at --out is
    kept unless --overwrite; an interrupt leaves the old store or the new one, whole."""
    from flexrun.quant.formats import QuantSpec
    from flexrun.resolver.stores import convert_into

    kind = compression_kind(compress_weight)
    if group_size and not kind:
        raise click.BadParameter("a group size needs --compress-weight", param_hint="--group-size")
    spec = QuantSpec.of(kind, group_size) if kind else None
    if tp > 1:
        for path in _convert_split(model, out, dtype, spec, overwrite, tp):
            click.echo(path)
        return
    if not convert_into(model, out, dtype, spec, overwrite):
        click.echo(f"{out} is already converted from {model} with these settings; nothing to do", err=True)
    click.echo(out)


def _convert_split(model: str, out: str, dtype: str | None, spec: Any, overwrite: bool, tp: int) -> list[Any]:
    """``convert --tp N``: the whole store converted beside the ranks' (then deleted), each rank's part written."""
    import shutil
    from pathlib import Path

    from flexrun.parallel import check_split, write_shards
    from flexrun.resolver import model_source
    from flexrun.resolver.stores import convert_into
    from flexrun.weights.store import TensorStore

    check_split(model_source(model, dtype=dtype, dummy=False, task="generate").config, tp)
    target = Path(out)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FlexrunError(f"{out} is not empty; add --overwrite to replace the stores in it, or choose another --out")
    whole = target / "whole.partial"
    try:
        convert_into(model, whole, dtype, spec, overwrite=True)
        return write_shards(TensorStore(whole), tp, target)
    finally:
        shutil.rmtree(whole, ignore_errors=True)


def _summary(
    cfg: Any, placement: Any, stats: Any, as_json: bool, err: bool, extra: dict[str, Any] | None = None
) -> None:
    """A run's summary: text on stderr, or with --json one JSON line (on stderr with ``err``)."""
    from flexrun.jobs.report import summary_dict, summary_text

    if as_json:
        click.echo(json.dumps({**summary_dict(cfg, placement, stats), **(extra or {})}), err=err)
    else:
        click.echo(summary_text(cfg, placement, stats), err=True)


@cli.command("bench")
@engine_options()
@click.option("--prompt-len", default=512, show_default=True, callback=positive_int)
@click.option("--gen-len", default=32, show_default=True, callback=positive_int)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def bench_cmd(prompt_len: int, gen_len: int, as_json: bool, engine: Any) -> None:
    """Generate from synthetic prompts (one block) and report throughput, like FlexGen's benchmark."""
    from flexrun.jobs.bench import run_bench
    from flexrun.jobs.report import roofline_text

    result = run_bench(engine, prompt_len, gen_len)
    if as_json:
        _summary(result.cfg, result.placement, result.stats, True, err=False, extra={"roofline": result.roofline})
    else:
        _summary(result.cfg, result.placement, result.stats, False, err=True)
        click.echo(roofline_text(result.roofline), err=True)


@cli.command("embed")
@engine_options(encoder=True)
@click.option("--text", "-t", "texts", multiple=True, help="A text to embed (repeatable).")
@click.option(
    "--input",
    "-i",
    "input_file",
    help='JSONL file of {"id", "text"} or {"id", "input_ids": [...]} records (- for stdin).',
)
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write JSONL results here (default stdout).")
@click.option(
    "--pooling",
    type=click.Choice(["pooler", "cls", "mean"]),
    help="pooler: tanh(dense) of the first token (default when the model has one); cls: the first token's last "
    "hidden state (default otherwise); mean: the mean over the real tokens.",
)
@click.option("--all-tokens", is_flag=True, help="Write every token's last hidden state instead of one vector.")
@click.option("--normalize", is_flag=True, help="Scale each vector to unit length (L2).")
@click.option("--truncate", is_flag=True, help="Cut inputs longer than the model's positions instead of failing.")
def embed_cmd(
    texts: tuple[str, ...],
    input_file: str | None,
    output: str | None,
    pooling: str | None,
    all_tokens: bool,
    normalize: bool,
    truncate: bool,
    engine: Any,
) -> None:
    """Embed texts with an encoder model (BERT, RoBERTa), streaming its weights by the placement given.

    Writes one JSONL row per input record, in input order: {"id", "tokens", "embedding": [...]}, or with
    --all-tokens {"id", "tokens", "input_ids", "last_hidden_state": [[...], ...]} (one row of hidden_size
    floats per token). Text is tokenized with the checkpoint's tokenizer (special tokens added); token-type
    ids are all 0. A weight is read once per block of GPU_BATCH_SIZE x NUM_GPU_BATCHES sequences.

    Within each window of 1024 input records (one block with --all-tokens) blocks group records of similar
    length, and rows are written as soon as every earlier record's are, so memory holds at most one
    window of results. --output is written to a temporary file beside it that replaces it only when the
    job succeeds: a failed job leaves an existing file as it was. The summary goes to stderr.
    """
    from flexrun.jobs.embed import EmbedOptions, run_embed
    from flexrun.jobs.report import summary_text

    job = EmbedOptions(texts, input_file, output, pooling, all_tokens, normalize, truncate)
    result = run_embed(engine, job)
    click.echo(summary_text(result.cfg, result.placement, result.stats, result.pooling), err=True)


def _register_costmodel_commands() -> None:
    from flexrun.cli_cache import cache_cmd
    from flexrun.cli_costmodel import calibrate_cmd, plan_cmd
    from flexrun.cli_generate import chat_cmd, generate_cmd

    cli.add_command(generate_cmd)
    cli.add_command(chat_cmd)
    cli.add_command(cache_cmd)
    cli.add_command(plan_cmd)
    cli.add_command(calibrate_cmd)


_register_costmodel_commands()


def _register_score_commands() -> None:
    from flexrun.cli_score import eval_cmd, score_cmd

    cli.add_command(score_cmd)
    cli.add_command(eval_cmd)


_register_score_commands()


def main() -> None:
    cli(prog_name="flexrun")


if __name__ == "__main__":
    main()
