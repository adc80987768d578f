"""The ``flexrun`` command line: parsing and output only; the work happens in the library."""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import click

from flexrun.cli_options import byte_size, hardware_spec, non_negative_int, positive_int, tier_shares
from flexrun.errors import FlexrunError
from flexrun.runtime.precision import CHOICES as COMPUTE_CHOICES

try:
    __version__ = version("flexrun")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class FlexrunGroup(click.Group):
    """Turns every expected failure (FlexrunError) into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlexrunError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
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
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Override the dtype.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output with exact byte counts.")
def config_cmd(name: str, batch_size: int, prompt_len: int, gen_len: int, dtype: str | None, as_json: bool) -> None:
    """Print the resolved config of NAME (a model name or checkpoint directory) and its memory sizes.

    The KV cache is sized for BATCH_SIZE sequences of PROMPT_LEN + GEN_LEN tokens; the hidden state for
    one prefill step (BATCH_SIZE x PROMPT_LEN).
    """
    from flexrun.config import resolve
    from flexrun.units import format_bytes

    cfg = resolve(name, **({"dtype": dtype} if dtype else {}))
    seq = prompt_len + gen_len
    sizes = {
        "model_bytes": cfg.model_bytes(),
        "cache_bytes": cfg.cache_bytes(batch_size, seq),
        "hidden_bytes": cfg.hidden_bytes(batch_size, prompt_len),
    }
    if as_json:
        shape = {"batch_size": batch_size, "prompt_len": prompt_len, "gen_len": gen_len}
        click.echo(json.dumps({"config": cfg.to_dict(), **shape, **sizes}, indent=2))
        return
    for key, value in cfg.to_dict().items():
        click.echo(f"{key:<22} {value}")
    click.echo("")
    click.echo(f"{'weights':<22} {format_bytes(sizes['model_bytes'])}")
    click.echo(f"{'kv cache':<22} {format_bytes(sizes['cache_bytes'])}  (batch {batch_size} x {seq} tokens)")
    click.echo(
        f"{'hidden state':<22} {format_bytes(sizes['hidden_bytes'])}  (batch {batch_size} x {prompt_len} tokens)"
    )


# ---- shared options for commands that run the engine ----------------------------------------------
def engine_options(fn: Any) -> Any:
    """Model, weights and placement options shared by generate and bench (each adds its own --json)."""
    options = [
        click.option("--model", "-m", required=True, help="Model name, checkpoint directory or tensor store."),
        click.option(
            "--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Weight and KV cache dtype."
        ),
        click.option(
            "--compute-dtype",
            type=click.Choice(COMPUTE_CHOICES),
            default="auto",
            show_default=True,
            help="Dtype of the arithmetic. auto: the weights' dtype on a GPU or on a CPU with matmul hardware "
            "for it, else float32 (16-bit weights are converted chunk by chunk inside each matmul).",
        ),
        click.option("--dummy-weights", is_flag=True, help="Random weights of the right shapes (no download)."),
        click.option("--store-dir", type=click.Path(file_okay=False), help="Where converted stores are cached."),
        click.option(
            "--placement",
            type=click.Choice(["auto", "manual"]),
            default="auto",
            show_default=True,
            help="auto: the planner chooses what the options below leave open; manual: unset shares are host=100.",
        ),
        click.option(
            "--hardware",
            callback=hardware_spec,
            help="Hardware figures for the planner: a preset or a `flexrun calibrate` JSON (default: this machine's).",
        ),
        click.option("--weights", callback=tier_shares, help="Weight shares, e.g. host=40,disk=60."),
        click.option("--cache", callback=tier_shares, help="KV cache shares, e.g. host=100."),
        click.option("--activations", callback=tier_shares, help="Activation shares, e.g. host=100."),
        click.option("--gpu-batch-size", type=int, callback=positive_int, help="Sequences per micro-batch."),
        click.option("--num-gpu-batches", type=int, callback=positive_int, help="Micro-batches per block."),
        click.option("--overlap/--no-overlap", default=True, show_default=True, help="Overlap I/O with compute."),
        click.option(
            "--offload-dir", type=click.Path(file_okay=False), help="Directory for disk-resident cache and activations."
        ),
        click.option("--device-mem", callback=byte_size, help="Device memory budget, e.g. 14GiB."),
        click.option("--host-mem", callback=byte_size, help="Host memory budget, e.g. 8GiB."),
        click.option("--disk-mem", callback=byte_size, help="Disk budget in the offload dir."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _engine(
    kw: dict[str, Any], prompt_len: int, gen_len: int, num_prompts: int | None = None, store: Any = None
) -> Any:
    """The tensor store (``store``, or the one ``--model`` names) and an engine sized for ``prompt_len +
    gen_len`` tokens, with the placement given on the command line or, with ``--placement auto``, chosen by
    the planner for this job."""
    from flexrun.autoplace import build_engine
    from flexrun.runtime.tiers import Budgets
    from flexrun.weights.convert import ensure_store

    if store is None:
        store = ensure_store(
            kw["model"],
            dtype=kw["dtype"],
            dummy=kw["dummy_weights"],
            store_root=kw["store_dir"],
            progress=not kw.get("quiet"),
        )
    budgets = Budgets(device=kw["device_mem"], host=kw["host_mem"], disk=kw["disk_mem"])
    report = None if kw.get("quiet") else lambda line: click.echo(line, err=True)
    engine = build_engine(store, kw, budgets, prompt_len, gen_len, num_prompts, report=report)
    return store, engine


def _print_summary(store: Any, engine: Any, stats: Any, as_json: bool, json_err: bool = False) -> None:
    """The run's summary: text on stderr, or with --json one JSON line on stdout (on stderr with ``json_err``,
    for generate, whose records may be on stdout)."""
    from flexrun.report import summary_dict, summary_text

    if as_json:
        click.echo(json.dumps(summary_dict(engine.cfg, engine.placement, stats)), err=json_err)
    else:
        click.echo(summary_text(engine.cfg, engine.placement, stats), err=True)


def _print_generate_summary(store: Any, engine: Any, stats: Any, as_json: bool) -> None:
    _print_summary(store, engine, stats, as_json, json_err=True)


@cli.command("convert")
@click.option("--model", "-m", required=True, help="Checkpoint directory, GGUF file, packaged model or hub name.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output store directory.")
@click.option(
    "--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Store dtype (default: the checkpoint's)."
)
def convert_cmd(model: str, out: str, dtype: str | None) -> None:
    """Convert a Hugging Face checkpoint (or a GGUF file, dequantized) into flexrun's tensor store, one
    tensor at a time."""
    from flexrun.config import resolve
    from flexrun.weights.convert import convert_checkpoint, hub_download
    from flexrun.weights.packaged import local_source

    src = local_source(model)
    if src is None:
        resolve(model)
        src = hub_download(model)
    path = convert_checkpoint(src, out, dtype=dtype)
    click.echo(str(path))


@cli.command("generate")
@engine_options
@click.option("--prompt", "-p", "prompts", multiple=True, help="A prompt text (repeatable).")
@click.option(
    "--input", "-i", "input_file", help='JSONL file of {"prompt": ...} or {"input_ids": [...]} records (- for stdin).'
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="Write JSONL results here (default stdout); rerunning the same command resumes.",
)
@click.option("--overwrite", is_flag=True, help="Start the --output file afresh instead of resuming it.")
@click.option("--max-new-tokens", default=32, show_default=True, callback=positive_int)
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--repetition-penalty", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed; a rerun reproduces its outputs.")
@click.option("--stop", multiple=True, help="Stop a sequence when this text appears (repeatable).")
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
    default="length",
    show_default=True,
    help="length: longest prompts first (least padding); input: the input's order.",
)
@click.option("--stream", is_flag=True, help="Print each completion's text as it is generated (one at a time).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or plan line on stderr (the summary stays).")
@click.option("--chat", is_flag=True, help="Wrap each text prompt as a user turn in the tokenizer's chat template.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the summary as one JSON line on stderr (stdout is for the records).",
)
def generate_cmd(
    prompts: tuple[str, ...],
    input_file: str | None,
    output: str | None,
    overwrite: bool,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float,
    seed: int,
    stop: tuple[str, ...],
    num_return_sequences: int,
    truncate: str,
    order: str,
    stream: bool,
    quiet: bool,
    chat: bool,
    **kw: Any,
) -> None:
    """Generate completions for prompts with an offloaded placement; JSONL results, summary on stderr.

    Records are written block by block as they finish. With --output, rerunning the same command resumes
    the job where it stopped (another model or other settings are refused: OUTPUT.job.json records them);
    Ctrl-C (or SIGTERM) stops it after the block in flight.
    """
    from flexrun.generation import JobOptions, run_generate
    from flexrun.runtime.sampling import SamplingParams

    if num_return_sequences > 1 and temperature == 0:
        raise click.BadParameter(
            "more than one sequence per prompt needs sampling (--temperature > 0)", param_hint="--num-return-sequences"
        )
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
    )
    job = JobOptions(
        params=params,
        prompts=prompts,
        input_file=input_file,
        output=output,
        num_return_sequences=num_return_sequences,
        truncate=truncate,
        order=order,
        overwrite=overwrite,
        stream=stream,
        quiet=quiet,
        chat=chat,
    )
    kw["quiet"] = quiet
    run_generate(kw, job, make_engine=_engine, print_summary=_print_generate_summary, echo=click.echo)


@cli.command("bench")
@engine_options
@click.option("--prompt-len", default=512, show_default=True, callback=positive_int)
@click.option("--gen-len", default=32, show_default=True, callback=positive_int)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def bench_cmd(prompt_len: int, gen_len: int, **kw: Any) -> None:
    """Generate from synthetic prompts (one block) and report throughput, like FlexGen's benchmark."""
    import torch

    from flexrun.runtime.sampling import SamplingParams

    store, engine = _engine(kw, prompt_len, gen_len)
    with engine:
        gen = torch.Generator().manual_seed(0)
        n = engine.placement.block_size
        vocab = store.config.vocab_size
        prompts = torch.randint(4, vocab, (n, prompt_len), generator=gen).tolist()
        _, stats, _ = engine.generate(prompts, SamplingParams(max_new_tokens=gen_len, stop_at_eos=False))
    from flexrun.costmodel.hardware import load_hardware
    from flexrun.report import roofline, roofline_text, summary_dict, summary_text

    hw = kw["hardware"] or load_hardware(None)
    roof = roofline(engine.cfg, engine.placement, stats, hw, prompt_len, gen_len)
    if kw["as_json"]:
        click.echo(json.dumps({**summary_dict(engine.cfg, engine.placement, stats), "roofline": roof}))
    else:
        click.echo(summary_text(engine.cfg, engine.placement, stats) + "\n" + roofline_text(roof), err=True)


