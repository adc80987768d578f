"""Linear kernels for compressed weights (``flexrun.quant``), registered with the kernel sets.

The reference dequantizes the whole weight and multiplies. The CPU set runs torch's fused weight-only
matmuls with bfloat16 activations (their float32 paths are scalar code): ``_weight_int4pack_mm_for_cpu`` on
its own packed int4 layout (derived at load for a resident weight; for one read from disk every step,
derived from the canonical bytes by a byte shuffle, several times cheaper than dequantizing) and
``_weight_int8pack_mm`` on per-row int8 as it is. Rows past ``FUSED_MAX_ROWS`` (prefill), shapes the fused
ops refuse and grouped int8 take the dequantizing path: a chunk of output rows at a time dequantized into
scratch, never a slow or wrong fused call. A resident int4 weight's codes are held once, in torch's layout,
and read back from it a chunk at a time for that path (where the layout is one ``_dequantize_packed`` reads).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexrun.config import UPCAST_CHUNK_BYTES
from flexrun.kernels import cpu
from flexrun.quant.formats import Int4Weight, Int8Weight, QuantSpec, QuantWeight


def dequantized_linear(x: torch.Tensor, w: QuantWeight, b: torch.Tensor | None) -> torch.Tensor:
    """The reference: x @ dequantize(w).T + b, in x's dtype."""
    return F.linear(x, w.dequantize(x.dtype), b)


