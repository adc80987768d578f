"""The placement a run uses: the one given on the command line, or the planner's choice (``--placement auto``).

In auto mode the options the user did give are held (shares of a kind, the micro-batch size or count) and
the planner chooses the rest for this job's prompt and generation lengths, within the tier budgets the
runtime will enforce: with them, the weight and cache compression and the compute dtype when those are
left open (``AUTO``). Each weight compression is a store of its own, so a job plans first (``plan_job``,
on the config converting would give), opens the store the plan chose, then builds its engine
(``build_engine``). Host-side attention (``cpu_cache_compute``) is the planner's to choose when the request
leaves it open and the device is not the host.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from flexrun.config import OptConfig
from flexrun.costmodel.choice import compute_dtype_candidates
from flexrun.costmodel.hardware import PRESETS
from flexrun.costmodel.layerprobe import JobShape
from flexrun.costmodel.prediction import predict
from flexrun.costmodel.search import plan
from flexrun.errors import BudgetError, PlacementError
from flexrun.jobs.calibration import machine_hardware, per_rank
from flexrun.jobs.options import AUTO, EngineOptions, ModelOptions, PlacementRequest
from flexrun.jobs.tp import announce
from flexrun.parallel import SLICE_FIX, current, slice_bytes, sliced_at_load
from flexrun.paths import offload_root
from flexrun.placement import TIERS, Placement, Shares
from flexrun.precision import with_compute_dtype
from flexrun.quant.formats import QuantSpec
from flexrun.resolver import ModelSource
from flexrun.runtime.engine import Engine
from flexrun.runtime.tiers import Budgets, budget_fix, compute_device, disk_free, ranks_note
from flexrun.units import format_bytes
from flexrun.weights.store import TensorStore

log = logging.getLogger(__name__)

KINDS = ("weights", "cache", "activations")
# Re-plans after the runtime's exact accounting finds a planned placement over a budget.
_REPLANS = 3


@dataclass(frozen=True)
class Planned:
    """The placement for a run and, when the planner chose it, the line that describes the plan, the
    compute dtype it planned for and why it chose what it was left to choose."""

    placement: Placement
    line: str | None = None
    compute_dtype: str = ""
    reasons: tuple[str, ...] = ()
    host_budget: int | None = None  # the host budget the planner planned within (its reserve taken off)


@dataclass(frozen=True)
class JobPlan:
    """A job's choices made before its store opens: the options with nothing left AUTO, and the plan that
    made them (None when nothing was planned)."""

    opts: EngineOptions
    planned: Planned | None = None


def plan_job(
    opts: EngineOptions,
    source: ModelSource,
    prompt_len: int,
    gen_len: int,
    num_prompts: int | None = None,
) -> JobPlan:
    """Settle what ``opts`` leaves open for ``prompt_len + gen_len`` tokens: with a placement to plan, the
    planner chooses the compressions and compute dtype left AUTO (the weights' only where the model is not
    an existing store, which holds what it holds, or a GGUF file, whose Q4/Q8 blocks are kept as they
    are); without one, AUTO compression is off and the compute dtype follows ``precision``'s rule."""
    if source.store is not None and opts.model.compress_weight == AUTO:
        opts = dataclasses.replace(opts, model=opts.model.held_by(source.store))
    native = source.native_compression()
    if native and opts.model.compress_weight == AUTO and opts.model.group_size in (None, native.group_size):
        # A GGUF file's own 4- or 8-bit blocks: the same values as dequantizing them, in a fraction of the bytes.
        model = dataclasses.replace(opts.model, compress_weight=native.kind, group_size=native.group_size)
        opts = dataclasses.replace(opts, model=model)
    sliced = _slice_estimate(source)
    if not opts.placement.planned:
        settled = opts.settled(compress_weight="", compress_cache="")
        check_manual(settled, source.config, prompt_len, gen_len, num_prompts, sliced)
        return JobPlan(settled)
    model = opts.model
    cfg = with_compute_dtype(source.config, model.compute_dtype, compute_device())
    planned = choose_placement(
        cfg,
        opts.placement,
        opts.budgets,
        prompt_len,
        gen_len,
        num_prompts,
        opts.offload_dir,
        {"disk": sliced} if sliced else None,
        compress_weight=compressible(cfg, model.group_size) if model.compress_weight == AUTO else model.compress_weight,
        choose_dtype=model.compute_dtype == AUTO,
    )
    pl = planned.placement
    return JobPlan(opts.settled(pl.compress_weight, pl.compress_cache, planned.compute_dtype), planned)


