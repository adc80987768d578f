"""Click options shared by the commands: validating callbacks (a bad value is a usage error, exit 2) and
the engine options, typed once here into the library's option dataclasses."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from flexrun.errors import FlexrunError


def positive_int(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise click.BadParameter(f"must be >= 1, got {value}")
    return value


def non_negative_int(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value is not None and value < 0:
        raise click.BadParameter(f"must be >= 0, got {value}")
    return value


def byte_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from flexrun.units import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def tier_shares(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    from flexrun.placement import Shares

    if value is None:
        return None
    try:
        return Shares.parse(value)
    except FlexrunError as exc:
        raise click.BadParameter(str(exc)) from None


def hardware_spec(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    from flexrun.costmodel.hardware import load_hardware

    if value is None:
        return None
    try:
        return load_hardware(value)
    except FlexrunError as exc:
        raise click.BadParameter(str(exc)) from None


# ---- the engine options generate, bench and embed share ------------------------------------------------
DTYPES = ["float32", "float16", "bfloat16"]
_ENGINE_KEYS = (
    "model",
    "dtype",
    "compute_dtype",
    "dummy_weights",
    "store_dir",
    "placement",
    "hardware",
    "weights",
    "cache",
    "activations",
    "gpu_batch_size",
    "num_gpu_batches",
    "overlap",
    "offload_dir",
    "device_mem",
    "host_mem",
    "disk_mem",
    "tp",
    "compress_weight",
    "group_size",
    "compress_cache",
    "cpu_cache_compute",
)
COMPRESSIONS = ["none", "int8", "int4"]
# Left to the planner under --placement auto; off when nothing is planned.
AUTO_COMPRESSION = "auto"
_PLANNED_HELP = (
    " auto (the default): the planner's choice under --placement auto, which takes a lossier kind only when it "
    "predicts it at least 1.3x faster than each less lossy one (or they do not fit), and says why; none under "
    "--placement manual."
)


def compress_weight_options(planned: bool = False) -> list[Any]:
    """--compress-weight and --group-size, shared by convert and the engine commands (``planned``: the
    commands whose planner may choose the compression, which then defaults to auto)."""
    choices = [AUTO_COMPRESSION, *COMPRESSIONS] if planned else COMPRESSIONS
    return [
        click.option(
            "--compress-weight",
            type=click.Choice(choices),
            default=AUTO_COMPRESSION if planned else "none",
            show_default=not planned,
            help="Store the layers' matmul weights compressed: int4 (group-wise min-max, 0.56 bytes a weight at "
            "group 64) or int8 (one scale per row, or per group with --group-size), or none. A checkpoint "
            "converts once per compression." + (_PLANNED_HELP if planned else ""),
        ),
        click.option(
            "--group-size",
            type=click.Choice(["32", "64", "128", "256"]),
            callback=lambda ctx, param, value: int(value) if value else None,
            help="Values per scale along each weight row (int4 default 64; int8 default: one per row).",
        ),
    ]


def sampling_options(seed_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--temperature, --top-p, --top-k, --repetition-penalty and --seed, as generate and chat share them."""
    options = [
        click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True)),
        click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0)),
        click.option(
            "--repetition-penalty", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True)
        ),
        click.option("--seed", default=0, show_default=True, type=int, help=seed_help),
    ]

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):  # the order they are listed in --help
            fn = option(fn)
        return fn

    return apply


