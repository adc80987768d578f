"""The placement planner: an LP over the nine shares per batch shape, and a small search over shapes.

For a fixed micro-batch size, micro-batch count and set of options (weight / cache compression, host-side
attention), the cost model of ``equations`` is affine in the nine shares, so the best shares are a
linear program (FlexGen's formulation): minimise the time per sequence of the block,
``(layers * T_prefill + layers * (gen_len - 1) * T_decode) / block_size``, where each per-layer time is at
least the read path, the write path and the compute of its phase, subject to each kind's shares summing
to 1 and each tier's memory staying within ``RELAXATION[tier] x`` its budget. PuLP solves it with its
bundled CBC.

The search walks micro-batch sizes upward and, for each, doubles the number of micro-batches until the
plan stops improving or stops fitting, then bisects between the last count that helped and that one; options that cannot beat the best
plan found so far even with free transfers are skipped without an LP. On a CPU-only machine the device
tier is host RAM: the LP has two tiers and no device shares.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulp

from flexrun.config import OptConfig
from flexrun.costmodel.equations import KINDS, SHARE_KEYS, Affine, CostTerms, Key, cost_terms
from flexrun.costmodel.hardware import HardwareSpec
from flexrun.costmodel.prediction import Prediction, evaluate
from flexrun.errors import PlacementError
from flexrun.placement import TIERS, Placement, Shares
from flexrun.units import format_bytes

log = logging.getLogger(__name__)

# Fraction of each tier's budget the LP may plan for: the estimate misses allocator fragmentation, the
# framework's own memory and the page cache. FlexGen uses 0.8 for GPU, CPU and disk alike.
RELAXATION = {"device": 0.8, "host": 0.8, "disk": 0.8}
GPU_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MAX_GPU_BATCHES = 64
_GIB = float(1 << 30)  # memory rows are scaled to GiB to keep the LP well conditioned
PRUNED = -1.0
# Predicted throughputs within this fraction of each other count as a tie.
TIE = 0.01  # a shape skipped without an LP: it cannot beat the best plan found so far


class InfeasibleError(PlacementError):
    """No placement fits: ``short`` is the bytes each short tier lacks, ``needed`` the budgets that would do."""

    def __init__(self, message: str, short: dict[str, int], needed: dict[str, int]) -> None:
        super().__init__(message)
        self.short = short
        self.needed = needed


@dataclass(frozen=True)
class Plan:
    """The planner's choice: a placement and what the cost model predicts for it."""

    placement: Placement
    prediction: Prediction
    hardware: HardwareSpec
    budgets: dict[str, int]
    lps_solved: int = 0
    search_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "placement": self.placement.to_dict(),
            "prediction": self.prediction.to_dict(),
            "hardware": {"name": self.hardware.name, "source": self.hardware.source},
            "budgets": self.budgets,
            "relaxation": RELAXATION,
            "search": {"lps_solved": self.lps_solved, "seconds": self.search_s},
        }


def _options(
    hw: HardwareSpec, compress: bool | tuple[str, str] | None, cpu_cache_compute: bool | None
) -> list[tuple[bool | str, bool | str, bool]]:
    """(compress_weight, compress_cache, cpu_cache_compute) combinations to try."""
    ccc = [False] if hw.device_is_host else ([False, True] if cpu_cache_compute is None else [cpu_cache_compute])
    if isinstance(compress, tuple):  # the kinds given: (weights, cache)
        return [(compress[0], compress[1], c) for c in ccc if not (compress[1] and c)]
    flags = [False, True] if compress is None else [compress]
    # Host-side attention reads an uncompressed cache (as FlexGen's), so it is not paired with compression.
    return [
        (cw, cc, c)
        for cw, cc, c in itertools.product(flags, flags, ccc)
        if not (cc and c) or (compress is not None and cpu_cache_compute is not None)
    ]


def _real_tiers(hw: HardwareSpec) -> tuple[str, ...]:
    return hw.tiers()


def _lp_expr(a: Affine, var: dict[Key, Any], scale: float = 1.0) -> Any:
    return pulp.lpSum(v * scale * var[k] for k, v in a.coef.items() if k in var and v) + a.const * scale


