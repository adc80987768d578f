"""The resident hot set in the cost model: what a weight disk share costs when the tensors go to disk in
``layout.residency_order`` (the tables read by rows first, the largest group last), as the runtime places them.

The bytes read per step and the disk's double buffer are then convex, piecewise-linear functions of the
weights' disk share ``x``. Each piece past a breakpoint ``start`` is a derived share,
``max(0, (x - start) / (1 - start))``, which the LP holds as a variable of its own bounded below by both
(it only ever wants it as small as it may be), and ``derived_shares`` computes for a placement:

- ``WHOLE``: the share of the tensors read whole (everything but the gathered tables), from ``gathered / total``;
- ``LARGEST``: the largest group's share, from ``1 - first / total`` (before it, the buffer holds the next).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from flexrun.config import OptConfig
from flexrun.costmodel.affine import Key
from flexrun.layout import GATHER_BUFFER, GATHERED, HotSet, stack_layout

ALIGN = 4096  # diskio.ALIGN, the unit of an O_DIRECT read (repeated: the cost model imports no torch)
WHOLE: Key = ("weights", "disk, read whole")
LARGEST: Key = ("weights", "disk, largest group")
DISK: Key = ("weights", "disk")


@dataclass(frozen=True)
class HotTerms:
    """The hot set of one model: its breakpoints and sizes (bytes of the whole model, not per layer)."""

    hot: HotSet
    tables: tuple[tuple[float, int], ...]  # per table read by rows: expected bytes a row costs, the padded table
    buffer_bytes: int  # the gathered tables' read buffers, as the runtime allocates them
    request: float  # bytes per read call of the tensors read whole, weighted by bytes (a tensor a call)

    @property
    def starts(self) -> dict[Key, float]:
        t = max(self.hot.total, 1)
        return {WHOLE: self.hot.gathered / t, LARGEST: max(0.0, 1.0 - self.hot.first / t)}

    @property
    def whole_bytes(self) -> int:
        """Bytes read whole at a disk share of 1."""
        return self.hot.total - self.hot.gathered

    def rows_bytes(self, rows: float) -> float:
        """Bytes read for ``rows`` gathered rows of each table (at most the whole table)."""
        return sum(min(rows * span, padded) for span, padded in self.tables)


def _page_span(row: int) -> float:
    """Expected bytes of the aligned pages a row of ``row`` bytes at a random index spans."""
    return (row - math.gcd(row, ALIGN)) + ALIGN if row % ALIGN else row


def hot_terms(cfg: OptConfig) -> HotTerms:
    """``cfg``'s hot set as a generation places it (the input tables in ``layout.GATHERED`` read by rows)."""
    layout = stack_layout(cfg)
    nbytes = {n: math.prod(layout.shapes[n]) * cfg.dtype_bytes for n in layout.store_order}
    hot = layout.hot_set(nbytes, GATHERED)
    tables = [n for n in GATHERED if n in nbytes]
    padded = {n: -(-nbytes[n] // ALIGN) * ALIGN for n in tables}
    rows = tuple((_page_span(layout.shapes[n][-1] * cfg.dtype_bytes), padded[n]) for n in tables)
    buffers = sum(padded[n] if padded[n] <= GATHER_BUFFER else GATHER_BUFFER + 2 * ALIGN for n in tables)
    whole = [nbytes[n] for n in layout.store_order if layout.whole_reads(n, GATHERED) or n not in tables]
    return HotTerms(hot, rows, buffers, sum(b * b for b in whole) / max(sum(whole), 1))


def derived_shares(starts: Mapping[Key, float], shares: Mapping[Key, float]) -> dict[Key, float]:
    """``shares`` with each derived share computed from the weights' disk share."""
    x = shares.get(DISK, 0.0)
    out = dict(shares)
    for key, start in starts.items():
        out[key] = max(0.0, (x - start) / (1.0 - start)) if start < 1.0 else 0.0
    return out
