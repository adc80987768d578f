"""How the KV cache stores keys and values: the format object a ``KVCache`` holds and the layer writes through.

A format decides the bytes a cached position takes, how new keys (values) are appended to a slot, and the
view attention reads. The cache moves a slot's rows between tiers as bytes and never looks inside them,
so a compressed format (quantized rows with their scales) plugs in without the cache or the layer changing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from flexrun.quant.kv import QuantKV


class KVFormat(Protocol):
    """What a KV cache format provides: the cache allocates and moves ``row_bytes`` per position, the
    layer appends through ``append`` and attention reads through ``read``."""

    @property
    def dtype(self) -> torch.dtype: ...  # the storage dtype slots are allocated in

    def row_elems(self, batch: int) -> int: ...

    def row_bytes(self, batch: int) -> int: ...

    def slot(self, flat: torch.Tensor, max_len: int, batch: int) -> torch.Tensor: ...

    def append(self, slot: torch.Tensor, start: int, new: torch.Tensor) -> None: ...

    def read(self, slot: torch.Tensor, length: int) -> torch.Tensor: ...


def kv_format(dtype: torch.dtype, n_kv_head: int, head_dim: int, compress: str = "") -> KVFormat:
    """The cache format: keys and values as they are in ``dtype``, or compressed (``int8``/``int4``)."""
    if compress:
        return QuantKV(compress, n_kv_head, head_dim)
    return PlainKV(dtype, n_kv_head, head_dim)


@dataclass(frozen=True)
class PlainKV:
    """Keys (values) as they are, in the storage dtype, position-major: a slot is (max_len, b, kv_dim)."""

    dtype: torch.dtype
    n_kv_head: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    def row_elems(self, batch: int) -> int:
        """Elements of one position's row for ``batch`` sequences."""
        return batch * self.kv_dim

    def row_bytes(self, batch: int) -> int:
        return self.row_elems(batch) * self.dtype.itemsize

    def slot(self, flat: torch.Tensor, max_len: int, batch: int) -> torch.Tensor:
        """A flat buffer of this format's dtype as a slot of ``max_len`` rows for ``batch`` sequences."""
        return flat[: max_len * self.row_elems(batch)].view(max_len, batch, self.kv_dim)

    def append(self, slot: torch.Tensor, start: int, new: torch.Tensor) -> None:
        """Write ``new`` (b, s, kv_dim) into rows [start, start + s)."""
        slot[start : start + new.shape[1]].copy_(new.transpose(0, 1))  # (s, b, kv_dim)

    def read(self, slot: torch.Tensor, length: int) -> torch.Tensor:
        """Rows [0, length) as attention reads them: (length, b, n_kv_head, head_dim)."""
        return slot[:length].view(length, slot.shape[1], self.n_kv_head, self.head_dim)