def _add_shares(prob: pulp.LpProblem, hw: HardwareSpec, fixed: Mapping[str, Shares] | None = None) -> dict[Key, Any]:
    """The nine share variables (six on a CPU-only machine); the kinds in ``fixed`` held at the user's shares."""
    tiers = _real_tiers(hw)
    var = {(k, t): pulp.LpVariable(f"{k}_{t}", lowBound=0, upBound=1) for k in KINDS for t in tiers}
    for kind in KINDS:
        prob += pulp.lpSum(var[(kind, t)] for t in tiers) == 1, f"{kind}_sum"
    for kind, shares in (fixed or {}).items():
        for tier in tiers:
            # On a CPU-only machine the device tier is host RAM, as in the runtime.
            share = shares.get(tier) + (shares.get("device") if hw.device_is_host and tier == "host" else 0.0)
            prob += var[(kind, tier)] == share, f"fixed_{kind}_{tier}"
    return var


def _add_time(prob: pulp.LpProblem, terms: CostTerms, var: dict[Key, Any], unit: float = 1.0) -> Any:
    """Per-layer time variables bounded by each path; returns the objective (time per sequence, in ``unit``
    seconds: the solver's tolerances are absolute, so times are scaled to be of order 1)."""
    t_pre = pulp.LpVariable("T_prefill", lowBound=0)
    t_dec = pulp.LpVariable("T_decode", lowBound=0)
    for phase, t in (("prefill", t_pre), ("decode", t_dec)):
        for path, a in getattr(terms, phase).paths().items():
            prob += t >= _lp_expr(a, var, 1.0 / unit), f"{phase}_{path}"
    l, steps = terms.num_layers, terms.decode_steps
    return (l * t_pre + l * steps * t_dec) * (1.0 / terms.block_size)


def _shares_from(var: dict[Key, Any]) -> dict[Key, float]:
    """The solution's shares, clipped and renormalised so each kind sums to exactly 1."""
    shares: dict[Key, float] = dict.fromkeys(SHARE_KEYS, 0.0)
    for kind in KINDS:
        vals = {t: min(max(float(var[(kind, t)].value() or 0.0), 0.0), 1.0) for t in TIERS if (kind, t) in var}
        vals = {t: (0.0 if v < 1e-9 else v) for t, v in vals.items()}
        total = sum(vals.values()) or 1.0
        for t, v in vals.items():
            shares[(kind, t)] = v / total
    return shares


def solve_lp(terms: CostTerms, hw: HardwareSpec, fixed: Mapping[str, Shares] | None = None) -> dict[Key, float] | None:
    """The best shares for ``terms`` within ``hw``'s budgets (times relaxation), or None if none fit.

    ``fixed``: kinds whose shares the user gave (e.g. ``{"weights": Shares(disk=1.0)}``), held as they are.
    """
    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    var = _add_shares(prob, hw, fixed)
    # Many placements often tie (a transfer hidden under compute costs nothing); a penalty worth <0.01% of
    # the time breaks ties toward the faster tiers, so that nothing goes to disk without a reason.
    rank = {"device": 0.0, "host": 1.0, "disk": 2.0}
    # Times are in units of the compute-only floor, so the objective is >= 1 whatever the model's size.
    unit = max(_time_floor(terms), 1e-15)
    tie = 1e-5 * pulp.lpSum(rank[t] * v for (_, t), v in var.items())
    prob += _add_time(prob, terms, var, unit) + tie
    for tier in _real_tiers(hw):
        cap = hw.memory(tier) * RELAXATION[tier] / _GIB
        prob += _lp_expr(terms.memory[tier], var, 1 / _GIB) <= cap, f"mem_{tier}"
    status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        return None
    return _shares_from(var)


def _fits(terms: CostTerms, hw: HardwareSpec, shares: dict[Key, float]) -> bool:
    # The solver's tolerances may overshoot a binding constraint by a hair; allow 1e-5 of the budget.
    return all(
        terms.memory[t].value(shares) <= hw.memory(t) * RELAXATION[t] * (1 + 1e-5) + 4096 for t in _real_tiers(hw)
    )


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


