"""Linear kernels for compressed weights (``flexrun.quant``), registered with the kernel sets.

The reference dequantizes the whole weight and multiplies. The CPU set runs torch's fused weight-only
matmuls with bfloat16 activations (their float32 paths are scalar code): ``_weight_int4pack_mm_for_cpu`` on
its own packed int4 layout (derived at load for a resident weight; for one read from disk every step,
derived from the canonical bytes by a byte shuffle, several times cheaper than dequantizing) and
``_weight_int8pack_mm`` on per-row int8 as it is. Rows past ``FUSED_MAX_ROWS`` (prefill), shapes the fused
ops refuse and grouped int8 take the dequantizing path: a chunk of output rows at a time dequantized into
scratch, never a slow or wrong fused call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexrun.config import UPCAST_CHUNK_BYTES
from flexrun.kernels import cpu
from flexrun.quant.formats import Int4Weight, Int8Weight, QuantWeight


def dequantized_linear(x: torch.Tensor, w: QuantWeight, b: torch.Tensor | None) -> torch.Tensor:
    """The reference: x @ dequantize(w).T + b, in x's dtype."""
    return F.linear(x, w.dequantize(x.dtype), b)


def chunked_dequantized_linear(x: torch.Tensor, w: QuantWeight, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + b with ``w`` dequantized ``UPCAST_CHUNK_BYTES`` of output rows at a time into scratch, each
    chunk multiplied while it is in cache: the whole dequantized weight never exists."""
    n_out, k_in = w.shape
    rows = max(1, UPCAST_CHUNK_BYTES // (k_in * x.element_size()))
    if isinstance(w, Int4Weight):
        rows = max(w.group_size, rows - rows % 2)

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
    """An int4 weight in torch's CPU int4 layout (which depends on the instruction set: derived at load),
    beside its canonical form for the rows the fused op is slow at."""

    packed: torch.Tensor  # from _convert_weight_to_int4pack_for_cpu
    scale_zero: torch.Tensor  # (K/g, N, 2) bfloat16: value = (q - 8) * scale + zero
    canonical: Int4Weight

    @property
    def shape(self) -> tuple[int, int]:
        return self.canonical.shape


@dataclass
class CpuInt8Weight:
    """A per-row int8 weight with its scales in bfloat16, as ``_weight_int8pack_mm`` takes them (the codes
    are the canonical weight's own)."""

    scale: torch.Tensor  # (N,) bfloat16
    canonical: Int8Weight

    @property
    def shape(self) -> tuple[int, int]:
        return self.canonical.shape


def prepared_extra_bytes(encoding: str, shape: tuple[int, ...]) -> int:
    """Bytes ``prepare_for_cpu`` adds to a weight of this encoding and shape (its int4 packed copy)."""
    return shape[0] * shape[1] // 2 if encoding == "int4" else 0


# torch's CPU int4 layout packs, per block of ``_BLOCK`` output rows and for each input column, row d of
# the block's first half in the low nibble and row d of its second half in the high one (its AVX2 kernels);
# other builds (AVX-512: blocks of 64 in another order) are detected and repacked by torch itself.
_BLOCK = 32


@functools.cache
def _fast_repack_matches() -> bool:
    """Whether ``_repack_int4`` gives exactly the layout this torch build's own converter does (checked
    once on a probe: the layout depends on the instruction set torch dispatches to)."""
    codes = torch.randint(0, 16, (2 * _BLOCK, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    probe = Int4Weight((codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), torch.ones(64, 2), torch.ones(64, 2), 32)
    ours = _repack_int4(probe)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    return ours.shape == theirs.shape and torch.equal(ours.view(theirs.shape), theirs)


def _repack_int4(w: Int4Weight) -> torch.Tensor:
    """The canonical codes in the blocked AVX2 layout, straight from the packed bytes: for each block, the
    low nibbles of its two halves make the even columns' bytes and the high nibbles the odd columns'."""
    n, k = w.shape
    halves = w.q.view(n // _BLOCK, 2, _BLOCK // 2, k // 2)  # (blocks, half, row in half, column pair)
    first, second = halves[:, 0], halves[:, 1]
    out = torch.empty(n // _BLOCK, k // 2, 2, _BLOCK // 2, dtype=torch.uint8)  # (blocks, pair, even/odd, row)
    torch.bitwise_or(first & 0x0F, second << 4, out=out[:, :, 0, :].transpose(1, 2))
    torch.bitwise_or(first >> 4, second & 0xF0, out=out[:, :, 1, :].transpose(1, 2))
    return out.view(n, k // 2)


def _int4_pack(w: Int4Weight) -> CpuInt4Weight | None:
    """``w`` in torch's CPU int4 layout, or None when the op does not take its shape."""
    n, k = w.shape
    if n % 16 or k % 16:
        return None
    if n % _BLOCK == 0 and _fast_repack_matches():
        packed = _repack_int4(w)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.codes().to(torch.int32), 1)
    scale = w.scale.float()  # (N, K/g)
    zero = w.low.float() + 8 * scale  # the op computes (q - 8) * scale + zero
    scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # (K/g, N, 2)
    return CpuInt4Weight(packed, scale_zero, w)


def prepare_for_cpu(w: QuantWeight) -> QuantWeight | CpuInt4Weight | CpuInt8Weight:
    """``w`` in the layout of torch's fused CPU op for it, when the op takes its shape; else ``w`` itself."""
    n, k = w.shape
    if isinstance(w, Int4Weight):
        return _int4_pack(w) or w
    if isinstance(w, Int8Weight) and w.group_size == 0 and k % 16 == 0:
        return CpuInt8Weight(w.scale.view(n).to(torch.bfloat16), w)
    return w


def cpu_canonical_int4_linear(x: torch.Tensor, w: Int4Weight, b: torch.Tensor | None) -> torch.Tensor:
    """A canonical int4 weight (one read from disk this step): for decode-sized ``x`` it is repacked (a
    byte shuffle, several times cheaper than dequantizing it) for the fused op; otherwise, or where this
    torch's layout is not the one ``_repack_int4`` writes, dequantized chunk by chunk."""
    n, k = w.shape
    if x.numel() <= FUSED_MAX_ROWS * k and n % _BLOCK == 0 and k % 16 == 0 and _fast_repack_matches():
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
        return chunked_dequantized_linear(x, w.canonical, b)
    y = torch._weight_int4pack_mm_for_cpu(_bf16_rows(x, k), w.packed, w.canonical.group_size, w.scale_zero)
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
