"""The placement planner: a small search over batch shapes and options, an LP (``costmodel.lp``) per shape.

The search walks micro-batch sizes upward and, for each, doubles the number of micro-batches until the
plan stops improving or stops fitting, then bisects between the last count that helped and that one;
shapes that cannot beat the best plan found so far even with free transfers are skipped without an LP. On
a CPU-only machine the device tier is host RAM: the LP has two tiers and no device shares.

It searches once per set of options: each compression the planner weighs (off, int8, int4 for the weights
and for the cache, whichever are left open) and each compute dtype, then chooses among them as
``costmodel.choice`` says (a lossier compression only for a big enough gain, the fastest compute dtype).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flexrun.config import OptConfig
from flexrun.costmodel.choice import (
    DTYPE_GAIN,
    LEVELS,
    Kinds,
    choose_compression,
    choose_dtype,
    compression_reasons,
    dtype_reason,
)
from flexrun.costmodel.equations import CostTerms, Key, compression, cost_terms
from flexrun.costmodel.hardware import HardwareSpec
from flexrun.costmodel.lp import (
    RELAXATION,
    InfeasibleError,
    Option,
    fits,
    infeasible,
    real_tiers,
    solve_lp,
    time_floor,
)
from flexrun.costmodel.prediction import Prediction, evaluate
from flexrun.errors import PlacementError
from flexrun.placement import TIERS, Placement, Shares

__all__ = ["RELAXATION", "InfeasibleError", "Plan", "plan", "solve_lp"]

log = logging.getLogger(__name__)

GPU_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MAX_GPU_BATCHES = 64
# Predicted throughputs within this fraction of each other count as a tie.
TIE = 0.01
PRUNED = -1.0  # a shape skipped without an LP: it cannot beat (or tie) the best plan found so far


@dataclass(frozen=True)
class Plan:
    """The planner's choice: a placement and what the cost model predicts for it."""

    placement: Placement
    prediction: Prediction
    hardware: HardwareSpec
    budgets: dict[str, int]
    lps_solved: int = 0
    search_s: float = 0.0
    compute_dtype: str = ""  # the dtype the plan computes in ("": the config's)
    # Why the planner chose what it was left to (compression, compute dtype), one clause each, and the
    # throughput predicted for each compression it weighed ("weights/cache" -> tok/s, None: does not fit).
    reasons: tuple[str, ...] = ()
    weighed: Mapping[str, float | None] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "placement": self.placement.to_dict(),
            "prediction": self.prediction.to_dict(),
            "hardware": {"name": self.hardware.name, "source": self.hardware.source},
            "budgets": self.budgets,
            "relaxation": RELAXATION,
            "search": {"lps_solved": self.lps_solved, "seconds": self.search_s},
            "choices": {"compute_dtype": self.compute_dtype, "reasons": list(self.reasons), "weighed": self.weighed},
        }


Compress = bool | tuple[bool | str | Sequence[str] | None, bool | str | Sequence[str] | None] | None


def _kind_candidates(compress: Compress) -> tuple[list[str], list[str], tuple[bool, bool]]:
    """The weight and the cache compressions to weigh, least lossy first, and whether each is the
    planner's to choose (None: every kind; a sequence: those kinds; True/False: int4 or none; a kind: it)."""
    pair = compress if isinstance(compress, tuple) else (compress, compress)
    given = [isinstance(k, (bool, str)) for k in pair]
    w, c = (_kinds(k) for k in pair)
    return w, c, (not given[0], not given[1])


def _kinds(option: bool | str | Sequence[str] | None) -> list[str]:
    if option is None:
        return [*LEVELS]
    if isinstance(option, (bool, str)):
        return [compression(option)]
    return sorted(option, key=lambda kind: LEVELS[kind])


def _options(hw: HardwareSpec, kinds: Kinds, both_given: bool, cpu_cache_compute: bool | None) -> list[Option]:
    """(compress_weight, compress_cache, cpu_cache_compute) combinations to try for these kinds."""
    ccc = [False] if hw.device_is_host else ([False, True] if cpu_cache_compute is None else [cpu_cache_compute])
    # Host-side attention reads an uncompressed cache (as FlexGen's): not paired with a compressed one
    # unless the user asked for both.
    return [(kinds[0], kinds[1], c) for c in ccc if not (kinds[1] and c) or both_given]


