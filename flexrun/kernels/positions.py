"""Where each token sits: attention masks (causal, padding, local window), rotary angles and ALiBi biases.

The engine alone knows the positions, so it builds these once per micro-batch and step and hands them
to the fused layer; they are the same whichever kernel set computes the layer.
"""

from __future__ import annotations

import math

import torch


def additive_mask(valid: torch.Tensor, query_len: int, dtype: torch.dtype, window: int = 0) -> torch.Tensor:
    """An additive attention mask from key validity, causal over the last ``query_len`` keys.

    valid: bool (b, t), True where the key is a real token. Returns (b, 1, query_len, t) with 0 where
    attention is allowed and the dtype's most negative value elsewhere (not -inf, so that a fully masked
    row, a padding query, gives finite garbage instead of NaN). With ``window`` > 0 a query sees only the
    ``window`` most recent keys, itself included (local attention); padding is all on the left, so
    distances between real tokens are the same in buffer rows as in positions.
    """
    b, t = valid.shape
    past = t - query_len
    q_pos = torch.arange(past, t, device=valid.device).view(query_len, 1)
    k_pos = torch.arange(t, device=valid.device).view(1, t)
    causal = k_pos <= q_pos
    if window > 0:
        causal &= q_pos - k_pos < window
    allowed = causal.view(1, 1, query_len, t) & valid.view(b, 1, 1, t)
    mask = torch.zeros(b, 1, query_len, t, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def bidirectional_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """valid: bool (b, s). Returns an additive (b, 1, s, s) mask letting every query see every real key."""
    b, s = valid.shape
    mask = torch.zeros(b, 1, s, s, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~valid.view(b, 1, 1, s), torch.finfo(dtype).min)


def rotary_cos_sin(
    positions: torch.Tensor, dim: int, theta: float, interleaved: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for ``positions`` (b, s), each (b, 1, s, dim), computed in float32.

    Frequency j (of dim / 2) is theta^(-2j / dim). Interleaved style (GPT-J) rotates pairs (2j, 2j + 1),
    so each angle is repeated in place; half style (GPT-NeoX, LLaMA) rotates (j, j + dim / 2), so the
    angles are tiled.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq  # (b, s, dim / 2)
    angles = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): a geometric sequence from 2^(-8 / n) for the largest
    power of two n <= n_head, the remaining heads taking every other slope of the sequence for 2n."""
    n = 2 ** math.floor(math.log2(n_head))

    def geometric(count: int) -> list[float]:
        start = 2.0 ** (-8.0 / count)
        return [start ** (k + 1) for k in range(count)]

    slopes = geometric(n) + geometric(2 * n)[0::2][: n_head - n]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(key_positions: torch.Tensor, n_head: int, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi's additive bias, slope x key position: (b, nh, 1, t) from key_positions (b, t).

    Softmax ignores a constant per query, so biasing by the key's position equals biasing by the
    distance to the query. Positions are taken relative to the newest key, so the recent keys, which
    weigh most, get the smallest biases and keep their precision in float16.
    """
    slopes = alibi_slopes(n_head).to(key_positions.device)
    rel = key_positions - key_positions.max(dim=1, keepdim=True).values  # (b, t), <= 0
    return (slopes.view(1, n_head, 1, 1) * rel.float()[:, None, None, :]).to(dtype)
