"""Triton kernels for LayerNorm and RMSNorm, each optionally fused with the residual add before it.

One program normalises one row (a token's hidden state) in float32: it adds the residual branch, writes the
sum (the new residual stream, in its dtype), and normalises the sum as rounded, so both outputs are what
``kernels.reference``'s add-then-norm gives. RMSNorm keeps the reference's casts: the normalised row is
rounded to x's dtype before the weight multiplies it (and the bias is added after that product's rounding).

Importing this module imports Triton: ``kernels.select_kernels`` imports it only for a CUDA device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexrun.kernels.reference import AddNormFn, NormFn


@triton.jit
def _norm_kernel(
    x_ptr,
    d_ptr,
    w_ptr,
    b_ptr,
    sum_ptr,
    out_ptr,
    H,
    stride_x,
    stride_d,
    stride_s,
    stride_o,
    eps,
    HAS_DELTA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    inside = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x += tl.load(d_ptr + row * stride_d + cols, mask=inside, other=0.0).to(tl.float32)
        x_rounded = x.to(sum_ptr.dtype.element_ty)  # the residual stream as it is kept
        tl.store(sum_ptr + row * stride_s + cols, x_rounded, mask=inside)
        x = x_rounded.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    if RMS:
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        # Rounded to x's dtype before the weight, as the reference (and Hugging Face's RMSNorms) do.
        y = (x * rstd).to(sum_ptr.dtype.element_ty).to(tl.float32) * w
        if HAS_BIAS:
            y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
    else:
        mean = tl.sum(x, axis=0) / H
        xc = tl.where(inside, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / H + eps)
        y = xc * rstd * w
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=inside)


def _rows(t: torch.Tensor, h: int) -> torch.Tensor:
    """``t`` as (rows, h) with unit stride along h."""
    t2 = t.reshape(-1, h)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(
    x: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor | None, eps: float, rms: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, or x itself without delta; the normalised row), each shaped like x."""
    h = x.shape[-1]
    x2 = _rows(x, h)  # (rows, h)
    d2 = _rows(delta, h) if delta is not None else x2
    sum_dtype = torch.promote_types(x.dtype, delta.dtype) if delta is not None else x.dtype
    total = torch.empty_like(x2, dtype=sum_dtype) if delta is not None else x2
    # LayerNorm returns x's dtype; RMSNorm the product's (x's dtype times the weight's, plus the bias's).
    out_dtype = sum_dtype
    if rms:
        out_dtype = torch.promote_types(sum_dtype, w.dtype)
        out_dtype = torch.promote_types(out_dtype, b.dtype) if b is not None else out_dtype
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    block = triton.next_power_of_2(h)
    _norm_kernel[(x2.shape[0],)](
        x2,
        d2,
        w,
        b if b is not None else w,  # never read without HAS_BIAS
        total,
        out,
        h,
        x2.stride(0),
        d2.stride(0),
        total.stride(0),
        out.stride(0),
        eps,
        delta is not None,
        b is not None,
        rms,
        block,
        num_warps=min(16, max(1, block // 256)),
    )
    return total.view(x.shape), out.view(x.shape)


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _launch(x, None, w.contiguous(), None if b is None else b.contiguous(), eps, rms=False)[1]


def rms_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _launch(x, None, w.contiguous(), None if b is None else b.contiguous(), eps, rms=True)[1]


def add_layer_norm(
    x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, delta, w.contiguous(), None if b is None else b.contiguous(), eps, rms=False)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, delta, w.contiguous(), None if b is None else b.contiguous(), eps, rms=True)


NORMS: dict[str, NormFn] = {"layernorm": layer_norm, "rmsnorm": rms_norm}
ADD_NORMS: dict[str, AddNormFn] = {"layernorm": add_layer_norm, "rmsnorm": add_rms_norm}
