"""Plain torch kernels: the source of truth for every fused-layer operation, and the path on a GPU.

Each function here is the oracle a tuned kernel (``kernels.cpu``, later Triton) is tested against. They
favour the obvious formulation over speed: no scratch buffers, no chunking, nothing written in place.
"""

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


NormFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]
NORMS: dict[str, NormFn] = {"layernorm": layer_norm, "rmsnorm": rms_norm}
#: x, delta, w, b, eps -> (x + delta, norm(x + delta)): a residual add and the norm after it, one kernel where
#: a set fuses them (a set may write the sum into delta, which callers pass fresh).
AddNormFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float], tuple[torch.Tensor, torch.Tensor]
]


def add_then(norm: NormFn) -> AddNormFn:
    """The add-norm of ``norm``: the sum, then ``norm`` of it."""

    def add_norm(
        x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        total = x + delta
        return total, norm(total, w, b, eps)

    return add_norm


ADD_NORMS: dict[str, AddNormFn] = {kind: add_then(norm) for kind, norm in NORMS.items()}


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "silu": F.silu,
}


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + b in x's dtype (a weight stored in another dtype is converted whole first)."""
    return F.linear(x, w.to(x.dtype), b)


# SDPA's grouped-query mode (torch >= 2.5); before it the KV heads are expanded to the query heads.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked attention with grouped heads.

    q: (b, nh, s, d); k, v: (b, nkv, t, d); mask: additive float (b, 1 or nh, s, t). Returns (b, nh, s, d).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and _SDPA_GQA:  # each KV head serves its group of query heads in place: no expanded copy
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def cached_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """``attention`` of q (b, nh, s, d) over a position-major cache: keys, values (t, b, nkv, d), in q's dtype."""
    k, v = keys.permute(1, 2, 0, 3).to(q.dtype), values.permute(1, 2, 0, 3).to(q.dtype)  # (b, nkv, t, d)
    return attention(q, k, v, mask, scale)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of each head of x (b, s, heads, d) by cos and sin (b, s, 1, rd);
    the rest pass through."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    if interleaved:
        pairs = rot.unflatten(-1, (rd // 2, 2))  # (b, nh, s, rd / 2, 2)
        turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    else:
        first, second = rot.chunk(2, dim=-1)
        turned = torch.cat([-second, first], dim=-1)
    return torch.cat([rot * cos + turned * sin, rest], dim=-1)