def chunked_dequantized_linear(x: torch.Tensor, w: QuantWeight | CpuInt4Weight, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + b with ``w`` dequantized ``UPCAST_CHUNK_BYTES`` of output rows at a time into scratch, each
    chunk multiplied while it is in cache: the whole dequantized weight never exists."""
    n_out, k_in = w.shape
    rows = max(1, UPCAST_CHUNK_BYTES // (k_in * x.element_size()))
    if isinstance(w, Int4Weight):
        rows = max(w.group_size, rows - rows % 2)
    elif isinstance(w, CpuInt4Weight):  # read from the packed layout: whole blocks at a time
        rows = max(max(_BLOCKS), rows - rows % max(_BLOCKS))

    def rows_of(r: int, n: int) -> torch.Tensor:
        out = cpu.scratch("weight", n * k_in, x.dtype, x.device).view(n, k_in)
        return w.dequantize(x.dtype, slice(r, r + n), out=out)

    return cpu.chunked_matmul(x, n_out, rows, rows_of, b)


# Up to this many rows of x (decode: the block's sequences) torch's fused ops run; above it the canonical
# weight is dequantized chunk by chunk and multiplied in x's dtype, which is faster there (the fused ops'
# cost grows with the rows as a bfloat16 matmul's does; benchmarks/README.md has the measurements).
FUSED_MAX_ROWS = 64


@dataclass
class CpuInt4Weight:
    """An int4 weight in torch's CPU int4 layout (which depends on the instruction set: derived at load), with
    the canonical scales for the rows the fused op is slow at. Its codes are held once, in the packed layout,
    and read back from it chunk by chunk where that layout is the blocked one ``_dequantize_packed`` reads;
    ``codes`` keeps the canonical copy only where it is not."""

    packed: torch.Tensor  # from _convert_weight_to_int4pack_for_cpu
    scale_zero: torch.Tensor  # (K/g, N, 2) bfloat16: value = (q - 8) * scale + zero
    scale: torch.Tensor  # (N, K/g) float16, the canonical scales
    low: torch.Tensor  # (N, K/g) float16
    group_size: int
    codes: torch.Tensor | None = None  # (N, K/2) uint8 canonical codes, only where the layout is not readable

    @property
    def shape(self) -> tuple[int, int]:
        return self.scale.shape[0], self.scale.shape[1] * self.group_size

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: slice | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """As ``Int4Weight.dequantize``, the same values; without ``codes``, read from the packed layout, and
        ``rows`` start and stop at multiples of its block."""
        rows = rows or slice(0, self.shape[0])
        if self.codes is not None:
            kept = Int4Weight(self.codes[rows], self.scale[rows], self.low[rows], self.group_size)
            return kept.dequantize(dtype, out=out)
        block = _packed_block()
        assert block is not None  # no codes kept: the layout is one _dequantize_packed reads
        if out is None:
            out = torch.empty(rows.stop - (rows.start or 0), self.shape[1], dtype=dtype)
        return _dequantize_packed(self, rows, out, block)


@dataclass
class CpuInt8Weight:
    """A per-row int8 weight with its scales in bfloat16, as ``_weight_int8pack_mm`` takes them (the codes
    are the canonical weight's own)."""

    scale: torch.Tensor  # (N,) bfloat16
    canonical: Int8Weight

    @property
    def shape(self) -> tuple[int, int]:
        return self.canonical.shape


def prepared_extra_bytes(spec: QuantSpec, shape: tuple[int, ...]) -> int:
    """Bytes ``prepare_for_cpu`` adds to a weight of this encoding and shape, over its canonical bytes: int4's
    bfloat16 scale-and-zero pairs for the fused op, and its codes a second time where torch's layout cannot
    be read back (``_held_once``)."""
    if spec.kind != "int4" or not _packable(shape):
        return 0
    n, k = shape
    scale_zero = 4 * n * (k // spec.group_size)
    return scale_zero if _held_once(shape) else scale_zero + n * k // 2


# torch's CPU int4 layout packs, per block of output rows and for each input column, row d of the block's
# first half in the low nibble and row d of its second half in the high one: blocks of 32 rows in its AVX2
# kernels, of 64 in its AVX-512 ones. Which one this build writes is checked once (``_packed_block``); a
# layout that is neither is converted by torch itself, and its codes kept canonical too.
_BLOCKS = (32, 64)


@functools.cache
def _packed_block() -> int | None:
    """The block ``_repack_int4`` and ``_dequantize_packed`` must use to write and read exactly the layout this
    torch build's own converter writes (checked on a probe: the layout depends on the instruction set torch dispatches
    to), or None when neither does."""
    n = 2 * max(_BLOCKS)
    codes = torch.randint(0, 16, (n, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    probe = Int4Weight((codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), torch.ones(n, 2), torch.ones(n, 2), 32)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    for block in _BLOCKS:
        ours = _repack_int4(probe, block)
        if ours.shape == theirs.shape and torch.equal(ours.view(theirs.shape), theirs):
            read = CpuInt4Weight(theirs, theirs, probe.scale, probe.low, 32)
            if torch.equal(_dequantize_packed(read, slice(0, n), torch.empty(n, 64), block), probe.dequantize()):
                return block
    return None


def _packable(shape: tuple[int, ...]) -> bool:
    """Whether torch's fused int4 op takes a weight of this shape."""
    return shape[0] % 16 == 0 and shape[1] % 16 == 0


def _held_once(shape: tuple[int, ...]) -> bool:
    """Whether a weight of this shape is repacked by ``_repack_int4`` and read back by ``_dequantize_packed``:
    whole blocks of the layout this torch writes."""
    block = _packed_block()
    return block is not None and shape[0] % block == 0 and shape[1] % 16 == 0


def _repack_int4(w: Int4Weight, block: int) -> torch.Tensor:
    """The canonical codes in the blocked layout, straight from the packed bytes: for each block, the low
    nibbles of its two halves make the even columns' bytes and the high nibbles the odd columns'."""
    n, k = w.shape
    halves = w.q.view(n // block, 2, block // 2, k // 2)  # (blocks, half, row in half, column pair)
    first, second = halves[:, 0], halves[:, 1]
    out = torch.empty(n // block, k // 2, 2, block // 2, dtype=torch.uint8)  # (blocks, pair, even/odd, row)
    torch.bitwise_or(first & 0x0F, second << 4, out=out[:, :, 0, :].transpose(1, 2))
    torch.bitwise_or(first >> 4, second & 0xF0, out=out[:, :, 1, :].transpose(1, 2))
    return out.view(n, k // 2)


def _dequantize_packed(w: CpuInt4Weight, rows: slice, out: torch.Tensor, block: int) -> torch.Tensor:
    """Rows ``rows`` (whole blocks) of ``w`` dequantized into ``out`` (rows, K) straight from the blocked
    layout: each block's low nibbles are its first half's rows, transposed, and the high its second half's;
    the same q * scale + low in float32 as ``Int4Weight.dequantize``, so the same values to the bit."""
    r, stop = rows.start or 0, rows.stop
    k = w.shape[1]
    g, nb, half = w.group_size, (stop - r) // block, block // 2
    data = w.packed.view(-1)[r * k // 2 : stop * k // 2].view(nb, k, half)  # (blocks, column, row in half)
    pairs = out.view(nb, 2, half, k // g, g)  # (blocks, half, row in half, group, in group)
    scale = w.scale[rows].float().view(nb, 2, half, k // g, 1)
    low = w.low[rows].float().view(nb, 2, half, k // g, 1)
    for i, codes in enumerate((data & 0x0F, data >> 4)):
        torch.addcmul(low[:, i], codes.transpose(1, 2).view(nb, half, k // g, g), scale[:, i], out=pairs[:, i])
    return out


def _int4_pack(w: Int4Weight, resident: bool = False) -> CpuInt4Weight | None:
    """``w`` in torch's CPU int4 layout, or None when the op does not take its shape. ``resident``: ``w`` is
    kept, so what it keeps of ``w`` is copied out of ``w``'s buffer (which can then go) and its codes are
    kept canonical too only where the layout cannot be read back."""
    if not _packable(w.shape):
        return None
    block = _packed_block()
    if _held_once(w.shape) and block is not None:
        packed = _repack_int4(w, block)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.codes().to(torch.int32), 1)
    scale = w.scale.float()  # (N, K/g)
    zero = w.low.float() + 8 * scale  # the op computes (q - 8) * scale + zero
    scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # (K/g, N, 2)
    if not resident:
        return CpuInt4Weight(packed, scale_zero, w.scale, w.low, w.group_size, None)
    if _held_once(w.shape):
        return CpuInt4Weight(packed, scale_zero, w.scale.clone(), w.low.clone(), w.group_size, None)
    return CpuInt4Weight(packed, scale_zero, w.scale, w.low, w.group_size, w.q)


def prepare_for_cpu(w: QuantWeight) -> QuantWeight | CpuInt4Weight | CpuInt8Weight:
    """``w`` in the layout of torch's fused CPU op for it, when the op takes its shape; else ``w`` itself."""
    n, k = w.shape
    if isinstance(w, Int4Weight):
        return _int4_pack(w, resident=True) or w
    if isinstance(w, Int8Weight) and w.group_size == 0 and k % 16 == 0:
        return CpuInt8Weight(w.scale.view(n).to(torch.bfloat16), w)
    return w


def cpu_canonical_int4_linear(x: torch.Tensor, w: Int4Weight, b: torch.Tensor | None) -> torch.Tensor:
    """A canonical int4 weight (one read from disk this step): for decode-sized ``x`` it is repacked (a
    byte shuffle, several times cheaper than dequantizing it) for the fused op; otherwise, or where this
    torch's layout is not the one ``_repack_int4`` writes, dequantized chunk by chunk."""
    k = w.shape[1]
    if x.numel() <= FUSED_MAX_ROWS * k and _held_once(w.shape):
        packed = _int4_pack(w)
        if packed is not None:
            return cpu_int4_linear(x, packed, b)
    return chunked_dequantized_linear(x, w, b)


def _bf16_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x as (m, k) bfloat16, contiguous and 64-byte aligned (the int8 kernel reads garbage otherwise)."""
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.bfloat16:
        return x2.to(torch.bfloat16, memory_format=torch.contiguous_format)  # a fresh, aligned allocation
    x2 = x2.contiguous()
    return x2 if x2.data_ptr() % 64 == 0 else x2.clone()


def cpu_int4_linear(x: torch.Tensor, w: CpuInt4Weight, b: torch.Tensor | None) -> torch.Tensor:
    k, n = x.shape[-1], w.scale_zero.shape[1]
    if x.numel() > FUSED_MAX_ROWS * k:
        return chunked_dequantized_linear(x, w, b)
    y = torch._weight_int4pack_mm_for_cpu(_bf16_rows(x, k), w.packed, w.group_size, w.scale_zero)
    y = y.to(x.dtype).view(*x.shape[:-1], n)  # (..., n)
    return y if b is None else y.add_(b)


def cpu_canonical_int8_linear(x: torch.Tensor, w: Int8Weight, b: torch.Tensor | None) -> torch.Tensor:
    """A canonical int8 weight (one read from disk this step): the fused op takes its codes as they are, so
    only the scales are converted (N values), not the weight."""
    n, k = w.shape
    if w.group_size or k % 16:
        return chunked_dequantized_linear(x, w, b)
    return cpu_int8_linear(x, CpuInt8Weight(w.scale.view(n).to(torch.bfloat16), w), b)


def cpu_int8_linear(x: torch.Tensor, w: CpuInt8Weight, b: torch.Tensor | None) -> torch.Tensor:
    n, k = w.shape
    if x.numel() > FUSED_MAX_ROWS * k:
        return chunked_dequantized_linear(x, w.canonical, b)
    y = torch._weight_int8pack_mm(_bf16_rows(x, k), w.canonical.q, w.scale)  # (m, n)
    y = y.to(x.dtype).view(*x.shape[:-1], n)  # (..., n)
    return y if b is None else y.add_(b)
