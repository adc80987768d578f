"""``flexrun plan`` and ``flexrun calibrate``: parsing and output only; the work is in ``flexrun.costmodel``.

The commands are registered on the ``flexrun`` group by ``flexrun.cli``.
"""

from __future__ import annotations

import json
from typing import Any

import click

from flexrun.cli_options import (
    AUTO_COMPRESSION,
    COMPRESSIONS,
    DTYPES,
    byte_size,
    compression_kind,
    hardware_spec,
    non_negative_int,
    positive_int,
)
from flexrun.errors import FlexrunError
from flexrun.precision import CHOICES as COMPUTE_CHOICES

_TRI = {"auto": None, "on": True, "off": False}
# --compress (FlexGen's one flag) as the two kinds it sets.
_BOTH = {"auto": AUTO_COMPRESSION, "on": "int4", "off": "none"}


def _pct_bytes(share: float, total: int) -> str:
    from flexrun.units import format_bytes

    return f"{share * 100:6.1f}% {format_bytes(share * total):>10}"


def _spec(shares: Any) -> str:
    """``host=40,disk=60`` rounded to 0.1%, the largest share absorbing the rounding so they add to 100."""
    from flexrun.placement import TIERS

    pct = {t: round(shares.get(t) * 100, 1) for t in TIERS}
    top = max(pct, key=lambda t: pct[t])
    pct[top] = round(100 - sum(v for t, v in pct.items() if t != top), 1)
    return ",".join(f"{t}={v:g}" for t, v in pct.items() if v > 0)


def _planned_kind(kind: str, both: str | None) -> Any:
    """One --compress-* value (or --compress's, when that was given instead) as ``plan`` takes it."""
    value = compression_kind(_BOTH[both] if both is not None and kind == AUTO_COMPRESSION else kind)
    return None if value == AUTO_COMPRESSION else value


def _gguf_blocks(model: str) -> Any:
    """The compression a GGUF file's own blocks are in (``weights.gguf.native_compression``), or None."""
    from flexrun.resolver import local_source
    from flexrun.weights.gguf import is_gguf, native_compression

    src = local_source(model)
    return native_compression(src) if src is not None and is_gguf(src) else None


