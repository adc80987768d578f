"""What the planner chooses beyond the shares: weight and cache compression, and the compute dtype.

Compression loses accuracy, so the choice is quality-aware rather than the fastest plan outright (which is
what FlexGen's planner would take, had it chosen compression at all): of off < int8 < int4, a lossier
option is taken only when the cost model predicts it at least ``COMPRESSION_GAIN`` times the throughput of
every less lossy one that fits, or when none of those fits. Weights and cache are chosen together, each
less lossy than another when it is on both counts. The compute dtype is the fastest predicted among its
candidates (the stored dtype, float32, and bfloat16 for a 16-bit store), ``precision``'s rule unless
another is predicted ``DTYPE_GAIN`` x faster.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from flexrun.costmodel.hardware import HardwareSpec
from flexrun.costmodel.prediction import Prediction
from flexrun.precision import compute_candidates

# off < int8 < int4: how lossy each compression is.
LEVELS = {"": 0, "int8": 1, "int4": 2}
# A lossier compression must be predicted at least this much faster than each less lossy one to be chosen.
COMPRESSION_GAIN = 1.3
# Another compute dtype replaces the default (``precision``'s rule, which is what the hardware runs well)
# only when predicted at least this much faster: the model does not see every cost of a dtype (an
# emulated 16-bit elementwise op, say), and a few percent are within its error.
DTYPE_GAIN = 1.1

Kinds = tuple[str, str]  # (weights, cache) compression: "", "int8" or "int4"
_LABEL = {"": "uncompressed", "int8": "int8", "int4": "int4"}


def _less_lossy(a: Kinds, b: Kinds) -> bool:
    """Whether ``a`` loses less than ``b``: no lossier on either count, and not the same."""
    return a != b and LEVELS[a[0]] <= LEVELS[b[0]] and LEVELS[a[1]] <= LEVELS[b[1]]


def choose_compression(speed: Mapping[Kinds, float | None]) -> Kinds | None:
    """The compression to run, from each candidate's predicted throughput (None: it does not fit): the
    fastest of those predicted ``COMPRESSION_GAIN`` x faster than every less lossy candidate that fits (the
    least lossy fitting ones always qualify); None when nothing fits."""
    fits = {k: v for k, v in speed.items() if v is not None}
    worth = [k for k, v in fits.items() if all(v >= COMPRESSION_GAIN * w for y, w in fits.items() if _less_lossy(y, k))]
    if not worth:
        return None
    return max(worth, key=lambda k: (fits[k], -LEVELS[k[0]] - LEVELS[k[1]]))


def compression_reasons(
    chosen: Kinds, predictions: Mapping[Kinds, Prediction | None], open_kinds: tuple[bool, bool]
) -> list[str]:
    """Why each compression left open (``open_kinds``: weights, cache) is what ``chosen`` says, e.g.
    ``int8 weights: predicted 1.9x over uncompressed, whose bottleneck is decode: disk->host``."""
    reasons = []
    for axis, what in enumerate(("weights", "cache")):
        if not open_kinds[axis]:
            continue
        kind = chosen[axis]

        def other(k: str, axis: int = axis) -> Kinds:
            return (k, chosen[1]) if axis == 0 else (chosen[0], k)

        reasons.append(_reason(kind, what, {k: predictions.get(other(k)) for k in LEVELS}))
    return reasons


def _ratio(speed: Mapping[str, float | None], k: str, base: str) -> str:
    s, b = speed[k], speed[base]
    return f"{k} does not fit" if s is None or not b else f"{k} {_times(s / b)}"


def _reason(kind: str, what: str, preds: Mapping[str, Prediction | None]) -> str:
    """Why ``kind`` for ``what``, from the predictions of each kind (the other compression held)."""
    speed = {k: (p.throughput if p is not None else None) for k, p in preds.items()}
    label = f"{_LABEL[kind]} {what}"
    lossier = [k for k in LEVELS if LEVELS[k] > LEVELS[kind]]
    less = [k for k in LEVELS if LEVELS[k] < LEVELS[kind] and speed[k] is not None]
    if not less:
        if kind:  # every less lossy option was tried and none fits
            tried = [_LABEL[k] for k in LEVELS if LEVELS[k] < LEVELS[kind]]
            return f"{label}: {' and '.join(tried)} {'does' if len(tried) == 1 else 'do'} not fit"
        alts = ", ".join(_ratio(speed, k, kind) for k in lossier)
        return f"{label}: predicted {alts} (compression needs {COMPRESSION_GAIN:g}x)"
    base = max(less, key=lambda k: speed[k] or 0.0)
    s, b, pred = speed[kind], speed[base], preds[base]
    assert s is not None and b is not None and pred is not None
    text = f"{label}: predicted {_times(s / b)} over {_LABEL[base]} (bound by {pred.bottleneck})"
    more = [_ratio(speed, k, base) for k in lossier if speed[k] is not None]
    return text + (f"; {', '.join(more)}" if more else "")


def compute_dtype_candidates(stored: str, default: str, hw: HardwareSpec) -> list[str]:
    """The compute dtypes the planner weighs for a ``stored`` model: ``default`` (``precision``'s rule) first,
    then the other candidates ``hw`` has rates for; ``default`` alone when ``hw`` cannot price it."""
    if not hw.has_rates(default):
        return [default]
    return [default] + [d for d in compute_candidates(stored) if d != default and hw.has_rates(d)]


def choose_dtype(speed: Mapping[str, float | None], candidates: Sequence[str]) -> str | None:
    """The first candidate (the default), unless another is predicted ``DTYPE_GAIN`` x faster or it does not
    fit: then the fastest that fits; None when none does."""
    fits = [d for d in candidates if speed.get(d) is not None]
    if not fits:
        return None
    best = max(fits, key=lambda d: speed[d] or 0.0)
    default = speed.get(candidates[0])
    return candidates[0] if default is not None and (speed[best] or 0.0) < DTYPE_GAIN * default else best


def dtype_reason(chosen: str, speed: Mapping[str, float | None]) -> str:
    """``compute bfloat16: predicted 4.97x over float32`` (the next fastest), or ``compute float32 (bfloat16
    not predicted 1.1x faster)`` when the others were not found that much faster (their search stops there)."""
    s = speed.get(chosen)
    known = {d: v for d, v in speed.items() if d != chosen and v}
    slower = [d for d, v in speed.items() if d != chosen and not v]
    text = f"compute {chosen}"
    if known and s:
        runner = max(known, key=lambda d: known[d])
        text += f": predicted {_times(s / known[runner])} over {runner}"
    return text + (f" ({', '.join(slower)} not predicted {DTYPE_GAIN:g}x faster)" if slower else "")


def _times(ratio: float) -> str:
    """``1.29x``: rounded down, so that a ratio shown as 1.30x met a 1.3x threshold."""
    return f"{math.floor(ratio * 100) / 100:.2f}x"
