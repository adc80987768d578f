"""Triton decode attention over the position-major KV cache, split over the sequence (flash-decoding).

The cache is what ``runtime.kvformat`` keeps: keys and values (t, b, nkv, d), either as they are (any float
dtype) or compressed by ``quant.kv.QuantKV`` (per token and KV head, int8 codes with a float16 scale or
int4 codes with a float16 scale and low, in one uint8 row of ``head_bytes`` per head), read and dequantized
in the kernel, so a compressed cache crosses memory at its compressed size.

One program takes one (sequence, KV head) and one split of the positions, with all the query rows that head
serves (its group of query heads times the new tokens): the split's keys and values are read once for the
whole group. It keeps a running max and sum of the softmax (float32) and writes its unnormalised partial
output; a second kernel rescales the splits' partials to their common max and normalises. Scores are
q . k * scale + the additive mask (b, 1 or nh, s, t), as ``kernels.reference.cached_attention`` computes
them, which is the oracle (``tests/test_triton_kernels.py``).

Importing this module imports Triton: ``kernels.select_kernels`` imports it only for a CUDA device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from flexrun.kernels import reference
from flexrun.quant.kv import QuantKV

# Up to this many new tokens a step (decode, or a short continuation) the split kernel runs; a prompt's
# prefill goes to the reference (SDPA's own fused kernels on a GPU).
DECODE_MAX_QUERIES = 16
_BLOCK_T = 32  # positions per step of a program's loop
# Splits are chosen to give about this many programs (twice an H100's 132 SMs; unmeasured), each split
# at least this many positions long.
_TARGET_PROGRAMS = 264
_MIN_SPLIT = 256
_KV_KINDS = {"plain": 0, "int8": 1, "int4": 2}


@triton.jit
def _fp16_at(ptr, ok):
    """The float16 whose two little-endian bytes start at ``ptr`` (uint8), as float32; 0 where not ``ok``."""
    lo = tl.load(ptr, mask=ok, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=ok, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _kv_tile(ptr, row, rt, rd, t_ok, D, stride_t, CODE_BYTES: tl.constexpr, KIND: tl.constexpr, DTYPE: tl.constexpr):
    """Keys (values) of positions ``rt`` x dims ``rd`` at ``ptr + row`` (one sequence's KV head), in DTYPE;
    0 outside. KIND 0: as stored; 1: int8 codes then a float16 scale; 2: int4 codes then scale and low."""
    inside = t_ok[:, None] & (rd < D)[None, :]
    base = ptr + row + rt * stride_t  # (T,) start of each position's row
    if KIND == 0:  # one return, after the branches: no early return for the compiler to fold
        tile = tl.load(base[:, None] + rd[None, :], mask=inside, other=0.0).to(DTYPE)
    else:
        scale = _fp16_at(base + CODE_BYTES, t_ok)  # (T,)
        if KIND == 1:
            q = tl.load(base[:, None] + rd[None, :], mask=inside, other=0).to(tl.int8, bitcast=True)
            value = q.to(tl.float32) * scale[:, None]
        else:
            byte = tl.load(base[:, None] + (rd // 2)[None, :], mask=inside, other=0).to(tl.int32)
            code = (byte >> ((rd % 2) * 4)[None, :]) & 0xF  # even dim: low nibble
            value = code.to(tl.float32) * scale[:, None] + _fp16_at(base + CODE_BYTES + 2, t_ok)[:, None]
        tile = tl.where(inside, value, 0.0).to(DTYPE)
    return tile


@triton.jit
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    acc_ptr,
    m_ptr,
    l_ptr,
    T,
    NKV,
    split_len,
    scale,
    sq_b,
    sq_h,
    sq_s,
    sk_t,
    sk_b,
    sk_h,
    sv_t,
    sv_b,
    sv_h,
    sm_b,
    sm_h,
    sm_s,
    S: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    CODE_BYTES: tl.constexpr,
    KIND: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    bi = (pid // NKV).to(tl.int64)  # 64-bit offsets: a long cache of a large block passes 2**31 elements
    kh = pid % NKV
    rows = tl.arange(0, BLOCK_R)  # query row r = (head within the group) * S + token
    row_ok = rows < GROUP * S
    head = kh * GROUP + rows // S
    tok = rows % S
    rd = tl.arange(0, BLOCK_D)
    q_off = bi * sq_b + head * sq_h + tok * sq_s
    q = tl.load(q_ptr + q_off[:, None] + rd[None, :], mask=row_ok[:, None] & (rd < D)[None, :], other=0.0)
    m_row = mask_ptr + bi * sm_b + head * sm_h + tok * sm_s  # (R,) each row's mask, position 0
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, T)
    for t0 in range(start, end, BLOCK_T):
        rt = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_ok = rt < end
        k = _kv_tile(k_ptr, bi * sk_b + kh * sk_h, rt, rd, t_ok, D, sk_t, CODE_BYTES, KIND, q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (R, T)
        s += tl.load(m_row[:, None] + rt[None, :], mask=row_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked out so far: no NaN from -inf - -inf
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _kv_tile(v_ptr, bi * sv_b + kh * sv_h, rt, rd, t_ok, D, sv_t, CODE_BYTES, KIND, q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
        m_i = m_new
    part = (pid * n_splits + split) * (GROUP * S) + rows  # (R,) row of the partials
    tl.store(acc_ptr + part[:, None] * D + rd[None, :], acc, mask=row_ok[:, None] & (rd < D)[None, :])
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)


@triton.jit
def _reduce_kernel(
    acc_ptr,
    m_ptr,
    l_ptr,
    out_ptr,
    n_splits,
    NKV,
    so_b,
    so_h,
    so_s,
    S: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The splits' partials of one (sequence, KV head) rescaled to their common max and normalised."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_R)
    row_ok = rows < GROUP * S
    rd = tl.arange(0, BLOCK_D)
    inside = row_ok[:, None] & (rd < D)[None, :]
    m_all = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for sp in range(0, n_splits):
        part = (pid * n_splits + sp) * (GROUP * S) + rows
        m_all = tl.maximum(m_all, tl.load(m_ptr + part, mask=row_ok, other=float("-inf")))
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    l_all = tl.zeros((BLOCK_R,), tl.float32)
    for sp in range(0, n_splits):
        part = (pid * n_splits + sp) * (GROUP * S) + rows
        weight = tl.exp(tl.load(m_ptr + part, mask=row_ok, other=float("-inf")) - m_all)
        l_all += weight * tl.load(l_ptr + part, mask=row_ok, other=0.0)
        acc += weight[:, None] * tl.load(acc_ptr + part[:, None] * D + rd[None, :], mask=inside, other=0.0)
    bi = pid // NKV
    head = (pid % NKV) * GROUP + rows // S
    o_off = bi * so_b + head * so_h + (rows % S) * so_s
    l_all = tl.where(row_ok, l_all, 1.0)  # padding rows of the tile: never stored, kept finite
    tl.store(out_ptr + o_off[:, None] + rd[None, :], (acc / l_all[:, None]).to(out_ptr.dtype.element_ty), mask=inside)


def choose_splits(length: int, programs: int) -> int:
    """Splits of ``length`` positions for ``programs`` (sequence, KV head) pairs: enough programs to fill
    the device, none shorter than ``_MIN_SPLIT`` positions."""
    return max(1, min(triton.cdiv(_TARGET_PROGRAMS, programs), triton.cdiv(length, _MIN_SPLIT)))


def _attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    length: int,
    mask: torch.Tensor,
    scale: float,
    kind: str,
    code_bytes: int,
    head_dim: int,
    splits: int | None,
) -> torch.Tensor:
    """q (b, nh, s, d) over ``length`` positions of keys, values (t, b, nkv, d or head_bytes) -> (b, nh, s, d)."""
    b, nh, s, d = q.shape
    nkv = keys.shape[2]
    group = nh // nkv
    assert keys.stride(-1) == 1 and values.stride(-1) == 1 and q.stride(-1) == 1 and mask.stride(-1) == 1
    # Each split a whole number of blocks; the last one shorter, none empty.
    want = splits or choose_splits(length, b * nkv)
    split_len = triton.cdiv(triton.cdiv(length, want), _BLOCK_T) * _BLOCK_T
    n_splits = triton.cdiv(length, split_len)
    rows = group * s
    acc = torch.empty(b * nkv * n_splits * rows, d, dtype=torch.float32, device=q.device)
    m = torch.empty(b * nkv * n_splits * rows, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    block_r = max(16, triton.next_power_of_2(rows))  # tl.dot's smallest tile is 16
    block_d = max(16, triton.next_power_of_2(d))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # float32 products as float32, not TF32
    mh_stride = mask.stride(1) if mask.shape[1] > 1 else 0  # one mask row for all heads
    _split_kernel[(b * nkv, n_splits)](
        q,
        keys,
        values,
        mask,
        acc,
        m,
        l,
        length,
        nkv,
        split_len,
        scale,
        *q.stride()[:3],
        *keys.stride()[:3],
        *values.stride()[:3],
        mask.stride(0),
        mh_stride,
        mask.stride(2),
        s,
        group,
        head_dim,
        code_bytes,
        _KV_KINDS[kind],
        precision,
        block_r,
        block_d,
        _BLOCK_T,
    )
    out = torch.empty(b, nh, s, d, dtype=q.dtype, device=q.device)
    _reduce_kernel[(b * nkv,)](acc, m, l, out, n_splits, nkv, *out.stride()[:3], s, group, d, block_r, block_d)
    return out


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def cached_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """``reference.cached_attention``: q (b, nh, s, d) over keys, values (t, b, nkv, d) with an additive mask
    (b, 1 or nh, s, t); the split kernel for up to ``DECODE_MAX_QUERIES`` new tokens, else the reference."""
    if q.shape[2] > DECODE_MAX_QUERIES:
        return reference.cached_attention(q, keys, values, mask, scale)
    q, keys, values, mask = (_unit_last(t) for t in (q, keys, values, mask))
    return _attend(q, keys, values, keys.shape[0], mask, scale, "plain", 0, q.shape[-1], splits)


def quant_cache_attention(
    fmt: QuantKV,
    q: torch.Tensor,
    k_slot: torch.Tensor,
    v_slot: torch.Tensor,
    length: int,
    mask: torch.Tensor,
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention over rows [0, length) of ``fmt``'s slots (max_len, b, nkv, head_bytes) uint8, dequantized in
    the kernel: ``reference.cached_attention`` over ``fmt.read`` of them, without the float32 copy."""
    if q.shape[2] > DECODE_MAX_QUERIES:
        return reference.cached_attention(q, fmt.read(k_slot, length), fmt.read(v_slot, length), mask, scale)
    q, mask = _unit_last(q), _unit_last(mask)
    return _attend(q, k_slot, v_slot, length, mask, scale, fmt.kind, fmt.code_bytes, fmt.head_dim, splits)


CACHE_ATTENTIONS: dict[type, Callable[..., torch.Tensor]] = {QuantKV: quant_cache_attention}
