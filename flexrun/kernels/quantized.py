"""Linear kernels for compressed weights (``flexrun.quant``), registered with the kernel sets.

The reference dequantizes the whole weight and multiplies. The CPU set multiplies a weight taken a
chunk of output rows at a time, dequantized into scratch (the path an int4 weight read from disk every
step takes, and any shape torch's fused ops refuse), and, for weights it prepared at load and per-row int8
weights as read, runs torch's fused weight-only matmuls: ``_weight_int4pack_mm_for_cpu`` on its own packed int4 layout and
``_weight_int8pack_mm`` on per-row int8, both with bfloat16 activations (their float32 paths are scalar
code). Each op's preconditions are checked when the weight is prepared; a weight that fails them stays
canonical and takes the dequantizing path, never a slow or wrong one.
"""

from __future__ import annotations

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
        return (
            cpu.scratch("weight", n * k_in, x.dtype, x.device)
            .view(n, k_in)
            .copy_(w.dequantize(x.dtype, slice(r, r + n)))
        )

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


def prepare_for_cpu(w: QuantWeight) -> QuantWeight | CpuInt4Weight | CpuInt8Weight:
    """``w`` in the layout of torch's fused CPU op for it, when the op takes its shape; else ``w`` itself."""
    n, k = w.shape
    if isinstance(w, Int4Weight) and n % 16 == 0 and k % 16 == 0:
        codes = w.codes().to(torch.int32)  # (N, K)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale = w.scale.float()  # (N, K/g)
        zero = w.low.float() + 8 * scale  # the op computes (q - 8) * scale + zero
        scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # (K/g, N, 2)
        return CpuInt4Weight(packed, scale_zero, w)
    if isinstance(w, Int8Weight) and w.group_size == 0 and k % 16 == 0:
        return CpuInt8Weight(w.scale.view(n).to(torch.bfloat16), w)
    return w


def _bf16_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x as (m, k) bfloat16, contiguous and 64-byte aligned (the int8 kernel reads garbage otherwise)."""
    x2 = x.reshape(-1, k).to(torch.bfloat16).contiguous()
    return x2 if x2.data_ptr() % 64 == 0 else x2.clone()


def cpu_int4_linear(x: torch.Tensor, w: CpuInt4Weight, b: torch.Tensor | None) -> torch.Tensor:
    n, k = w.shape
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
