"""An affine function of the placement's shares: the form every time and memory figure of the cost model
takes (``costmodel.equations``), which the LP (``costmodel.lp``) constrains and ``prediction`` evaluates."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

Key = tuple[str, str]  # (kind, tier), or a share derived from them (``costmodel.hotset``)


@dataclass(frozen=True)
class Affine:
    """``const + sum(coef[k] * share[k])`` over the nine shares, ``k = (kind, tier)``."""

    const: float = 0.0
    coef: Mapping[Key, float] = field(default_factory=dict)

    @classmethod
    def share(cls, kind: str, tiers: Iterable[str], scale: float) -> Affine:
        """``scale`` x the share of ``kind`` on ``tiers`` (e.g. weights on host + disk)."""
        return cls(0.0, {(kind, t): float(scale) for t in tiers})

    def __add__(self, other: Affine | float) -> Affine:
        if not isinstance(other, Affine):
            return Affine(self.const + float(other), self.coef)
        coef = dict(self.coef)
        for k, v in other.coef.items():
            coef[k] = coef.get(k, 0.0) + v
        return Affine(self.const + other.const, coef)

    __radd__ = __add__

    def __mul__(self, factor: float) -> Affine:
        return Affine(self.const * factor, {k: v * factor for k, v in self.coef.items()})

    __rmul__ = __mul__

    def value(self, shares: Mapping[Key, float]) -> float:
        return self.const + sum(v * shares.get(k, 0.0) for k, v in self.coef.items())
