"""The linear program of one batch shape: the nine shares that minimise the time per sequence within the
tiers' budgets (FlexGen's formulation, solved by PuLP's bundled CBC), and, when nothing fits, the smallest
budget increases that would do.

For a fixed micro-batch size, micro-batch count and set of options, the cost model of ``equations`` is
affine in the shares: minimise ``(layers * T_prefill + layers * (gen_len - 1) * T_decode) / block_size``,
where each per-layer time is at least the read path, the write path and the compute of its phase, subject to
each kind's shares summing to 1 and each tier's memory staying within ``RELAXATION[tier] x`` its budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pulp

from flexrun.config import OptConfig
from flexrun.costmodel.equations import KINDS, SHARE_KEYS, Affine, CostTerms, Key, cost_terms
from flexrun.costmodel.hardware import HardwareSpec
from flexrun.costmodel.hotset import derived_shares
from flexrun.errors import PlacementError
from flexrun.placement import TIERS, Shares
from flexrun.units import format_bytes

# Fraction of each tier's budget the LP may plan for: the estimate misses allocator fragmentation, the
# framework's own memory and the page cache. FlexGen uses 0.8 for GPU, CPU and disk alike.
RELAXATION = {"device": 0.8, "host": 0.8, "disk": 0.8}
_GIB = float(1 << 30)  # memory rows are scaled to GiB to keep the LP well conditioned
Option = tuple[str, str, bool]  # (compress_weight, compress_cache, cpu_cache_compute)


class InfeasibleError(PlacementError):
    """No placement fits: ``short`` is the bytes each short tier lacks, ``needed`` the budgets that would do."""

    def __init__(self, message: str, short: dict[str, int], needed: dict[str, int]) -> None:
        super().__init__(message)
        self.short = short
        self.needed = needed


def real_tiers(hw: HardwareSpec) -> tuple[str, ...]:
    """The tiers the LP places on (two on a CPU-only machine)."""
    return hw.tiers()


def _lp_expr(a: Affine, var: dict[Key, Any], scale: float = 1.0) -> Any:
    return pulp.lpSum(v * scale * var[k] for k, v in a.coef.items() if k in var and v) + a.const * scale


def _add_shares(prob: pulp.LpProblem, hw: HardwareSpec, fixed: Mapping[str, Shares] | None = None) -> dict[Key, Any]:
    """The nine share variables (six on a CPU-only machine); the kinds in ``fixed`` held at the user's shares."""
    tiers = real_tiers(hw)
    var = {(k, t): pulp.LpVariable(f"{k}_{t}", lowBound=0, upBound=1) for k in KINDS for t in tiers}
    for kind in KINDS:
        prob += pulp.lpSum(var[(kind, t)] for t in tiers) == 1, f"{kind}_sum"
    for kind, shares in (fixed or {}).items():
        for tier in tiers:
            # On a CPU-only machine the device tier is host RAM, as in the runtime.
            share = shares.get(tier) + (shares.get("device") if hw.device_is_host and tier == "host" else 0.0)
            prob += var[(kind, tier)] == share, f"fixed_{kind}_{tier}"
    return var


def _add_derived(prob: pulp.LpProblem, terms: CostTerms, var: dict[Key, Any]) -> None:
    """The derived shares (``costmodel.hotset``): each at least its piece of the weights' disk share and 0;
    every term they enter grows with them, so the solution holds them at that bound."""
    x = var.get(("weights", "disk"))
    for n, (key, start) in enumerate(terms.derived.items()):
        var[key] = pulp.LpVariable(f"derived_{n}", lowBound=0)
        if x is not None and start < 1:
            prob += var[key] >= (x - start) * (1 / (1 - start)), f"derived_{n}"


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
    _add_derived(prob, terms, var)
    # Many placements often tie (a transfer hidden under compute costs nothing); a penalty worth <0.01% of
    # the time breaks ties toward the faster tiers, so that nothing goes to disk without a reason.
    rank = {"device": 0.0, "host": 1.0, "disk": 2.0}
    # Times are in units of the compute-only floor, so the objective is >= 1 whatever the model's size.
    unit = max(time_floor(terms), 1e-15)
    tie = 1e-5 * pulp.lpSum(rank[t] * v for (_, t), v in var.items() if t in rank)
    prob += _add_time(prob, terms, var, unit) + tie
    for tier in real_tiers(hw):
        cap = hw.memory(tier) * RELAXATION[tier] / _GIB
        prob += _lp_expr(terms.memory[tier], var, 1 / _GIB) <= cap, f"mem_{tier}"
    status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        return None
    return _shares_from(var)