def _slice_estimate(source: ModelSource) -> int:
    """Disk bytes this tensor-parallel rank's slice of a whole store takes, written at load into the offload
    dir (0 on one rank or with a rank's own store): exact for an existing store, else 1/world of the model."""
    tp = current()
    if tp.world == 1:
        return 0
    if source.store is not None:
        return slice_bytes(source.store, tp.shard) if sliced_at_load(source.store, tp.shard) else 0
    return source.config.model_bytes() // tp.world


def check_manual(
    opts: EngineOptions,
    cfg: OptConfig,
    prompt_len: int,
    gen_len: int,
    num_prompts: int | None = None,
    sliced: int = 0,
) -> None:
    """Refuse a placement given whole (``--placement manual``, or every share and the block given) whose
    predicted memory does not fit a tier's budget, before any store is written or weight read, naming the
    flags of a placement that does fit. The engine's exact ledger checks again once the store is open.
    ``sliced``: disk bytes of a tensor-parallel rank's slice of the store, written at load."""
    has_cuda = torch.cuda.is_available()
    dtype = None if opts.model.compute_dtype == AUTO else opts.model.compute_dtype
    run_cfg = with_compute_dtype(cfg, dtype, compute_device())
    tiers, sources = opts.budgets.described(offload_root(opts.offload_dir), has_cuda)
    hw = opts.placement.hardware or PRESETS["a100-40gb" if has_cuda else "cpu"]  # memory figures only
    hw = per_rank(hw.with_memory(device=tiers["device"] if has_cuda else None, host=tiers["host"], disk=tiers["disk"]))
    kind = opts.model.compress_weight if opts.model.compress_weight != AUTO else ""
    placement = dataclasses.replace(opts.placement.manual(), compress_weight=kind)
    peak = predict(run_cfg, hw, placement, prompt_len, gen_len).peak
    for tier in ("device", "host", "disk") if has_cuda else ("host", "disk"):
        need, have = int(peak.get(tier, 0)), tiers[tier]
        slice_note = ""
        if tier == "disk" and sliced:
            need += sliced
            slice_note = f" (with this rank's slice of the store, {format_bytes(sliced)})"
        if need > have:
            fix = budget_fix(tier, have, offload_root(opts.offload_dir))
            fits = ""
            if slice_note and sliced > have:  # no placement puts the slice elsewhere
                fix = SLICE_FIX.format(world=current().world)
            else:
                fits = fitting_flags(run_cfg, opts, prompt_len, gen_len, num_prompts, kind, {"disk": sliced})
            part = f" ({sources[tier]})" if "local ranks" in sources[tier] else ""
            raise BudgetError(
                f"placement does not fit: the {tier} tier needs about {format_bytes(need)}{slice_note} but its "
                f"budget is {format_bytes(have)}{part}, short by {format_bytes(need - have)}; {fix}{fits}",
                tier,
                need,
                have,
            )


def fitting_flags(
    cfg: OptConfig,
    opts: EngineOptions,
    prompt_len: int,
    gen_len: int,
    num_prompts: int | None,
    compress_weight: str | tuple[str, ...],
    reserve: dict[str, int] | None = None,
) -> str:
    """ "; these flags fit: ..." naming a placement the planner finds within ``opts``' budgets (less
    ``reserve``) with nothing held (so it may take a smaller block and put weights on disk), or why none does."""
    request = PlacementRequest(mode="auto", overlap=opts.placement.overlap, hardware=opts.placement.hardware)
    try:
        pl = choose_placement(
            cfg,
            request,
            opts.budgets,
            prompt_len,
            gen_len,
            num_prompts,
            opts.offload_dir,
            reserve,
            compress_weight=compress_weight,
        ).placement
    except PlacementError as exc:
        return f"; no placement fits these budgets ({str(exc).split('; ')[0]})"
    spec = {kind: _rounded(getattr(pl, kind)) for kind in KINDS}
    flags = f"--weights {spec['weights']} --cache {spec['cache']} --activations {spec['activations']} "
    flags += f"--gpu-batch-size {pl.gpu_batch_size} --num-gpu-batches {pl.num_gpu_batches}"
    flags += f" --compress-weight {pl.compress_weight}" if pl.compress_weight else ""
    flags += f" --compress-cache {pl.compress_cache}" if pl.compress_cache else ""
    flags += " --cpu-cache-compute on" if pl.cpu_cache_compute else ""
    return f"; these flags fit: {flags} (or leave the placement to the planner)"