@cli.command("embed")
@click.option("--model", "-m", required=True, help="Encoder checkpoint directory or tensor store (BERT, RoBERTa).")
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
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Weight dtype.")
@click.option(
    "--compute-dtype",
    type=click.Choice(COMPUTE_CHOICES),
    default="auto",
    show_default=True,
    help="Dtype of the arithmetic (as for generate).",
)
@click.option("--dummy-weights", is_flag=True, help="Random weights of the right shapes (no download).")
@click.option("--store-dir", type=click.Path(file_okay=False), help="Where converted stores are cached.")
@click.option("--weights", callback=tier_shares, help="Weight shares, e.g. host=40,disk=60 (default host=100).")
@click.option("--activations", callback=tier_shares, help="Activation shares, e.g. disk=100 (default host=100).")
@click.option(
    "--gpu-batch-size", default=8, show_default=True, callback=positive_int, help="Sequences per micro-batch."
)
@click.option("--num-gpu-batches", default=1, show_default=True, callback=positive_int, help="Micro-batches per block.")
@click.option("--overlap/--no-overlap", default=True, show_default=True, help="Overlap I/O with compute.")
@click.option("--offload-dir", type=click.Path(file_okay=False), help="Directory for disk-resident activations.")
@click.option("--device-mem", callback=byte_size, help="Device memory budget, e.g. 14GiB.")
@click.option("--host-mem", callback=byte_size, help="Host memory budget, e.g. 8GiB.")
@click.option("--disk-mem", callback=byte_size, help="Disk budget in the offload dir.")
def embed_cmd(
    texts: tuple[str, ...],
    input_file: str | None,
    output: str | None,
    pooling: str | None,
    all_tokens: bool,
    normalize: bool,
    truncate: bool,
    **kw: Any,
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
    from flexrun.embed import EmbedOptions, run_embed, summary_text

    opts = EmbedOptions(pooling=pooling, all_tokens=all_tokens, normalize=normalize, truncate=truncate)
    cfg, placement, stats, used = run_embed(kw, texts, input_file, output, opts, stdin=sys.stdin, stdout=sys.stdout)
    click.echo(summary_text(cfg, placement, stats, used), err=True)


def _register_costmodel_commands() -> None:
    from flexrun.cli_costmodel import calibrate_cmd, plan_cmd

    cli.add_command(plan_cmd)
    cli.add_command(calibrate_cmd)


_register_costmodel_commands()


def main() -> None:
    cli(prog_name="flexrun")


if __name__ == "__main__":
    main()
