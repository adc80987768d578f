"""A compressed KV cache format: each cached key (value) quantized per token and per KV head along
head_dim, as FlexGen does, int8 or int4, the new token's rows quantized as they are written.

A slot is (max_len, b, n_kv_head, head_bytes) uint8: each head's codes followed by its float16 scale
(and, for int4, its float16 low). Attention reads the prefix dequantized to float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexrun.errors import ConfigError
from flexrun.quant.formats import KINDS, fp16_scale


@dataclass(frozen=True)
class QuantKV:
    """Keys (values) quantized per (token, KV head): int4 asymmetric min-max, int8 symmetric."""

    kind: str
    n_kv_head: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"cache compression must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "int4" and self.head_dim % 2:
            raise ConfigError(f"int4 cache compression needs an even head_dim, got {self.head_dim}")

    dtype = torch.uint8  # the storage dtype the cache allocates in

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def code_bytes(self) -> int:
        return self.head_dim // 2 if self.kind == "int4" else self.head_dim

    @property
    def head_bytes(self) -> int:
        """Bytes of one head of one token: its codes, a float16 scale and, for int4, a float16 low."""
        return self.code_bytes + (4 if self.kind == "int4" else 2)

    def row_elems(self, batch: int) -> int:
        return batch * self.n_kv_head * self.head_bytes

    def row_bytes(self, batch: int) -> int:
        return self.row_elems(batch)

    def slot(self, flat: torch.Tensor, max_len: int, batch: int) -> torch.Tensor:
        return flat[: max_len * self.row_elems(batch)].view(max_len, batch, self.n_kv_head, self.head_bytes)

    def append(self, slot: torch.Tensor, start: int, new: torch.Tensor) -> None:
        """Quantize ``new`` (b, s, kv_dim) into rows [start, start + s)."""
        b, s = new.shape[:2]
        x = new.detach().float().view(b, s, self.n_kv_head, self.head_dim).transpose(0, 1)  # (s, b, nkv, d)
        rows = slot[start : start + s]  # (s, b, nkv, head_bytes)
        c = self.code_bytes
        if self.kind == "int4":
            low = x.amin(-1).to(torch.float16)  # (s, b, nkv)
            scale = fp16_scale((x.amax(-1) - low.float()) / 15)
            q = ((x - low.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
            q = q.view(s, b, self.n_kv_head, c, 2)
            rows[..., :c] = q[..., 0] | (q[..., 1] << 4)
            rows[..., c : c + 2] = scale[..., None].view(torch.uint8)
            rows[..., c + 2 :] = low[..., None].view(torch.uint8)
            return
        scale = fp16_scale(x.abs().amax(-1) / 127)
        q8 = (x / scale.float()[..., None]).round_().clamp_(-127, 127).to(torch.int8)
        rows[..., :c] = q8.view(torch.uint8)
        rows[..., c:] = scale[..., None].view(torch.uint8)

    def read(self, slot: torch.Tensor, length: int) -> torch.Tensor:
        """Rows [0, length) dequantized: (length, b, n_kv_head, head_dim) float32."""
        rows = slot[:length]
        c = self.code_bytes
        if self.kind == "int4":
            packed = rows[..., :c]
            q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2).float()  # (t, b, nkv, d)
            scale = rows[..., c : c + 2].contiguous().view(torch.float16).float()  # (t, b, nkv, 1)
            low = rows[..., c + 2 :].contiguous().view(torch.float16).float()
            return q.mul_(scale).add_(low)
        q8 = rows[..., :c].contiguous().view(torch.int8).float()
        scale = rows[..., c:].contiguous().view(torch.float16).float()
        return q8.mul_(scale)