def _placement(terms: CostTerms, shares: dict[Key, float]) -> Placement:
    def kind(k: str) -> Shares:
        return Shares(**{t: shares[(k, t)] for t in TIERS})

    return Placement(
        weights=kind("weights"),
        cache=kind("cache"),
        activations=kind("activations"),
        gpu_batch_size=terms.gpu_batch_size,
        num_gpu_batches=terms.num_gpu_batches,
        compress_weight=terms.compress_weight,
        compress_cache=terms.compress_cache,
        cpu_cache_compute=terms.cpu_cache_compute,
        overlap=True,
    )


def _quick_infeasible(terms: CostTerms, hw: HardwareSpec) -> bool:
    """True when the fixed memory alone overflows a tier, or the cache and activations overflow all tiers."""
    tiers = real_tiers(hw)
    caps = {t: hw.memory(t) * RELAXATION[t] for t in tiers}
    if any(terms.memory[t].const > caps[t] for t in tiers):
        return True
    need = sum(min(terms.memory[t].coef.get((k, t), 0.0) for t in tiers) for k in ("cache", "activations"))
    return need + sum(terms.memory[t].const for t in tiers) > sum(caps.values())


class _Search:
    def __init__(
        self,
        cfg: OptConfig,
        hw: HardwareSpec,
        prompt_len: int,
        gen_len: int,
        fixed: Mapping[str, Shares] | None = None,
        num_gpu_batches: int | None = None,
        beat: float = math.inf,
    ) -> None:
        self.cfg, self.hw, self.prompt_len, self.gen_len = cfg, hw, prompt_len, gen_len
        self.fixed = dict(fixed or {})
        self.num_gpu_batches = num_gpu_batches
        self.beat = beat  # seconds per sequence: shapes that cannot beat it are of no interest
        self.lps = 0
        self.best: tuple[float, CostTerms, dict[Key, float]] | None = None
        self.found: list[tuple[float, CostTerms, dict[Key, float]]] = []

    def choice(self) -> tuple[float, CostTerms, dict[Key, float]] | None:
        """The smallest block among the plans within ``TIE`` of the fastest: less memory and latency for
        the same throughput (the cost model is not accurate to 1% anyway); for one block size, the fewest
        micro-batches, since each costs per-call overheads the model leaves out."""
        if self.best is None:
            return None
        near = [f for f in self.found if f[0] <= self.best[0] * (1 + TIE)]
        return min(near, key=lambda f: (f[1].block_size, f[1].num_gpu_batches, f[0]))

    def try_shape(self, gbs: int, nb: int, opts: Option) -> float | None:
        """Seconds per sequence of the best placement for this shape; None: it does not fit; ``PRUNED``:
        even with free transfers it cannot beat the best plan so far (so no LP was solved)."""
        cw, cc, ccc = opts
        terms = cost_terms(self.cfg, self.hw, gbs, nb, self.prompt_len, self.gen_len, cw, cc, ccc)
        if _quick_infeasible(terms, self.hw):
            return None
        # A shape that may tie the best is solved: ``choice`` prefers the smaller block, and the fewer
        # micro-batches, among ties (pruning at the best itself left it only the first shape found).
        floor = time_floor(terms)
        if floor >= self.beat or (self.best is not None and floor > self.best[0] * (1 + TIE)):
            return PRUNED
        self.lps += 1
        shares = solve_lp(terms, self.hw, self.fixed)
        if shares is None or not fits(terms, self.hw, shares):
            return None
        pred = evaluate(terms, shares)
        per_seq = pred.total_s / terms.block_size
        self.found.append((per_seq, terms, shares))
        if self.best is None or per_seq < self.best[0]:
            self.best = (per_seq, terms, shares)
        return per_seq

    def scan_counts(self, gbs: int, opts: Option, max_block: int) -> float | None:
        """Double the micro-batch count while it helps and fits, then search around the best count.

        Throughput rises with the block until memory runs out or a kind spills to a slower tier, where it
        can drop sharply, so the best count is near the last doubling that helped: a pattern search (steps
        of half that count, halving) finds it. Returns the best seconds per sequence found, ``PRUNED`` if
        every count tried was pruned, None if not even one micro-batch fits.
        """
        if self.num_gpu_batches is not None:
            return self.try_shape(gbs, self.num_gpu_batches, opts)
        top = min(MAX_GPU_BATCHES, max_block // gbs)
        best_t, best_nb = math.inf, 0
        nb = 1
        while nb <= top:
            t = self.try_shape(gbs, nb, opts)
            if t is None:
                if nb == 1:
                    return None
                top = nb - 1  # bigger blocks need more memory still
                break
            if t is not PRUNED:
                if t >= best_t * (1 - 1e-3):
                    break
                best_t, best_nb = t, nb
            nb *= 2
        if not best_nb:
            return PRUNED
        tried = {1 << k for k in range(nb.bit_length())}
        step = best_nb // 2
        while step >= 1:
            for cand in (best_nb + step, best_nb - step):
                if cand in tried or not 1 <= cand <= top:
                    continue
                tried.add(cand)
                t = self.try_shape(gbs, cand, opts)
                if t is None:
                    top = min(top, cand - 1)
                elif t is not PRUNED and t < best_t * (1 - 1e-3):
                    best_t, best_nb = t, cand
                    break
            else:
                step //= 2
        return best_t

    def run(self, options: list[Option], batch_sizes: Sequence[int], max_block: int) -> None:
        for opts in options:
            trail: list[float] = []
            for gbs in batch_sizes:
                if gbs > max_block:
                    break
                t = self.scan_counts(gbs, opts, max_block)
                if t is None:
                    break  # a bigger micro-batch needs more memory still
                if t is PRUNED:
                    continue
                trail.append(t)
                # Stop once two bigger micro-batches in a row did no better than the best smaller one.
                if len(trail) >= 3 and min(trail[-2:]) >= min(trail[:-2]) * (1 - 1e-3):
                    break

    def prediction(self) -> Prediction | None:
        """The prediction of the plan ``choice`` picks, None when nothing fits."""
        chosen = self.choice()
        return None if chosen is None else evaluate(chosen[1], chosen[2])


def plan(
    cfg: OptConfig,
    hw: HardwareSpec,
    prompt_len: int = 512,
    gen_len: int = 32,
    *,
    compress: Compress = None,
    cpu_cache_compute: bool | None = None,
    gpu_batch_sizes: Sequence[int] | None = None,
    max_block_size: int | None = None,
    fixed: Mapping[str, Shares] | None = None,
    num_gpu_batches: int | None = None,
    compute_dtypes: Sequence[str] = (),
) -> Plan:
    """The placement with the highest predicted throughput for ``cfg`` on ``hw`` (its memory = the budgets).

    ``compress``: the (weights, cache) compression, each a kind ("", "int8", "int4"), or None (or the
    kinds to choose among) for the planner to choose by ``choice.choose_compression`` (a lossier kind only
    for a big enough gain); None leaves both open, True/False is int4 or none for both. ``cpu_cache_compute``: None tries both.
    ``compute_dtypes``: the dtypes the model may compute in, the default first (``choice.
    compute_dtype_candidates``): the compression is chosen in the default (or, when nothing fits it, in the
    next that fits), then the fastest dtype at that compression. Empty: ``cfg``'s. ``max_block_size`` caps sequences per block (e.g. the number of prompts). ``fixed`` holds the
    shares of the kinds the user chose (the LP picks the rest) and ``num_gpu_batches`` the micro-batch count
    (``gpu_batch_sizes`` narrows the sizes). Raises PlacementError, with the shortfall and the smallest
    budgets that would do, when nothing fits.
    """
    if prompt_len < 1 or gen_len < 0:
        raise PlacementError(f"prompt_len must be >= 1 and gen_len >= 0, got {prompt_len} and {gen_len}")
    start = time.perf_counter()
    w_kinds, c_kinds, open_kinds = _kind_candidates(compress)
    both_given = not open_kinds[1] and cpu_cache_compute is not None
    sizes, max_block = sorted(gpu_batch_sizes or GPU_BATCH_SIZES), max_block_size or 1 << 30
    dtypes = list(dict.fromkeys(compute_dtypes)) or [cfg.run_dtype]
    configs = {d: dataclasses.replace(cfg, compute_dtype="" if d == cfg.dtype else d) for d in dtypes}
    searches: dict[tuple[str, Kinds], _Search] = {}

    def search(dtype: str, kinds: Kinds, beat: float = math.inf) -> _Search:
        if (dtype, kinds) not in searches:
            found = _Search(configs[dtype], hw, prompt_len, gen_len, fixed, num_gpu_batches, beat)
            found.run(_options(hw, kinds, both_given, cpu_cache_compute), sizes, max_block)
            searches[(dtype, kinds)] = found
        return searches[(dtype, kinds)]

    # The compression is weighed in the default compute dtype (in the next that fits, if that one fits
    # nowhere), then the compute dtype at that compression.
    combos = list(itertools.product(w_kinds, c_kinds))
    kinds, predictions, dtype = None, {}, dtypes[0]
    for dtype in dtypes:
        predictions = {k: search(dtype, k).prediction() for k in combos}
        kinds = choose_compression({k: _throughput(p) for k, p in predictions.items()})
        if kinds is not None:
            break
    by_dtype: dict[str, float | None] = {}
    if kinds is not None and dtype == dtypes[0] and len(dtypes) > 1:
        by_dtype = _weigh_dtypes(dtypes, lambda d, beat: search(d, kinds, beat))
        dtype = choose_dtype(by_dtype, dtypes) or dtypes[0]
    elapsed = time.perf_counter() - start
    lps = sum(s.lps for s in searches.values())
    log.info("placement search: %d LPs in %.2f s", lps, elapsed)
    chosen = None if kinds is None else searches[(dtype, kinds)].choice()
    if kinds is None or chosen is None:
        shape = (min(gpu_batch_sizes or [1]), num_gpu_batches or 1)
        options = [o for k in combos for o in _options(hw, k, both_given, cpu_cache_compute)]
        raise infeasible(configs[dtype], hw, prompt_len, gen_len, options, fixed, shape)
    _, terms, shares = chosen
    reasons = compression_reasons(kinds, predictions, open_kinds)
    if len(dtypes) > 1:
        reasons.append(dtype_reason(dtype, by_dtype) if by_dtype else f"compute {dtype}: {dtypes[0]} does not fit")
    return Plan(
        placement=_placement(terms, shares),
        prediction=evaluate(terms, shares),
        hardware=hw,
        budgets={t: hw.memory(t) for t in real_tiers(hw)},
        lps_solved=lps,
        search_s=elapsed,
        compute_dtype=configs[dtype].run_dtype,
        reasons=tuple(reasons),
        weighed={f"{w or 'none'}/{c or 'none'}": _throughput(p) for (w, c), p in predictions.items()},
    )


def _weigh_dtypes(dtypes: Sequence[str], search: Callable[[str, float], _Search]) -> dict[str, float | None]:
    """Predicted throughput of each compute dtype (None: not ``DTYPE_GAIN`` x the first's, or it does not fit).

    Only one that faster can replace the first, so the others' searches skip every shape that cannot beat
    the first's plan by that much (on a CPU without bfloat16 hardware, all of bfloat16's)."""
    first = search(dtypes[0], math.inf)
    speed = {dtypes[0]: _throughput(first.prediction())}
    beat = first.best[0] / DTYPE_GAIN if first.best is not None else math.inf
    for d in dtypes[1:]:
        other = search(d, beat)
        speed[d] = _throughput(other.prediction()) if other.best is not None and other.best[0] < beat else None
    return speed


def _throughput(pred: Prediction | None) -> float | None:
    return None if pred is None else pred.throughput
