"""Triton kernels for the canonical compressed weights (``flexrun.quant.formats``): group-wise dequantize, and
a dequantize-matmul for decode-sized inputs that reads each compressed byte of the weight once.

Both read the stored layout as it is, nothing derived at load: int4 codes two per byte (the even column in
the low nibble) with a float16 ``scale`` and ``low`` per group of K (value = q * scale + low); int8 codes
with a float16 scale per row or per group (value = q * scale). The dequantized value is computed in float32,
exactly as ``Int4Weight.dequantize`` / ``Int8Weight.dequantize`` compute it (a 4- or 8-bit code times a
float16 scale is exact in float32), then cast. Their oracles are those two methods and
``kernels.quantized.dequantized_linear``; ``tests/test_triton_kernels.py`` holds them to it.

Importing this module imports Triton: ``kernels.select_kernels`` imports it only for a CUDA device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flexrun.quant.formats import Int4Weight, Int8Weight, QuantWeight

# Up to this many rows of x (the block's sequences at a decode step) the fused kernel runs; above it (prefill)
# the weight is dequantized by ``dequantize`` and multiplied by cuBLAS, which is the faster there. The
# threshold is a guess (the kernel pads x's rows to a 16-row tile), not a measurement: no GPU has run it.
FUSED_MAX_ROWS = 16
_TILE_N, _TILE_K = 64, 64  # the dequantize kernel's tile of (output rows, input columns)
_MM_N, _MM_K = 32, 64  # the fused kernel's tile: output columns per program, K per step


@triton.jit
def _dequant_tile(q_ptr, scale_ptr, low_ptr, rn, rk, N, K, stride_q, stride_s, GROUP: tl.constexpr, INT4: tl.constexpr):
    """The float32 values of weight rows ``rn`` x columns ``rk`` (0 outside the weight). GROUP 0: one scale a row."""
    inside = (rn < N)[:, None] & (rk < K)[None, :]
    g = rk * 0 if GROUP == 0 else rk // GROUP  # each column's group
    s_off = rn[:, None] * stride_s + g[None, :]
    scale = tl.load(scale_ptr + s_off, mask=inside, other=0.0).to(tl.float32)
    if INT4:  # one return, after both branches: no early return for the compiler to fold
        byte = tl.load(q_ptr + rn[:, None] * stride_q + (rk // 2)[None, :], mask=inside, other=0).to(tl.int32)
        code = (byte >> ((rk % 2) * 4)[None, :]) & 0xF  # even column: low nibble, odd: high
        low = tl.load(low_ptr + s_off, mask=inside, other=0.0).to(tl.float32)
        w = code.to(tl.float32) * scale + low
    else:
        w = tl.load(q_ptr + rn[:, None] * stride_q + rk[None, :], mask=inside, other=0).to(tl.float32) * scale
    return w


@triton.jit
def _dequant_kernel(
    q_ptr,
    scale_ptr,
    low_ptr,
    out_ptr,
    N,
    K,
    stride_q,
    stride_s,
    stride_o,
    GROUP: tl.constexpr,
    INT4: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    w = _dequant_tile(q_ptr, scale_ptr, low_ptr, rn, rk, N, K, stride_q, stride_s, GROUP, INT4)
    inside = (rn < N)[:, None] & (rk < K)[None, :]
    tl.store(out_ptr + rn[:, None] * stride_o + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _qmatmul_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    low_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_q,
    stride_s,
    stride_ym,
    GROUP: tl.constexpr,
    INT4: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[:, n-block] = x @ W[n-block].T (+ bias): each program owns BLOCK_N output columns over all of K, so
    every compressed byte of W is read by exactly one program, once; x (a few rows) is reread from cache."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0
        )
        w = _dequant_tile(q_ptr, scale_ptr, low_ptr, rn, rk, N, K, stride_q, stride_s, GROUP, INT4)
        # The weight rounded to x's dtype first, as the reference's ``dequantize(x.dtype)`` does.
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=out)


def _parts(w: QuantWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """codes, scales, lows (the scales again for int8: never read) and whether it is int4."""
    if isinstance(w, Int4Weight):
        return w.q, w.scale, w.low, True
    return w.q, w.scale, w.scale, False


def _contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dimension (the kernels index rows by stride, columns by 1)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def dequantize(w: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole [N, K] weight in ``dtype``: ``w.dequantize(dtype)`` computed by one Triton kernel."""
    q, scale, low, int4 = _parts(w)
    q, scale, low = _contiguous_rows(q), _contiguous_rows(scale), _contiguous_rows(low)
    n, k = w.shape
    out = torch.empty(n, k, dtype=dtype, device=q.device)
    grid = (triton.cdiv(n, _TILE_N), triton.cdiv(k, _TILE_K))
    _dequant_kernel[grid](
        q, scale, low, out, n, k, q.stride(0), scale.stride(0), out.stride(0), w.group_size, int4, _TILE_N, _TILE_K
    )
    return out


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(n))


def quant_matmul(x: torch.Tensor, w: QuantWeight, b: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) @ W.T + b for at most ``FUSED_MAX_ROWS`` rows of x, W read compressed; the result in x's dtype."""
    n, k = w.shape
    x2 = _contiguous_rows(x.reshape(-1, k))  # (m, K)
    m = x2.shape[0]
    q, scale, low, int4 = _parts(w)
    q, scale, low = _contiguous_rows(q), _contiguous_rows(scale), _contiguous_rows(low)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # (m, N)
    bias = b if b is not None else y  # never read without HAS_BIAS
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # float32 products as float32, not TF32
    grid = (triton.cdiv(n, _MM_N),)
    _qmatmul_kernel[grid](
        x2,
        q,
        scale,
        low,
        bias,
        y,
        m,
        n,
        k,
        x2.stride(0),
        q.stride(0),
        scale.stride(0),
        y.stride(0),
        w.group_size,
        int4,
        b is not None,
        precision,
        _pow2_at_least(m, 16),  # tl.dot's smallest tile is 16 rows
        _MM_N,
        _MM_K,
    )
    return y.view(*x.shape[:-1], n)


def quant_linear(x: torch.Tensor, w: QuantWeight, b: torch.Tensor | None) -> torch.Tensor:
    """The Triton set's linear for ``Int4Weight`` and ``Int8Weight``: fused at decode sizes, else dequantized
    by the kernel and multiplied by ``F.linear``."""
    if x.numel() <= FUSED_MAX_ROWS * w.shape[1]:
        return quant_matmul(x, w, b)
    return F.linear(x, dequantize(w, x.dtype), b)


LINEARS: dict[type, Callable[..., torch.Tensor]] = {Int4Weight: quant_linear, Int8Weight: quant_linear}