def _plan_text(
    cfg: Any,
    plan: Any,
    kinds: dict[str, int],
    rule_dtype: str,
    sources: dict[str, str] | None = None,
    baseline: int | None = None,
    native: Any = None,
) -> str:
    from flexrun.costmodel.search import RELAXATION
    from flexrun.placement import TIERS
    from flexrun.units import format_bytes

    pl, pr, hw = plan.placement, plan.prediction, plan.hardware
    on_off = {True: "on", False: "off"}
    tiers = [t for t in TIERS if t in plan.budgets]
    budgets = ", ".join(f"{t} {format_bytes(b)}" for t, b in plan.budgets.items())
    relax = int(RELAXATION["host"] * 100)
    computed = f" computed in {cfg.run_dtype}" if cfg.run_dtype != cfg.dtype else ""
    kept = [f"{native.describe()} weights: the GGUF file's own blocks, kept as they are"] if native else []
    lines = [
        f"model:      {cfg.name} ({cfg.dtype}{computed}, {format_bytes(cfg.model_bytes())} of weights, "
        f"{cfg.num_hidden_layers} layers)",
        f"hardware:   {hw.name}: {hw.source}",
        f"budgets:    {budgets} (the plan uses at most {relax}% of each)",
        *[f"{t + ' from:':<12}{sources[t]}" for t in tiers if sources and t in sources],
        f"workload:   prompt {pr.prompt_len} + generate {pr.gen_len} tokens"
        if pr.gen_len
        else f"workload:   score {pr.prompt_len} tokens (prefill only, as flexrun score)",
        "",
        f"block:      {pl.gpu_batch_size} x {pl.num_gpu_batches} = {pl.block_size} sequences"
        f" (micro-batch size x micro-batches)",
        f"options:    compress weights {pl.compress_weight or 'off'}, compress cache {pl.compress_cache or 'off'},"
        f" host-side attention {on_off[pl.cpu_cache_compute]}",
        *[f"{'choices:' if i == 0 else '':<12}{r}" for i, r in enumerate(kept + list(plan.reasons))],
        "",
        f"{'tier':<8}" + "".join(f"{k:>19}" for k in ("weights", "cache", "activations")),
    ]
    for tier in tiers:
        cells = [_pct_bytes(getattr(pl, kind).get(tier), kinds[kind]) for kind in ("weights", "cache", "activations")]
        lines.append(f"{tier:<8}" + "".join(f"{c:>19}" for c in cells))
    peak = ", ".join(f"{t} {format_bytes(pr.peak[t])} of {format_bytes(plan.budgets[t])}" for t in tiers)
    if baseline is not None and "host" in tiers:  # the process's resident memory: its baseline and the buffers
        whole = format_bytes(baseline + plan.budgets["host"])
        peak += f"; process {format_bytes(baseline + pr.peak['host'])} of {whole} with its baseline"
    lines += [
        "",
        f"predicted:  prefill {pr.prefill_throughput:.2f} tok/s ({pr.prefill_s:.2f} s), "
        f"decode {pr.decode_throughput:.2f} tok/s ({pr.decode_s:.2f} s), "
        f"total {pr.throughput:.3g} tok/s ({pr.total_s:.2f} s per block)"
        if pr.gen_len
        else f"predicted:  scored {pr.prefill_throughput:.2f} tok/s ({pr.prefill_s:.2f} s per block)",
        f"bottleneck: {pr.bottleneck} (prefill: {pr.prefill.bottleneck}, decode: {pr.decode.bottleneck})"
        if pr.gen_len
        else f"bottleneck: {pr.prefill.bottleneck}",
        f"peak:       {peak}"
        + (f" (+ {format_bytes(pr.disk_weight_bytes)} of weights read from the store)" if pr.disk_weight_bytes else ""),
        f"search:     {plan.lps_solved} LPs in {plan.search_s:.2f} s",
        f"flags:      --weights {_spec(pl.weights)} --cache {_spec(pl.cache)} --activations {_spec(pl.activations)}"
        f" --gpu-batch-size {pl.gpu_batch_size} --num-gpu-batches {pl.num_gpu_batches}",
    ]
    if pl.compress_weight or pl.compress_cache:
        flags = f" --compress-weight {pl.compress_weight}" if pl.compress_weight else ""
        flags += f" --group-size {native.group_size}" if native else ""  # the GGUF file's own blocks, kept
        flags += f" --compress-cache {pl.compress_cache}" if pl.compress_cache else ""
        lines[-1] += flags
    if cfg.run_dtype != rule_dtype:  # generate would compute in the rule's dtype when nothing is planned
        lines[-1] += f" --compute-dtype {cfg.run_dtype}"
    if pl.cpu_cache_compute:
        lines[-1] += " --cpu-cache-compute on"
    return "\n".join(lines)


@click.command("plan")
@click.option("--model", "-m", required=True, help="Model name or checkpoint directory.")
@click.option("--prompt-len", default=512, show_default=True, callback=positive_int, help="Prompt tokens.")
@click.option(
    "--gen-len",
    default=32,
    show_default=True,
    callback=non_negative_int,
    help="Generated tokens; 0 plans a scoring pass (prefill only, no KV cache kept), as `flexrun score` runs.",
)
@click.option("--device-mem", callback=byte_size, help="Device memory budget, e.g. 14GiB (replaces the hardware's).")
@click.option("--host-mem", callback=byte_size, help="Host memory budget, e.g. 200GiB.")
@click.option("--disk-mem", callback=byte_size, help="Disk budget in the offload dir, e.g. 1.5TB.")
@click.option(
    "--hardware",
    callback=hardware_spec,
    help="A preset (cpu, t4, a100-40gb, a100-80gb, h100-80gb) or a JSON file from `flexrun calibrate`. "
    "Default: this machine's saved calibration (else a preset) with the budgets `generate` would use.",
)
@click.option("--dtype", type=click.Choice(DTYPES), help="Override the model's dtype.")
@click.option(
    "--compress-weight",
    type=click.Choice([AUTO_COMPRESSION, *COMPRESSIONS]),
    default=AUTO_COMPRESSION,
    show_default=True,
    help="Weight compression, as generate takes it: auto lets the planner choose (a lossier kind only when "
    "predicted at least 1.3x faster than each less lossy one, or when those do not fit), and says why.",
)
@click.option(
    "--compress-cache",
    type=click.Choice([AUTO_COMPRESSION, *COMPRESSIONS]),
    default=AUTO_COMPRESSION,
    show_default=True,
    help="KV cache compression, as --compress-weight.",
)
@click.option(
    "--compress",
    type=click.Choice(list(_TRI)),
    help="Both at once, FlexGen's flag: on is int4 weights and cache, off is none, auto lets the planner "
    "choose; a --compress-weight or --compress-cache given besides it wins.",
)
@click.option(
    "--cpu-cache-compute",
    "host_attention",
    type=click.Choice(list(_TRI)),
    default="off",
    show_default=True,
    help="Decode attention over a cache in host memory or on disk computed on the host, as generate's "
    "--cpu-cache-compute; auto tries both on a GPU machine, as generate and bench do by default (off here by "
    "default: trying both doubles the search).",
)
@click.option(
    "--compute-dtype",
    type=click.Choice(COMPUTE_CHOICES),
    default="auto",
    show_default=True,
    help="Dtype of the arithmetic (see generate); auto: the fastest the hardware's rates predict among the "
    "weights' dtype, float32 and (for 16-bit weights) bfloat16; without rates, the weights' dtype on a GPU, "
    "float32 for 16-bit weights on a CPU without matmul hardware for them.",
)
@click.option("--max-block-size", type=int, callback=positive_int, help="At most this many sequences per block.")
@click.option(
    "--tp",
    default=1,
    show_default=True,
    callback=positive_int,
    help="Tensor-parallel ranks: plan one rank's share plus the all-reduces. The ranks on one machine share its "
    "memory and disk budgets (given or free): each plans with an equal part.",
)
@click.option(
    "--nodes",
    default=1,
    show_default=True,
    callback=positive_int,
    help="Machines the --tp ranks are spread over (torchrun --nnodes), each with the budgets given: a machine's "
    "budgets are divided among its --tp / --nodes ranks.",
)
@click.option(
    "--interconnect-bw",
    callback=byte_size,
    help="Bytes per second between ranks, e.g. 1.25GB for a 10 Gb/s network between machines (default: gloo "
    "over loopback between local ranks).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output with exact byte counts.")