def fits(terms: CostTerms, hw: HardwareSpec, shares: dict[Key, float]) -> bool:
    # The solver's tolerances may overshoot a binding constraint by a hair; allow 1e-5 of the budget.
    shares = derived_shares(terms.derived, shares)
    return all(
        terms.memory[t].value(shares) <= hw.memory(t) * RELAXATION[t] * (1 + 1e-5) + 4096 for t in real_tiers(hw)
    )


def _least(a: Affine, tiers: Sequence[str]) -> float:
    """The least value ``a`` takes over shares that sum to 1 per kind across ``tiers``."""
    return a.const + sum(min(a.coef.get((kind, t), 0.0) for t in tiers) for kind in KINDS)


def time_floor(terms: CostTerms) -> float:
    """Seconds per sequence with every transfer free and each kind on the tier it computes fastest from
    (attention on its fastest side, compressed weights where their kernel is fastest): a lower bound."""
    tiers = ("host", "disk") if terms.device_is_host else TIERS
    pre = _least(terms.prefill.paths()["compute"], tiers)
    dec = _least(terms.decode.paths()["compute"], tiers)
    return terms.num_layers * (pre + terms.decode_steps * dec) / terms.block_size


# ---- infeasible: what is short, and the smallest budgets that would work ---------------------------
# Slack is charged per GiB by how scarce the tier usually is, so the fix suggested is the cheap one.
_SLACK_PRICE = {"device": 4.0, "host": 2.0, "disk": 1.0}


def shortfall(terms: CostTerms, hw: HardwareSpec, fixed: Mapping[str, Shares] | None = None) -> dict[str, int]:
    """Bytes each tier's budget must grow by for ``terms`` to fit (empty when it fits)."""
    prob = pulp.LpProblem("shortfall", pulp.LpMinimize)
    var = _add_shares(prob, hw, fixed)
    _add_derived(prob, terms, var)
    slack = {t: pulp.LpVariable(f"slack_{t}", lowBound=0) for t in real_tiers(hw)}
    prob += pulp.lpSum(_SLACK_PRICE[t] * slack[t] for t in slack)
    for tier in real_tiers(hw):
        cap = hw.memory(tier) * RELAXATION[tier] / _GIB
        prob += _lp_expr(terms.memory[tier], var, 1 / _GIB) <= cap + slack[tier], f"mem_{tier}"
    prob.solve(pulp.PULP_CBC_CMD(msg=False))
    # Slack is planned bytes; the budget must grow by that over the relaxation factor.
    short = {t: (s.value() or 0.0) * _GIB / RELAXATION[t] for t, s in slack.items()}
    return {t: int(v) + 1 for t, v in short.items() if v > 1}


def infeasible(
    cfg: OptConfig,
    hw: HardwareSpec,
    prompt_len: int,
    gen_len: int,
    options: list[Option],
    fixed: Mapping[str, Shares] | None = None,
    shape: tuple[int, int] = (1, 1),
) -> InfeasibleError:
    best: tuple[float, dict[str, int], Option] | None = None
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
    comp = " and ".join(f"{k} {what}" for k, what in ((cw, "weights"), (cc, "cache")) if k) or "no compression"
    return InfeasibleError(
        f"no placement of {cfg.name} fits {hw.name}'s memory, even with {seqs} of {prompt_len}+{gen_len} "
        f"tokens ({comp}{held}): {what}; the smallest budgets that would work: {fixes}; the planner uses "
        f"{int(RELAXATION['host'] * 100)}% of each budget",
        short=short,
        needed={t: hw.memory(t) + v for t, v in short.items()},
    )
