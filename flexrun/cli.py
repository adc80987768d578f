"""The ``flexrun`` command line: parsing and output only; the work happens in the library."""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import click

from flexrun.errors import FlexrunError

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


def _positive(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value is not None and value < 1:
        raise click.BadParameter(f"must be >= 1, got {value}")
    return value


def _non_negative(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value is not None and value < 0:
        raise click.BadParameter(f"must be >= 0, got {value}")
    return value


@cli.command("config")
@click.argument("name")
@click.option("--batch-size", default=1, show_default=True, callback=_positive, help="Sequences in the batch.")
@click.option("--prompt-len", default=512, show_default=True, callback=_positive, help="Prompt tokens.")
@click.option("--gen-len", default=32, show_default=True, callback=_non_negative, help="Generated tokens.")
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


def main() -> None:
    cli(prog_name="flexrun")


if __name__ == "__main__":
    main()
