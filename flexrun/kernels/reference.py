"""Plain torch kernels: the source of truth for every fused-layer operation, and the CPU path."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def rms_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    # Computed in float32 like the reference implementations, then cast back.
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w
    return out if b is None else out + b


NORMS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]] = {
    "layernorm": layer_norm,
    "rmsnorm": rms_norm,
}


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "silu": F.silu,
}


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Masked attention with grouped heads.

    q: (b, nh, s, d); k, v: (b, nkv, t, d); mask: additive float (b, 1, s, t). Returns (b, nh, s, d).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def additive_mask(valid: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """An additive attention mask from key validity, causal over the last ``query_len`` keys.

    valid: bool (b, t), True where the key is a real token. Returns (b, 1, query_len, t) with 0 where
    attention is allowed and the dtype's most negative value elsewhere (not -inf, so that a fully masked
    row, a padding query, gives finite garbage instead of NaN).
    """
    b, t = valid.shape
    past = t - query_len
    q_pos = torch.arange(past, t, device=valid.device).view(query_len, 1)
    k_pos = torch.arange(t, device=valid.device).view(1, t)
    allowed = (k_pos <= q_pos).view(1, 1, query_len, t) & valid.view(b, 1, 1, t)
    mask = torch.zeros(b, 1, query_len, t, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