def _time_floor(terms: CostTerms) -> float:
    """Seconds per sequence with every transfer free and attention on its fastest side: a lower bound."""
    pre = terms.prefill.compute.const
    dec = terms.decode.compute.const + min(
        [terms.decode.compute.coef.get(("cache", "device"), 0.0)]
        + [terms.decode.host_compute.coef.get(("cache", t), 0.0) for t in ("host", "disk")]
    )
    return terms.num_layers * (pre + terms.decode_steps * dec) / terms.block_size


def _quick_infeasible(terms: CostTerms, hw: HardwareSpec) -> bool:
    """True when the fixed memory alone overflows a tier, or the cache and activations overflow all tiers."""
    tiers = _real_tiers(hw)
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
    ) -> None:
        self.cfg, self.hw, self.prompt_len, self.gen_len = cfg, hw, prompt_len, gen_len
        self.fixed = dict(fixed or {})
        self.num_gpu_batches = num_gpu_batches
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

    def try_shape(self, gbs: int, nb: int, opts: tuple[bool | str, bool | str, bool]) -> float | None:
        """Seconds per sequence of the best placement for this shape; None: it does not fit; ``PRUNED``:
        even with free transfers it cannot beat the best plan so far (so no LP was solved)."""
        cw, cc, ccc = opts
        terms = cost_terms(self.cfg, self.hw, gbs, nb, self.prompt_len, self.gen_len, cw, cc, ccc)
        if _quick_infeasible(terms, self.hw):
            return None
        if self.best is not None and _time_floor(terms) >= self.best[0]:
            return PRUNED
        self.lps += 1
        shares = solve_lp(terms, self.hw, self.fixed)
        if shares is None or not _fits(terms, self.hw, shares):
            return None
        pred = evaluate(terms, shares)
        per_seq = pred.total_s / terms.block_size
        self.found.append((per_seq, terms, shares))
        if self.best is None or per_seq < self.best[0]:
            self.best = (per_seq, terms, shares)
        return per_seq

    def scan_counts(self, gbs: int, opts: tuple[bool | str, bool | str, bool], max_block: int) -> float | None:
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

    def run(
        self, options: list[tuple[bool | str, bool | str, bool]], batch_sizes: Sequence[int], max_block: int
    ) -> None:
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


def plan(
    cfg: OptConfig,
    hw: HardwareSpec,
    prompt_len: int = 512,
    gen_len: int = 32,
    *,
    compress: bool | tuple[str, str] | None = None,
    cpu_cache_compute: bool | None = None,
    gpu_batch_sizes: Sequence[int] | None = None,
    max_block_size: int | None = None,
    fixed: Mapping[str, Shares] | None = None,
    num_gpu_batches: int | None = None,
) -> Plan:
    """The placement with the highest predicted throughput for ``cfg`` on ``hw`` (its memory = the budgets).

    ``compress`` / ``cpu_cache_compute``: None tries both; True/False fixes the option (True: int4 weights
    and cache); a (weights, cache) pair of kinds ("", "int8", "int4") fixes each. ``max_block_size`` caps sequences per block (e.g. the number of
    prompts). ``fixed`` holds the shares of the kinds the user chose (the LP picks the rest) and
    ``num_gpu_batches`` the micro-batch count (``gpu_batch_sizes`` narrows the sizes). Raises PlacementError, with the shortfall and the smallest budgets that would do, when
    nothing fits.
    """
    if prompt_len < 1 or gen_len < 1:
        raise PlacementError(f"prompt_len and gen_len must be >= 1, got {prompt_len} and {gen_len}")
    start = time.perf_counter()
    options = _options(hw, compress, cpu_cache_compute)
    search = _Search(cfg, hw, prompt_len, gen_len, fixed, num_gpu_batches)
    search.run(options, sorted(gpu_batch_sizes or GPU_BATCH_SIZES), max_block_size or 1 << 30)
    elapsed = time.perf_counter() - start
    log.info("placement search: %d LPs in %.2f s", search.lps, elapsed)
    chosen = search.choice()
    if chosen is None:
        shape = (min(gpu_batch_sizes or [1]), num_gpu_batches or 1)
        raise _infeasible(cfg, hw, prompt_len, gen_len, options, fixed, shape)
    _, terms, shares = chosen
    return Plan(
        placement=_placement(terms, shares),
        prediction=evaluate(terms, shares),
        hardware=hw,
        budgets={t: hw.memory(t) for t in _real_tiers(hw)},
        lps_solved=search.lps,
        search_s=elapsed,
    )