def plan_cmd(
    model: str,
    prompt_len: int,
    gen_len: int,
    device_mem: int | None,
    host_mem: int | None,
    disk_mem: int | None,
    hardware: Any,
    dtype: str | None,
    compress_weight: str,
    compress_cache: str,
    compress: str | None,
    host_attention: str,
    compute_dtype: str,
    max_block_size: int | None,
    tp: int,
    nodes: int,
    interconnect_bw: int | None,
    as_json: bool,
) -> None:
    """Choose a placement for MODEL with the cost model and print it, without running anything.

    The planner searches micro-batch sizes and counts and, for each, solves a linear program for the
    shares of weights, KV cache and activations on device, host and disk that maximise predicted
    throughput within the memory budgets. It prints the placement (tier x kind, in percent and bytes),
    the block shape, the predicted prefill / decode / total throughput, the bottleneck link and the peak
    memory per tier. What it was left to choose besides (the weight and cache compression, the compute
    dtype) it chooses too, and the choices line says why.
    """
    import dataclasses

    import torch

    from flexrun.costmodel.choice import compute_dtype_candidates
    from flexrun.costmodel.prediction import kind_bytes
    from flexrun.costmodel.search import plan
    from flexrun.errors import PlacementError
    from flexrun.precision import with_compute_dtype
    from flexrun.resolver import resolve
    from flexrun.runtime.tiers import ranks_note
    from flexrun.units import format_bytes

    cfg = resolve(model, **({"dtype": dtype} if dtype else {}))
    if cfg.encoder:
        raise FlexrunError(f"{model} is an encoder model: it generates nothing to plan; `flexrun embed` runs it")
    if cfg.position == "learned" and prompt_len + gen_len > cfg.max_seq_len:
        raise FlexrunError(
            f"--prompt-len {prompt_len} + --gen-len {gen_len} exceeds {cfg.name}'s {cfg.max_seq_len} positions"
        )
    if tp % nodes:
        raise click.BadParameter(f"--tp {tp} ranks do not spread evenly over {nodes} machines", param_hint="--nodes")
    local = tp // nodes  # the ranks sharing one machine's memory and disk
    if hardware is None:
        # This machine: the budgets `generate` would get (90% of the RAM its cgroup / rlimits / the machine leave,
        # the offload dir's free disk).
        from flexrun.paths import offload_root
        from flexrun.runtime.tiers import Budgets

        cuda = torch.cuda.is_available()
        budgets = Budgets(device=device_mem, host=host_mem, disk=disk_mem, ranks=local)
        tiers, sources = budgets.described(offload_root(None), cuda)
        baseline: int | None = budgets.host_budget().baseline
        # Its compute corrected from a probe of one of the model's layers here (measured now the first time);
        # not for tensor-parallel ranks, whose runs are not recorded either.
        from flexrun.costmodel.layerprobe import JobShape
        from flexrun.jobs.calibration import machine_hardware
        from flexrun.runtime.tiers import compute_device

        here = with_compute_dtype(cfg, compute_dtype, compute_device())
        job = JobShape(prompt_len, gen_len, block_size=max_block_size, num_prompts=max_block_size)
        hw = machine_hardware(None, None, here if tp == 1 else None, job).with_memory(
            device=tiers["device"] if cuda else None, host=tiers["host"], disk=tiers["disk"]
        )
    else:
        hw = hardware.with_memory(device=device_mem, host=host_mem, disk=disk_mem)
        sources, baseline = {}, None
        if local > 1:
            given = {
                "host": "--host-mem" if host_mem else "the spec's",
                "disk": "--disk-mem" if disk_mem else "the spec's",
            }
            sources = {
                t: f"1/{local} of {given[t]} {format_bytes(hw.memory(t))}, one of {local} local ranks' part"
                for t in given
            }
            hw = hw.with_memory(host=hw.host_mem // local, disk=hw.disk_mem // local)
    if tp > 1:
        from flexrun.parallel import check_split

        check_split(cfg, tp)
        hw = dataclasses.replace(hw, tp_ranks=tp, interconnect_bw=float(interconnect_bw or hw.interconnect_bw))
    # The CPU the spec describes is taken to be this one: its flags say whether 16-bit matmuls are native.
    cfg = with_compute_dtype(cfg, compute_dtype, torch.device("cpu" if hw.device_is_host else "cuda"))
    weight_kind = _planned_kind(compress_weight, compress)
    native = _gguf_blocks(model) if weight_kind is None else None
    if native is not None:  # a GGUF file's Q4/Q8 blocks, which generate and bench keep when it is left to them
        weight_kind = native.kind
    rule_dtype = cfg.run_dtype
    try:
        result = plan(
            cfg,
            hw,
            prompt_len,
            gen_len,
            compress=(weight_kind, _planned_kind(compress_cache, compress)),
            cpu_cache_compute=_TRI[host_attention],
            max_block_size=max_block_size,
            compute_dtypes=compute_dtype_candidates(cfg.dtype, rule_dtype, hw) if compute_dtype == "auto" else (),
        )
    except PlacementError as exc:
        if local == 1:
            raise
        raise PlacementError(f"{exc}{ranks_note(local)}") from None
    cfg = dataclasses.replace(cfg, compute_dtype="" if result.compute_dtype == cfg.dtype else result.compute_dtype)
    pl = result.placement
    kinds = kind_bytes(cfg, pl.block_size, prompt_len, gen_len, pl.compress_weight, pl.compress_cache)
    kinds = {k: n if k == "activations" else n // tp for k, n in kinds.items()}  # one rank's
    reduce = _all_reduce_share(cfg, result, hw) if tp > 1 else None
    if as_json:
        placed = {k: {t: int(getattr(pl, k).get(t) * n) for t in result.budgets} for k, n in kinds.items()}
        out = {
            "model": cfg.name,
            "dtype": cfg.dtype,
            "compute_dtype": cfg.run_dtype,
            "prompt_len": prompt_len,
            "gen_len": gen_len,
            "total_bytes": kinds,
            "placed_bytes": placed,
            "host_budget_source": sources.get("host"),
            "budget_sources": sources,
            "host_baseline_bytes": baseline,
            **result.to_dict(),
        }
        if reduce is not None:
            out["tensor_parallel"] = {**reduce, "nodes": nodes, "local_ranks": local}
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(_plan_text(cfg, result, kinds, rule_dtype, sources, baseline, native))
    if reduce is not None:
        link = "assumed: gloo over loopback"
        if interconnect_bw or hw.interconnect_bw:
            link = "--interconnect-bw" if interconnect_bw else "calibrate's" if hardware is None else "the spec's"
        click.echo(
            f"tensor par: {tp} ranks, {local} a machine, figures per rank; all-reduces "
            f"{reduce['decode_step_s'] * 1e3:.3g} ms of each {reduce['step_s'] * 1e3:.3g} ms decode step "
            f"({reduce['share']:.0%}), {reduce['bytes_per_layer']} bytes per layer per token over "
            f"{reduce['interconnect_bw'] / 1e9:.3g} GB/s and {reduce['latency_s'] * 1e6:.0f} us each ({link})"
        )


def _all_reduce_share(cfg: Any, result: Any, hw: Any) -> dict[str, float]:
    """The all-reduces' part of a decode step as the cost model predicts it."""
    from flexrun.costmodel.equations import LOOPBACK_BW, LOOPBACK_LATENCY, all_reduce_seconds

    pr, block = result.prediction, result.placement.block_size
    step = pr.decode_s / max(1, pr.gen_len - 1)
    reduce = all_reduce_seconds(cfg, hw, block, 1, 1) * cfg.num_hidden_layers
    per_layer = 1 if cfg.parallel_attn else 2
    return {
        "ranks": hw.tp_ranks,
        "latency_s": hw.interconnect_latency or LOOPBACK_LATENCY,
        "interconnect_bw": hw.interconnect_bw or LOOPBACK_BW,
        "bytes_per_layer": 2 * per_layer * cfg.hidden_size * cfg.run_dtype_bytes,
        "decode_step_s": reduce,
        "step_s": step,
        "share": reduce / step if step > 0 else 0.0,
    }


@click.command("calibrate")
@click.option(
    "--offload-dir", type=click.Path(file_okay=False), help="Where to measure the disk (default: the cache dir)."
)
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False),
    help="Also save the spec as a JSON file, for `--hardware FILE` (planning for this machine from another).",
)
@click.option("--dtype", type=click.Choice(DTYPES), help="Compute dtype (default: bfloat16 on CPU, float16 on CUDA).")
@click.option("--quick", is_flag=True, help="Small sizes, a few seconds; the figures understate the machine.")
@click.option("--json", "as_json", is_flag=True, help="Print the measured spec as JSON.")
def calibrate_cmd(offload_dir: str | None, out: str | None, dtype: str | None, quick: bool, as_json: bool) -> None:
    """Measure this machine's bandwidths and FLOP/s for the planner, and save them.

    Measures disk read (O_DIRECT) and write (fsync) bandwidth in the offload dir, host<->device copies
    when there is a GPU, matmul and attention FLOP/s at prefill- and decode-like shapes, and the all-reduce
    between two local processes (gloo) that --tp ranks pay, in well under a minute. `flexrun plan`,
    `generate` and `bench` then use the saved figures on this machine (a job that finds none measures a
    shorter set on first use, the all-reduce left out); the runs they record since are cleared.
    """
    from flexrun.costmodel.calcache import path_for
    from flexrun.costmodel.calibrate import calibrate
    from flexrun.costmodel.machine_id import machine_fingerprint
    from flexrun.units import format_bytes

    spec = calibrate(offload_dir=offload_dir, out=out, dtype=dtype, quick=quick)
    path = str(path_for(machine_fingerprint())) + (f" and {out}" if out else "")
    if as_json:
        click.echo(json.dumps({"path": path, **spec.to_dict()}, indent=2))
        return
    click.echo(f"saved:      {path}")
    click.echo(f"source:     {spec.source}")
    click.echo(
        "memory:     "
        + ", ".join(f"{t} {format_bytes(spec.memory(t))}" for t in spec.tiers())
        + (" (device = host RAM)" if spec.device_is_host else "")
    )
    rows = [
        ("disk->host", spec.disk_to_host_bw, "B/s"),
        ("host->disk", spec.host_to_disk_bw, "B/s"),
        ("host->device", spec.host_to_device_bw, "B/s"),
        ("device->host", spec.device_to_host_bw, "B/s"),
        ("device memory", spec.device_mem_bw, "B/s"),
        ("matmul prefill", spec.mm_flops_prefill, "FLOP/s"),
        ("matmul decode", spec.mm_flops_decode, "FLOP/s"),
        ("attention prefill", spec.bmm_flops_prefill, "FLOP/s"),
        ("attention decode", spec.bmm_flops_decode, "FLOP/s"),
        ("host attention", spec.host_attn_flops, "FLOP/s"),
    ]
    for name, value, unit in rows:
        if spec.device_is_host and "device" in name and "memory" not in name:
            continue
        shown = f"{format_bytes(value)}/s" if unit == "B/s" else f"{value / 1e9:.1f} GFLOP/s"
        click.echo(f"{name + ':':<19} {shown}")
    if spec.interconnect_bw:
        click.echo(
            f"{'all-reduce:':<19} {format_bytes(spec.interconnect_bw)}/s, {spec.interconnect_latency * 1e6:.0f} us "
            "a call (gloo between 2 local ranks, for --tp)"
        )