def _rounded(shares: Shares) -> str:
    """``host=73.9,disk=26.1``: shares to 0.1%, the largest absorbing the rounding (rounded down elsewhere,
    so the flags never ask more of a tier than the plan did)."""
    pct = {t: math.floor(shares.get(t) * 1000) / 10 for t in TIERS}
    top = max(pct, key=lambda t: shares.get(t))
    pct[top] = round(100 - sum(v for t, v in pct.items() if t != top), 1)
    return ",".join(f"{t}={v:g}" for t, v in pct.items() if v > 0)


def compressible(cfg: OptConfig, group_size: int | None = None) -> tuple[str, ...]:
    """The weight compressions the layers' matrices allow at ``group_size`` ("" always): the planner is
    not offered one that converting would refuse (a group size that does not divide a matrix's K)."""
    matrices = [shape for shape in cfg.layer_shapes().values() if len(shape) == 2]
    kinds = [""]
    for kind in ("int8", "int4"):
        spec = QuantSpec.of(kind, group_size)
        if all(shape[1] % spec.group_size == 0 for shape in matrices if spec.group_size):
            kinds.append(kind)
    return tuple(kinds)


def build_engine(
    store: TensorStore,
    cfg: OptConfig,
    opts: EngineOptions,
    prompt_len: int,
    gen_len: int,
    num_prompts: int | None = None,
    planned: Planned | None = None,
    runner: type[Engine] = Engine,
) -> tuple[Engine, str | None]:
    """An engine (of class ``runner``) for ``prompt_len + gen_len`` tokens computing in ``cfg``'s (resolved)
    compute dtype, with the run's placement (``planned``, ``plan_job``'s, else ``choose_placement``'s), and the
    plan's line when the planner chose it.

    The planner's memory model is linear in the shares, so it prorates buffers that the runtime reserves
    whole as soon as any share of a kind leaves a tier (streaming arenas, KV staging). When the runtime's
    exact accounting finds a planned placement over a budget, the planner runs again with that much less,
    the compression and compute dtype held as chosen.
    """
    reserve: dict[str, int] = {}
    refused: BudgetError | None = None
    # Weights are compressed when the store is converted: the placement says what the store holds.
    compress_weight = store.weight_compression
    fell = ""
    if planned is not None and planned.host_budget is not None and opts.placement.planned:
        # Planned before the store opened: converting it (a GGUF file's reader and transformers' modules, which
        # stay imported) may have grown this process since, and the host budget is what it may hold less that.
        now = opts.budgets.resolved(offload_root(opts.offload_dir), torch.cuda.is_available())["host"]
        if now < planned.host_budget:
            fell = f"{format_bytes(planned.host_budget)} to {format_bytes(now)}"
            log.info("the host budget fell from %s since the plan; planning again", fell)
    for _ in range(_REPLANS + 1):
        try:
            if planned is None or reserve or fell:
                again = choose_placement(
                    cfg,
                    opts.placement,
                    opts.budgets,
                    prompt_len,
                    gen_len,
                    num_prompts,
                    opts.offload_dir,
                    reserve,
                    compress_weight,
                    reasons=planned.reasons if planned else (),
                )
                planned, fell = again, ""
        except PlacementError as exc:
            if fell:
                raise PlacementError(
                    f"{exc}; the host budget fell from {fell} while the model's store was opened (a conversion "
                    "leaves its reader's modules in this process): the store is cached now, so running the "
                    "same command again starts with the budget this plan had"
                ) from None
            if refused is None:
                raise
            raise refused from None  # the runtime's exact figures say more than the planner's on less
        try:
            engine = runner(
                store,
                planned.placement,
                prompt_len + gen_len,
                budgets=opts.budgets,
                offload_dir=opts.offload_dir,
                compute_dtype=cfg.run_dtype,
                tp=current(),
            )
        except BudgetError as exc:
            if not opts.placement.planned:
                fits = fitting_flags(cfg, opts, prompt_len, gen_len, num_prompts, compress_weight)
                raise BudgetError(f"{exc}{fits}", exc.tier, exc.need, exc.have) from None
            refused = exc
            short = exc.need - exc.have
            reserve[exc.tier] = reserve.get(exc.tier, 0) + short + short // 4 + 4096
            log.info("planned placement is %s short on %s; planning again", format_bytes(short), exc.tier)
            continue
        try:
            announce(engine, opts)  # the other tensor-parallel ranks build the same engine
        except BaseException:
            engine.close()
            raise
        return engine, planned.line
    assert refused is not None
    raise refused


