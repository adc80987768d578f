"""llama.cpp's quantized blocks as flexrun's compressed weights, read without a float32 copy.

Each supported GGML type maps onto a ``flexrun.quant`` format with groups of 32 along K, the input
dimension of a GGUF matrix row (value = q * scale + low for int4, q * scale for int8):

- ``Q4_0`` (18 bytes: float16 d, 16 bytes of codes): value = (q - 8) * d, so scale = d, low = -8 d.
- ``Q4_1`` (20 bytes: float16 d and m, codes): value = q * d + m, so scale = d, low = m.
- ``Q4_K`` (144 bytes per 256 values: float16 d and dmin, twelve bytes of 6-bit sub-block scales and mins,
  codes): in each sub-block of 32, value = q * (d * sc) - dmin * m. flexrun keeps scales in float16, so
  ``d * sc`` and ``dmin * m`` are rounded to float16: each value is within 2^-11 of
  ``|q * d * sc| + |dmin * m|`` of the file's (a small fraction of a quantization step); the codes are the
  file's.
- ``Q8_0`` (34 bytes: float16 d, 32 signed codes): value = q * d, int8 with groups of 32.

Q4_0/Q4_1/Q8_0 dequantize to exactly the float32 values gguf's own dequantizer gives. A block's 32 codes
are stored as its first 16 in the low nibbles and its last 16 in the high nibbles (Q4_K: per 64 values,
the first 32 low and the next 32 high); the canonical int4 form puts even columns in the low nibble, so
codes are repacked, an integer shuffle.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from flexrun.quant.formats import Int4Weight, Int8Weight, QuantSpec, QuantWeight

GROUP = 32
# GGML type name -> the flexrun spec its blocks map onto.
SPECS = {
    "Q4_0": QuantSpec("int4", GROUP),
    "Q4_1": QuantSpec("int4", GROUP),
    "Q4_K": QuantSpec("int4", GROUP),
    "Q8_0": QuantSpec("int8", GROUP),
}
_BLOCK_BYTES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q8_0": (32, 34)}


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 -> (...) float16."""
    return raw.contiguous().view(torch.float16).squeeze(-1)


def _pack_even_odd(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) bytes, even columns in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def _split_nibbles(qs: torch.Tensor, n: int) -> torch.Tensor:
    """(N, blocks, run) bytes whose low nibbles hold a run of codes and high nibbles the next -> (N, K)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, -1)


def _q4_0(blocks: torch.Tensor, n: int) -> Int4Weight:
    d = _f16(blocks[..., 0:2])  # (N, groups)
    codes = _split_nibbles(blocks[..., 2:18], n)
    return Int4Weight(_pack_even_odd(codes), d.clone(), (d * -8).to(torch.float16), GROUP)


def _q4_1(blocks: torch.Tensor, n: int) -> Int4Weight:
    d, m = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    codes = _split_nibbles(blocks[..., 4:20], n)
    return Int4Weight(_pack_even_odd(codes), d.clone(), m.clone(), GROUP)


def _q4_k(blocks: torch.Tensor, n: int) -> Int4Weight:
    from gguf.quants import Q4_K

    supers = blocks.shape[1]
    d, dmin = _f16(blocks[..., 0:2]).float(), _f16(blocks[..., 2:4]).float()  # (N, supers)
    sc, mins = Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12).numpy())  # (N * supers, 8) each
    sc_t = torch.from_numpy(np.ascontiguousarray(sc)).float().view(n, supers, 8)
    mins_t = torch.from_numpy(np.ascontiguousarray(mins)).float().view(n, supers, 8)
    scale = (d[..., None] * sc_t).view(n, -1).to(torch.float16)
    low = (-(dmin[..., None] * mins_t)).view(n, -1).to(torch.float16)
    qs = blocks[..., 16:144].reshape(n, supers * 4, 32)  # per 64 values: 32 bytes, low nibbles first
    return Int4Weight(_pack_even_odd(_split_nibbles(qs, n)), scale, low, GROUP)


def _q8_0(blocks: torch.Tensor, n: int) -> Int8Weight:
    d = _f16(blocks[..., 0:2])
    q = blocks[..., 2:34].contiguous().view(torch.int8).reshape(n, -1)
    return Int8Weight(q, d.clone(), GROUP)


_DECODERS: dict[str, Callable[[torch.Tensor, int], QuantWeight]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q4_K": _q4_k,
    "Q8_0": _q8_0,
}


def to_quant(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantWeight | None:
    """The [N, K] matrix whose GGUF blocks are ``data`` ((N, bytes per row) uint8, as GGUFReader gives it)
    as a compressed weight, or None when ``type_name`` has no exact counterpart."""
    if type_name not in _DECODERS:
        return None
    n, k = shape
    values, size = _BLOCK_BYTES[type_name]
    if k % values or data.shape != (n, k // values * size):
        return None
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8)).view(n, k // values, size)
    return _DECODERS[type_name](blocks, n)