# ---- infeasible: what is short, and the smallest budgets that would work ---------------------------
# Slack is charged per GiB by how scarce the tier usually is, so the fix suggested is the cheap one.
_SLACK_PRICE = {"device": 4.0, "host": 2.0, "disk": 1.0}


def shortfall(terms: CostTerms, hw: HardwareSpec, fixed: Mapping[str, Shares] | None = None) -> dict[str, int]:
    """Bytes each tier's budget must grow by for ``terms`` to fit (empty when it fits)."""
    prob = pulp.LpProblem("shortfall", pulp.LpMinimize)
    var = _add_shares(prob, hw, fixed)
    slack = {t: pulp.LpVariable(f"slack_{t}", lowBound=0) for t in _real_tiers(hw)}
    prob += pulp.lpSum(_SLACK_PRICE[t] * slack[t] for t in slack)
    for tier in _real_tiers(hw):
        cap = hw.memory(tier) * RELAXATION[tier] / _GIB
        prob += _lp_expr(terms.memory[tier], var, 1 / _GIB) <= cap + slack[tier], f"mem_{tier}"
    prob.solve(pulp.PULP_CBC_CMD(msg=False))
    # Slack is planned bytes; the budget must grow by that over the relaxation factor.
    short = {t: (s.value() or 0.0) * _GIB / RELAXATION[t] for t, s in slack.items()}
    return {t: int(v) + 1 for t, v in short.items() if v > 1}


def _infeasible(
    cfg: OptConfig,
    hw: HardwareSpec,
    prompt_len: int,
    gen_len: int,
    options: list[tuple[bool | str, bool | str, bool]],
    fixed: Mapping[str, Shares] | None = None,
    shape: tuple[int, int] = (1, 1),
) -> InfeasibleError:
    best: tuple[float, dict[str, int], tuple[bool | str, bool | str, bool]] | None = None
    for opts in options:
        terms = cost_terms(cfg, hw, shape[0], shape[1], prompt_len, gen_len, *opts)
        short = shortfall(terms, hw, fixed)
        cost = sum(_SLACK_PRICE[t] * v for t, v in short.items())
        if best is None or cost < best[0]:
            best = (cost, short, opts)
    assert best is not None
    _, short, (cw, cc, _) = best
    if not short:  # only reachable when rounding hid a hair's-breadth fit
        short = {"host": 1}
    what = " and ".join(f"the {t} tier is short by {format_bytes(v)}" for t, v in short.items())
    fixes = ", ".join(
        f"--{t}-mem {format_bytes(hw.memory(t) + v, round_up=True)} (now {format_bytes(hw.memory(t))})"
        for t, v in short.items()
    )
    seqs = "one sequence" if shape == (1, 1) else f"a block of {shape[0]} x {shape[1]} sequences"
    held = "; " + ", ".join(f"{k} held at {v.spec()}" for k, v in fixed.items()) if fixed else ""
    comp = "compressed weights and cache" if cw and cc else "compressed weights" if cw else "no compression"
    return InfeasibleError(
        f"no placement of {cfg.name} fits {hw.name}'s memory, even with {seqs} of {prompt_len}+{gen_len} "
        f"tokens ({comp}{held}): {what}; the smallest budgets that would work: {fixes}; the planner uses "
        f"{int(RELAXATION['host'] * 100)}% of each budget",
        short=short,
        needed={t: hw.memory(t) + v for t, v in short.items()},
    )