def choose_placement(
    cfg: OptConfig,
    request: PlacementRequest,
    budgets: Budgets,
    prompt_len: int,
    gen_len: int,
    num_prompts: int | None = None,
    offload_dir: str | None = None,
    reserve: dict[str, int] | None = None,
    compress_weight: str | tuple[str, ...] = "",
    choose_dtype: bool = False,
    reasons: tuple[str, ...] = (),
) -> Planned:
    """The run's placement: ``request`` as given (manual, or nothing left open), else the planner's choice
    for what it leaves open. ``reserve`` holds bytes per tier kept out of the planner's budgets;
    ``compress_weight`` is how the store holds the weights (or the kinds the planner may choose among, as
    it chooses the request's AUTO cache compression); ``choose_dtype``: the planner weighs compute dtypes besides ``cfg``'s
    (``precision``'s rule). ``reasons``: why earlier choices were made, for the line when they are held."""
    if not request.planned:
        weights = compress_weight if isinstance(compress_weight, str) else ""
        return Planned(dataclasses.replace(request.manual(), compress_weight=weights))
    has_cuda = torch.cuda.is_available()
    root = offload_root(offload_dir)
    tiers = budgets.resolved(root, has_cuda)
    host_source = budgets.host_budget().source
    tiers = {t: max(b - (reserve or {}).get(t, 0), 0) for t, b in tiers.items()}
    gbs, nb = request.gpu_batch_size, request.num_gpu_batches
    job = JobShape(prompt_len, gen_len, gbs, gbs * nb if gbs and nb else None, num_prompts)
    hw = machine_hardware(request.hardware, offload_dir, cfg, job)
    hw = per_rank(hw.with_memory(device=tiers["device"] if has_cuda else None, host=tiers["host"], disk=tiers["disk"]))
    fixed = {k: getattr(request, k) for k in KINDS if getattr(request, k) is not None}
    # A block bigger than the job only pads; with a micro-batch count given, the size is what it caps.
    max_block = num_prompts if num_prompts and gbs is None else None
    cache = None if request.compress_cache == AUTO else request.compress_cache
    try:
        result = plan(
            cfg,
            hw,
            prompt_len,
            gen_len,
            compress=(compress_weight, cache),
            cpu_cache_compute=request.cpu_cache_compute,
            gpu_batch_sizes=[gbs] if gbs else None,
            max_block_size=max_block,
            fixed=fixed,
            num_gpu_batches=request.num_gpu_batches,
            compute_dtypes=compute_dtype_candidates(cfg.dtype, cfg.run_dtype, hw) if choose_dtype else (),
        )
    except PlacementError as exc:
        note = ranks_note(budgets.ranks)
        if "disk" in getattr(exc, "short", {}) and tiers["disk"] >= disk_free(root):
            # More --disk-mem cannot help when the offload dir's filesystem itself is the limit.
            note = (
                f"; the offload dir {root} has {format_bytes(disk_free(root))} free, --offload-dir can point elsewhere"
            )
        if fixed or gbs or request.num_gpu_batches:  # what the user held may be what does not fit
            opts = EngineOptions(ModelOptions(cfg.name), request, budgets, offload_dir)
            fits = fitting_flags(cfg, opts, prompt_len, gen_len, num_prompts, compress_weight)
            if fits.startswith("; these flags fit"):
                note += fits
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
        overlap=request.overlap,
        compress_weight=pl.compress_weight,
        compress_cache=pl.compress_cache,
    )
    pr = result.prediction
    why = result.reasons or reasons
    line = (
        f"plan ({hw.name}, budgets {', '.join(f'{t} {format_bytes(b)}' for t, b in result.budgets.items())}; "
        f"host from {host_source}): "
        f"{placement.describe()}; predicted {pr.throughput:.3g} tok/s, bottleneck {pr.bottleneck}"
        + "".join(f"; {r}" for r in why)
    )
    log.info("%s", line)
    return Planned(placement, line, result.compute_dtype or cfg.run_dtype, why, tiers["host"])
