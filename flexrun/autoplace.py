"""The placement a run uses: the one given on the command line, or the planner's choice (``--placement auto``).

In auto mode the options the user did give are held (shares of a kind, the micro-batch size or count) and
the planner chooses the rest for this job's prompt and generation lengths, within the tier budgets the
runtime will enforce. Options the runtime does not implement (compression, host-side attention) are not
offered to the planner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from flexrun.config import OptConfig
from flexrun.errors import BudgetError, PlacementError
from flexrun.paths import offload_root
from flexrun.placement import Placement, Shares
from flexrun.runtime.precision import with_compute_dtype
from flexrun.runtime.tiers import Budgets, compute_device, disk_free
from flexrun.units import format_bytes

if TYPE_CHECKING:
    from flexrun.runtime.engine import Engine
    from flexrun.weights.store import TensorStore

log = logging.getLogger(__name__)

KINDS = ("weights", "cache", "activations")
# What `--placement manual` uses for an option left out.
# Re-plans after the runtime's exact accounting finds a planned placement over a budget.
_REPLANS = 3
MANUAL_DEFAULTS: dict[str, Any] = {
    "weights": Shares(),
    "cache": Shares(),
    "activations": Shares(),
    "gpu_batch_size": 4,
    "num_gpu_batches": 1,
}


def manual_placement(opts: dict[str, Any]) -> Placement:
    """The placement spelled by the options, with ``MANUAL_DEFAULTS`` for those left out."""
    given = {k: opts[k] if opts.get(k) is not None else v for k, v in MANUAL_DEFAULTS.items()}
    return Placement(**given, overlap=opts.get("overlap", True))


def is_planned(opts: dict[str, Any]) -> bool:
    """Whether the planner chooses any part of the placement (auto mode with something left open)."""
    given = all(opts.get(k) is not None for k in MANUAL_DEFAULTS)
    return opts.get("placement", "auto") == "auto" and not given


def build_engine(
    store: TensorStore,
    opts: dict[str, Any],
    budgets: Budgets,
    prompt_len: int,
    gen_len: int,
    num_prompts: int | None = None,
    report: Callable[[str], None] | None = None,
) -> Engine:
    """An engine for ``prompt_len + gen_len`` tokens with the run's placement (see ``choose_placement``).

    The planner's memory model is linear in the shares, so it prorates buffers that the runtime reserves
    whole as soon as any share of a kind leaves a tier (streaming arenas, KV staging). When the runtime's
    exact accounting finds a planned placement over a budget, the planner runs again with that much less.
    """
    from flexrun.runtime.engine import Engine

    cfg = with_compute_dtype(store.config, opts.get("compute_dtype"), compute_device())
    reserve: dict[str, int] = {}
    lines: list[str] = []
    refused: BudgetError | None = None
    for _ in range(_REPLANS + 1):
        try:
            placement = choose_placement(
                cfg, opts, budgets, prompt_len, gen_len, num_prompts, report=lines.append, reserve=reserve
            )
        except PlacementError:
            if refused is None:
                raise
            raise refused from None  # the runtime's exact figures say more than the planner's on less
        try:
            engine = Engine(
                store,
                placement,
                prompt_len + gen_len,
                budgets=budgets,
                offload_dir=opts.get("offload_dir"),
                compute_dtype=cfg.run_dtype,
            )
        except BudgetError as exc:
            if not is_planned(opts):
                raise
            refused = exc
            short = exc.need - exc.have
            reserve[exc.tier] = reserve.get(exc.tier, 0) + short + short // 4 + 4096
            log.info("planned placement is %s short on %s; planning again", format_bytes(short), exc.tier)
            lines.clear()
            continue
        if report is not None:
            for line in lines:
                report(line)
        return engine
    assert refused is not None
    raise refused


def choose_placement(
    cfg: OptConfig,
    opts: dict[str, Any],
    budgets: Budgets,
    prompt_len: int,
    gen_len: int,
    num_prompts: int | None = None,
    report: Callable[[str], None] | None = None,
    reserve: dict[str, int] | None = None,
) -> Placement:
    """The run's placement. ``opts`` holds the CLI's placement options (None where not given), ``placement``
    ("auto" or "manual"), ``hardware`` (a HardwareSpec or None) and ``overlap``. ``report`` gets one line
    describing a planned placement; ``reserve`` holds bytes per tier kept out of the planner's budgets."""
    if not is_planned(opts):
        return manual_placement(opts)
    from flexrun.costmodel.hardware import load_hardware
    from flexrun.costmodel.search import plan

    has_cuda = torch.cuda.is_available()
    tiers = budgets.resolved(offload_root(opts.get("offload_dir")), has_cuda)
    tiers = {t: max(b - (reserve or {}).get(t, 0), 0) for t, b in tiers.items()}
    hw = opts.get("hardware") or load_hardware(None)
    hw = hw.with_memory(device=tiers["device"] if has_cuda else None, host=tiers["host"], disk=tiers["disk"])
    fixed = {k: opts[k] for k in KINDS if opts.get(k) is not None}
    gbs = opts.get("gpu_batch_size")
    nb = opts.get("num_gpu_batches")
    # A block bigger than the job only pads; with a micro-batch count given, the size is what it caps.
    max_block = num_prompts if num_prompts and gbs is None else None
    try:
        result = plan(
            cfg,
            hw,
            prompt_len,
            gen_len,
            compress=False,
            cpu_cache_compute=False,
            gpu_batch_sizes=[gbs] if gbs else None,
            max_block_size=max_block,
            fixed=fixed,
            num_gpu_batches=nb,
        )
    except PlacementError as exc:
        note = ""
        root = offload_root(opts.get("offload_dir"))
        if "disk" in getattr(exc, "short", {}) and tiers["disk"] >= disk_free(root):
            # More --disk-mem cannot help when the offload dir's filesystem itself is the limit.
            note = (
                f"; the offload dir {root} has {format_bytes(disk_free(root))} free, --offload-dir can point elsewhere"
            )
        raise PlacementError(
            f"{exc}{note}; or give the placement yourself (--placement manual --weights ...)"
        ) from None
    pl = result.placement
    placement = Placement(
        weights=pl.weights,
        cache=pl.cache,
        activations=pl.activations,
        gpu_batch_size=pl.gpu_batch_size,
        num_gpu_batches=pl.num_gpu_batches,
        overlap=opts.get("overlap", True),
    )
    pr = result.prediction
    line = (
        f"plan ({hw.name}, budgets {', '.join(f'{t} {format_bytes(b)}' for t, b in result.budgets.items())}): "
        f"{placement.describe()}; predicted {pr.throughput:.3g} tok/s, bottleneck {pr.bottleneck}"
    )
    log.info("%s", line)
    if report is not None:
        report(line)
    return placement
