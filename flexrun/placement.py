"""Where tensors live: a frozen ``Placement`` (FlexGen's "policy") and its CLI spelling.

Shares are fractions in [0, 1] per tier (``device``, ``host``, ``disk``) and sum to 1. On the command
line they are percentages: ``--weights host=40,disk=60``. The planner (costmodel) and the runtime both
use this one dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flexrun.errors import PlacementError

TIERS = ("device", "host", "disk")
COMPRESSIONS = ("", "int8", "int4")
# FlexGen's spelling, accepted so its users' commands translate directly.
_TIER_ALIASES = {"gpu": "device", "cpu": "host", "device": "device", "host": "host", "disk": "disk"}


@dataclass(frozen=True)
class Shares:
    """Fractions of one kind of tensor on each tier."""

    device: float = 0.0
    host: float = 1.0
    disk: float = 0.0

    def __post_init__(self) -> None:
        for tier in TIERS:
            value = getattr(self, tier)
            if not 0.0 <= value <= 1.0:
                raise PlacementError(f"share on {tier} must be within 0..100%, got {value * 100:g}%")
        if abs(self.device + self.host + self.disk - 1.0) > 1e-6:
            total = (self.device + self.host + self.disk) * 100
            raise PlacementError(f"shares must add up to 100%, got {total:g}% ({self.spec()})")

    def get(self, tier: str) -> float:
        return float(getattr(self, tier))

    def as_dict(self) -> dict[str, float]:
        return {t: self.get(t) for t in TIERS}

    def spec(self) -> str:
        """The CLI spelling, e.g. ``host=40,disk=60``."""
        return ",".join(f"{t}={self.get(t) * 100:g}" for t in TIERS if self.get(t) > 0) or "none"

    @classmethod
    def parse(cls, text: str) -> Shares:
        """Parse ``host=40,disk=60`` (percentages; missing tiers are 0; ``gpu``/``cpu`` are aliases)."""
        values = dict.fromkeys(TIERS, 0.0)
        for part in filter(None, (p.strip() for p in text.split(","))):
            tier, sep, number = part.partition("=")
            key = _TIER_ALIASES.get(tier.strip().lower())
            if not sep or key is None:
                raise PlacementError(f"bad share {part!r}: use TIER=PERCENT with TIER one of {', '.join(TIERS)}")
            try:
                values[key] += float(number) / 100
            except ValueError:
                raise PlacementError(f"bad share {part!r}: {number!r} is not a number") from None
        return cls(**values)

    @classmethod
    def only(cls, tier: str) -> Shares:
        return cls(**{t: float(t == tier) for t in TIERS})

    def split(self, sizes: list[int] | int) -> list[str]:
        """The tier of each item along the stack, realising these shares by size, in stack order.

        ``sizes`` are the items' byte sizes (an int ``n`` means ``n`` equal items). Items go to device first,
        then host, then disk; an item takes the tier in which the cumulative size reaches its midpoint, so
        40/60 of 10 equal items is exactly 4 and 6, and no item is split across tiers.
        """
        weights = [1] * sizes if isinstance(sizes, int) else list(sizes)
        total = sum(weights)
        cut_device = self.device * total
        cut_host = (self.device + self.host) * total
        tiers, cum = [], 0.0
        for w in weights:
            mid = cum + w / 2
            tiers.append("device" if mid < cut_device else "host" if mid < cut_host else "disk")
            cum += w
        return tiers


@dataclass(frozen=True)
class Placement:
    """Shares of weights, KV cache and activations per tier, the block shape, and the options."""

    weights: Shares = field(default_factory=Shares)
    cache: Shares = field(default_factory=Shares)
    activations: Shares = field(default_factory=Shares)
    gpu_batch_size: int = 1
    num_gpu_batches: int = 1
    # "" (off), "int8" or "int4" (``flexrun.quant``); True means int4, FlexGen's 4-bit compression.
    compress_weight: str = ""
    compress_cache: str = ""
    # Attention over a host-resident cache runs on the host instead of moving the cache to the device.
    cpu_cache_compute: bool = False
    overlap: bool = True

    def __post_init__(self) -> None:
        for name in ("compress_weight", "compress_cache"):
            value = getattr(self, name)
            kind = "int4" if value is True else "" if value is False or value is None else value
            if kind not in COMPRESSIONS:
                raise PlacementError(f"{name} must be one of int8, int4 (or off), got {value!r}")
            object.__setattr__(self, name, kind)
        if self.gpu_batch_size < 1 or self.num_gpu_batches < 1:
            raise PlacementError(
                f"batch sizes must be >= 1, got gpu_batch_size={self.gpu_batch_size}, "
                f"num_gpu_batches={self.num_gpu_batches}"
            )

    @property
    def block_size(self) -> int:
        """Sequences generated together: micro-batch size x micro-batches per block."""
        return self.gpu_batch_size * self.num_gpu_batches

    def describe(self) -> str:
        """One line: ``weights host=40,disk=60 | cache host=100 | ... | batch 8 x 4``."""
        flags = [
            name
            for name, on in (
                (f"compress-weight {self.compress_weight}", self.compress_weight),
                (f"compress-cache {self.compress_cache}", self.compress_cache),
                ("cpu-cache-compute", self.cpu_cache_compute),
                ("no-overlap", not self.overlap),
            )
            if on
        ]
        return (
            f"weights {self.weights.spec()} | cache {self.cache.spec()} | activations {self.activations.spec()}"
            f" | batch {self.gpu_batch_size} x {self.num_gpu_batches}" + (f" | {' '.join(flags)}" if flags else "")
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "weights": self.weights.as_dict(),
            "cache": self.cache.as_dict(),
            "activations": self.activations.as_dict(),
            "gpu_batch_size": self.gpu_batch_size,
            "num_gpu_batches": self.num_gpu_batches,
            "compress_weight": self.compress_weight,
            "compress_cache": self.compress_cache,
            "cpu_cache_compute": self.cpu_cache_compute,
            "overlap": self.overlap,
        }
