"""Compressed weights: group-wise int4 and int8 along the input dimension K of an [out, in] weight.

The canonical form, the one a store holds and every device reads, is portable across instruction sets:

- ``int4``: asymmetric min-max per group of ``group_size`` values along K. ``q`` in 0..15, two per byte
  (the even column in the low nibble), and per group a float16 ``scale`` and ``low`` (the group's
  minimum): value = q * scale + low.
- ``int8``: symmetric, value = q * scale with q in -127..127, one float16 scale per output row
  (``group_size`` 0, what torch's CPU int8 matmul takes) or per group along K.

A kernel set may derive a faster layout of its own when it loads a weight (``kernels.cpu`` repacks int4
for torch's CPU matmul); that layout is never stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexrun.errors import ConfigError

KINDS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP = {"int4": 64, "int8": 0}
# The smallest scale stored: float16's smallest normal number, so no scale is a subnormal or zero.
_MIN_SCALE = 2.0**-14
# Each part of an encoded tensor starts at a multiple of this many bytes in its file.
PART_ALIGN = 64


DEQUANT_BLOCK = 1 << 17  # elements an int8 dequantization writes at a time


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is compressed: ``int4`` or ``int8``, and the group size along K (0: one per row)."""

    kind: str
    group_size: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"compression must be one of {', '.join(KINDS)}, got {self.kind!r}")
        allowed = GROUP_SIZES if self.kind == "int4" else (0, *GROUP_SIZES)
        if self.group_size not in allowed:
            sizes = ", ".join(str(g) for g in allowed)
            raise ConfigError(f"{self.kind} group size must be one of {sizes}, got {self.group_size}")

    @classmethod
    def of(cls, kind: str, group_size: int | None = None) -> QuantSpec:
        return cls(kind, DEFAULT_GROUP[kind] if group_size is None else group_size)

    def describe(self) -> str:
        return f"{self.kind} g{self.group_size}" if self.group_size else f"{self.kind} per row"

    def groups(self, k: int) -> int:
        """Groups per row of a weight with ``k`` columns."""
        return 1 if self.group_size == 0 else k // self.group_size

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse a weight this spec cannot encode: not a matrix, or K not a multiple of the group size."""
        if len(shape) != 2:
            raise ConfigError(f"{name}: only matrices are compressed, not shape {shape}")
        if self.group_size and shape[1] % self.group_size:
            raise ConfigError(
                f"{name}: its {shape[1]} input columns are not a multiple of the {self.kind} group size "
                f"{self.group_size}; choose a group size that divides them"
            )

    def parts(self, shape: tuple[int, ...]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The encoded parts of an [N, K] weight, in file order: (name, dtype, shape)."""
        n, k = shape
        g = self.groups(k)
        if self.kind == "int4":
            return [("q", torch.uint8, (n, k // 2)), ("scale", torch.float16, (n, g)), ("low", torch.float16, (n, g))]
        return [("q", torch.int8, (n, k)), ("scale", torch.float16, (n, g))]

    def layout(self, shape: tuple[int, ...]) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...], int]], int]:
        """Each part with its byte offset, and the encoded size in bytes."""
        out, off = [], 0
        for name, dtype, pshape in self.parts(shape):
            out.append((name, dtype, pshape, off))
            off += -(-math.prod(pshape) * dtype.itemsize // PART_ALIGN) * PART_ALIGN
        return out, off

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return self.layout(shape)[1]


@dataclass
class Int4Weight:
    """A group-wise int4 [N, K] weight in the canonical form (see the module docstring)."""

    q: torch.Tensor  # (N, K/2) uint8
    scale: torch.Tensor  # (N, K/g) float16
    low: torch.Tensor  # (N, K/g) float16
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * 2

    def codes(self) -> torch.Tensor:
        """q as (N, K) uint8 in 0..15."""
        n, k = self.shape
        return torch.stack([self.q & 0x0F, self.q >> 4], dim=-1).view(n, k)

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: slice | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The weight (or ``rows`` of it) in ``dtype`` (or written into ``out``, (rows, K)): q * scale + low,
        computed in float32 (the product is exact: 4-bit codes times float16 scales)."""
        rows = rows or slice(None)
        q = self.q[rows]
        n, k = q.shape[0], q.shape[1] * 2
        g = self.group_size
        if out is None:
            out = torch.empty(n, k, dtype=dtype, device=q.device)
        # Even columns from the low nibbles, odd ones from the high, each one fused pass from the uint8 codes
        # (unpacking first, or a broadcast multiply then add, is several times slower).
        q = q.view(n, k // g, g // 2)
        pairs = out.view(n, k // g, g // 2, 2)
        scale, low = self.scale[rows].float()[..., None], self.low[rows].float()[..., None]
        torch.addcmul(low, q & 0x0F, scale, out=pairs[..., 0])
        torch.addcmul(low, q >> 4, scale, out=pairs[..., 1])
        return out


@dataclass
class Int8Weight:
    """A symmetric int8 [N, K] weight: one scale per row (``group_size`` 0) or per group along K."""

    q: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N, K/g or 1) float16
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1]

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: slice | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The weight (or ``rows`` of it) in ``dtype`` (or written into ``out``, (rows, K)): q * scale."""
        rows = rows or slice(None)
        q = self.q[rows]
        n, k = q.shape
        g = self.group_size or k
        if out is None:
            out = torch.empty(n, k, dtype=dtype, device=q.device)
        scale = self.scale[rows].float()[..., None]  # (n, K/g, 1)
        # A few rows at a time: the mixed-dtype product stays in cache (~1.9x faster into bfloat16 than whole).
        step = max(1, DEQUANT_BLOCK // k)
        for r in range(0, n, step):
            torch.mul(
                q[r : r + step].view(-1, k // g, g), scale[r : r + step], out=out[r : r + step].view(-1, k // g, g)
            )
        return out


QuantWeight = Int4Weight | Int8Weight


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales as stored: float16, never below its smallest normal number."""
    return scale.clamp(min=_MIN_SCALE).to(torch.float16)


def quantize(w: torch.Tensor, spec: QuantSpec) -> QuantWeight:
    """``w`` (N, K) compressed as ``spec`` says; the codes are chosen against the stored (float16) scales."""
    spec.check("weight", tuple(w.shape))
    n, k = w.shape
    g = spec.group_size or k
    wg = w.detach().float().reshape(n, k // g, g)  # (N, groups, g)
    if spec.kind == "int4":
        low = wg.amin(-1).to(torch.float16)  # (N, groups)
        scale = fp16_scale((wg.amax(-1) - low.float()) / 15)
        q = ((wg - low.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        q = q.view(n, k // 2, 2)
        return Int4Weight((q[..., 0] | (q[..., 1] << 4)).contiguous(), scale, low, g)
    scale = fp16_scale(wg.abs().amax(-1) / 127)
    q8 = (wg / scale.float()[..., None]).round_().clamp_(-127, 127).to(torch.int8).view(n, k)
    return Int8Weight(q8, scale, spec.group_size)


def encode(weight: QuantWeight, spec: QuantSpec) -> torch.Tensor:
    """The weight's parts as one uint8 buffer, laid out as ``spec.layout`` says (zeros between parts)."""
    parts, total = spec.layout(weight.shape)
    out = torch.zeros(total, dtype=torch.uint8)
    for name, _, _, off in parts:
        data = getattr(weight, name).contiguous().view(-1).view(torch.uint8)
        out[off : off + data.numel()] = data
    return out


def decode(raw: torch.Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> QuantWeight:
    """The weight whose parts ``raw`` (uint8, on any device) holds: views into it, nothing copied."""
    parts = {}
    for name, dtype, pshape, off in spec.layout(shape)[0]:
        size = math.prod(pshape) * dtype.itemsize
        parts[name] = raw[off : off + size].view(dtype).view(pshape)
    if spec.kind == "int4":
        return Int4Weight(parts["q"], parts["scale"], parts["low"], spec.group_size)
    return Int8Weight(parts["q"], parts["scale"], spec.group_size)


def cat_rows(weights: list[QuantWeight]) -> QuantWeight | None:
    """The [sum N, K] weight whose rows are those of ``weights`` in order (a fused QKV from Q, K and V),
    still compressed; None when they do not share one encoding and group size."""
    first = weights[0]
    if any(type(w) is not type(first) or w.group_size != first.group_size for w in weights):
        return None
    if isinstance(first, Int4Weight):
        int4 = [w for w in weights if isinstance(w, Int4Weight)]
        return Int4Weight(
            torch.cat([w.q for w in int4]),
            torch.cat([w.scale for w in int4]),
            torch.cat([w.low for w in int4]),
            first.group_size,
        )
    int8 = [w for w in weights if isinstance(w, Int8Weight)]
    return Int8Weight(torch.cat([w.q for w in int8]), torch.cat([w.scale for w in int8]), first.group_size)


def take_rows(weight: QuantWeight, index: torch.Tensor) -> QuantWeight:
    """``weight`` with its rows reordered (or selected) by ``index``; groups run along K, so each row's
    codes and scales move together and nothing is re-quantized."""
    if isinstance(weight, Int4Weight):
        return Int4Weight(weight.q[index], weight.scale[index], weight.low[index], weight.group_size)
    return Int8Weight(weight.q[index], weight.scale[index], weight.group_size)


def spec_of(weight: QuantWeight) -> QuantSpec:
    """The spec ``weight`` is encoded as."""
    return QuantSpec("int4" if isinstance(weight, Int4Weight) else "int8", weight.group_size)