def engine_options(encoder: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The model, weights and placement options of the commands that run the engine, collected into one
    ``EngineOptions`` passed to the command as ``engine``. ``encoder``: for ``embed``, whose model is never
    planned and keeps no KV cache (no --placement, --hardware, --cache; micro-batches of 8 by default)."""
    from flexrun.precision import CHOICES as COMPUTE_CHOICES

    model_help = (
        "Encoder checkpoint directory or tensor store (BERT, RoBERTa)."
        if encoder
        else "Model name, checkpoint directory or tensor store."
    )
    options = [
        click.option("--model", "-m", required=True, help=model_help),
        click.option(
            "--dtype", type=click.Choice(DTYPES), help="Weight dtype." if encoder else "Weight and KV cache dtype."
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
    ]
    if not encoder:
        options += [
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
                help="Hardware figures for the planner: a preset or a `flexrun calibrate` JSON (default: this "
                "machine's).",
            ),
        ]
    options.append(click.option("--weights", callback=tier_shares, help="Weight shares, e.g. host=40,disk=60."))
    if not encoder:
        options.append(click.option("--cache", callback=tier_shares, help="KV cache shares, e.g. host=100."))
    batch_defaults: dict[str, Any] = {"default": 8, "show_default": True} if encoder else {"type": int}
    count_defaults: dict[str, Any] = {"default": 1, "show_default": True} if encoder else {"type": int}
    options += compress_weight_options(planned=not encoder)
    if not encoder:
        options.append(
            click.option(
                "--compress-cache",
                type=click.Choice([AUTO_COMPRESSION, *COMPRESSIONS]),
                default=AUTO_COMPRESSION,
                help="Store the KV cache compressed, per token and KV head: int8 or int4 (FlexGen's scheme), or "
                "none." + _PLANNED_HELP,
            )
        )
        options.append(
            click.option(
                "--cpu-cache-compute",
                type=click.Choice(["auto", "on", "off"]),
                default="auto",
                show_default=True,
                help="On a GPU, decode attention over the KV cache held in host memory or on disk runs on the CPU, "
                "so only the new token's q, k, v and the attention output cross PCIe (FlexGen's "
                "--cpu-cache-compute). auto: the planner's choice under --placement auto, off under manual. On "
                "a CPU attention runs there anyway.",
            )
        )
    options += [
        click.option("--activations", callback=tier_shares, help="Activation shares, e.g. host=100."),
        click.option("--gpu-batch-size", callback=positive_int, help="Sequences per micro-batch.", **batch_defaults),
        click.option("--num-gpu-batches", callback=positive_int, help="Micro-batches per block.", **count_defaults),
        click.option("--overlap/--no-overlap", default=True, show_default=True, help="Overlap I/O with compute."),
        click.option(
            "--offload-dir",
            type=click.Path(file_okay=False),
            help="Directory for disk-resident activations."
            if encoder
            else "Directory for disk-resident cache and activations.",
        ),
        click.option("--device-mem", callback=byte_size, help="Device memory budget, e.g. 14GiB."),
        click.option("--host-mem", callback=byte_size, help="Host memory budget, e.g. 8GiB."),
        click.option(
            "--disk-mem",
            callback=byte_size,
            help="Disk budget in the offload dir, for the KV cache and activations placed on disk (weights on disk "
            "are read in place from their store and take none).",
        ),
    ]
    options.append(
        click.option(
            "--tp",
            default=1,
            show_default=True,
            callback=positive_int,
            help="Tensor-parallel ranks: N local processes, each holding 1/N of every layer and taking 1/N of "
            "this machine's memory and disk budgets. Under torchrun, its WORLD_SIZE (a machine's budgets divided "
            "among its LOCAL_WORLD_SIZE ranks).",
        )
    )

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(**values: Any) -> Any:
            given = {k: values.pop(k) for k in _ENGINE_KEYS if k in values}
            engine = _engine_options(given, encoder)
            if engine.tp > 1:
                _launch_ranks(engine, "embed" if encoder else "generate")
            return fn(engine=engine, **values)

        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _launch_ranks(engine: Any, task: str) -> None:
    """With --tp N outside a launcher (no WORLD_SIZE): the command again in N local ranks, then exit with
    their status. Under torchrun (or in a rank) the command runs as this rank."""
    from flexrun.parallel import check_split, launched
    from flexrun.parallel.launch import run_local

    if launched():
        return
    check_split(engine.model.source(task).config, engine.tp)  # refused here, once, before any rank starts
    root = click.get_current_context().find_root().command

    def entry(argv: list[str]) -> None:
        root.main(args=argv, prog_name="flexrun")

    raise SystemExit(run_local(engine.tp, entry, sys.argv[1:]))


def compression_kind(value: str | None) -> str:
    """A --compress-* value as the library takes it: "" (none), "int8", "int4" or "auto"."""
    return "" if value in (None, "none") else str(value)


def _engine_options(v: dict[str, Any], encoder: bool) -> Any:
    """The typed ``EngineOptions`` from the engine options' parsed values."""
    from flexrun.jobs.options import EngineOptions, ModelOptions, PlacementRequest
    from flexrun.runtime.tiers import Budgets

    budgets = Budgets(device=v["device_mem"], host=v["host_mem"], disk=v["disk_mem"])
    if budgets.host is not None:
        budgets.host_budget()  # a --host-mem above the cgroup's or rlimit's limit: refused before any weight is read
    return EngineOptions(
        model=ModelOptions(
            model=v["model"],
            dtype=v["dtype"],
            compute_dtype=v["compute_dtype"],
            dummy_weights=v["dummy_weights"],
            store_dir=v["store_dir"],
            compress_weight=compression_kind(v["compress_weight"]),
            group_size=v["group_size"],
        ),
        placement=PlacementRequest(
            mode="manual" if encoder else v["placement"],
            weights=v["weights"],
            cache=v.get("cache"),
            activations=v["activations"],
            gpu_batch_size=v["gpu_batch_size"],
            num_gpu_batches=v["num_gpu_batches"],
            overlap=v["overlap"],
            hardware=v.get("hardware"),
            compress_cache=compression_kind(v.get("compress_cache")),
            cpu_cache_compute={"on": True, "off": False}.get(v.get("cpu_cache_compute") or "auto"),
        ),
        budgets=budgets,
        offload_dir=v["offload_dir"],
        tp=v.get("tp") or 1,
    )
