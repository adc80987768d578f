"""Where each token sits: attention masks (causal, padding, local window), rotary angles and ALiBi biases.

The engine alone knows the positions, so it builds these once per micro-batch and step and hands them
to the fused layer; they are the same whichever kernel set computes the layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flexrun.config import OptConfig
from flexrun.errors import ConfigError


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
    positions: torch.Tensor,
    dim: int,
    theta: float,
    interleaved: bool,
    dtype: torch.dtype,
    *,
    inv_freq: torch.Tensor | None = None,
    attention_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for ``positions`` (b, s), each (b, 1, s, dim), computed in float32.

    Frequency j (of dim / 2) is theta^(-2j / dim), unless ``inv_freq`` gives them: (dim / 2,), or
    (b, dim / 2) for frequencies that differ by sequence. ``attention_factor`` scales cos and sin (yarn,
    longrope). Interleaved style (GPT-J) rotates pairs (2j, 2j + 1), so each angle is repeated in place; half
    style (GPT-NeoX, LLaMA) rotates (j, j + dim / 2), so the angles are tiled.
    """
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    inv_freq = inv_freq.to(positions.device, torch.float32)
    if inv_freq.dim() == 2:
        inv_freq = inv_freq[:, None, :]  # (b, 1, dim / 2)
    angles = positions.float()[..., None] * inv_freq  # (b, s, dim / 2)
    angles = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


class Rope:
    """A config's rotary frequencies, computed once per engine: theta^(-2j / dim) for the plain rotation,
    transformers' own functions (``ROPE_INIT_FUNCTIONS``: linear, dynamic, yarn, llama3, longrope) for a
    scaled one, with the attention factor they return.

    "dynamic" and "longrope" frequencies depend on the sequence's length. transformers recomputes them at
    every forward from the batch's longest position (keys cached earlier keep their rotation) and keeps the
    longest length seen across calls; here each sequence gets, at every step, what transformers computes for
    it alone in a fresh model: the initial frequencies up to the threshold (max_position_embeddings for
    dynamic, original_max_position_embeddings for longrope), then those of its current length. A
    sequence's result so never depends on what it is batched with. Computed once per length.
    """

    def __init__(self, cfg: OptConfig) -> None:
        self.dim, self.theta, self.interleaved = cfg.rotary_dim, cfg.rope_theta, cfg.rotary_interleaved
        self.rope_type = cfg.rope_type
        self._hf: Any = _hf_rope_config(cfg) if cfg.rope_scaling else None
        self.inv_freq, self.attention_factor = self._frequencies(None)
        # Lengths up to this one run on the initial frequencies; 0: every length does.
        self._threshold = _trained_positions(cfg) if self.rope_type in ("dynamic", "longrope") else 0
        self._by_length: dict[int, torch.Tensor] = {}
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _frequencies(self, seq_len: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """inv_freq (dim / 2,) float32 on the CPU, and the factor cos and sin are scaled by. ``seq_len`` is a
        tensor, as transformers passes it (its arithmetic then runs in float32, as there)."""
        if self._hf is None:
            return 1.0 / self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, factor = ROPE_INIT_FUNCTIONS[self.rope_type](self._hf, None, seq_len)
        if inv_freq.shape != (self.dim // 2,):
            raise ConfigError(
                f"transformers' {self.rope_type} rope gave {tuple(inv_freq.shape)} frequencies for {self.dim} rotary dims"
            )
        return inv_freq.float(), float(factor)

    def _for_length(self, n: int) -> torch.Tensor:
        if n <= self._threshold:
            return self.inv_freq
        if n not in self._by_length:
            self._by_length[n] = self._frequencies(torch.tensor(n))[0]
        return self._by_length[n]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``rotary_cos_sin`` of ``positions`` (b, s), the newest tokens of each sequence, left-padded (padding
        at position -1), so that a row's last position + 1 is its length so far."""
        if not self._threshold:
            # One frequency set for every length: rows of a table of every position so far, each row the
            # same float32 values as computing it alone. Padding (-1) reads row 0; it is never attended to.
            cos, sin = self._table(int(positions.max()) + 1, positions.device, dtype)
            at = positions.clamp(min=0)
            return cos[at][:, None], sin[at][:, None]
        lengths = (positions[:, -1] + 1).tolist()
        inv_freq = torch.stack([self._for_length(int(n)) for n in lengths])  # (b, dim / 2)
        return rotary_cos_sin(
            positions,
            self.dim,
            self.theta,
            self.interleaved,
            dtype,
            inv_freq=inv_freq,
            attention_factor=self.attention_factor,
        )

    def _table(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (>= n, dim) of positions 0, 1, ..., in ``dtype``; grown by doubling, kept per device and dtype."""
        table = self._tables.get((device, dtype))
        if table is None or table[0].shape[0] < n:
            size = max(n, 256, 2 * table[0].shape[0] if table is not None else 0)
            positions = torch.arange(size, device=device)[None]  # (1, size)
            inv_freq = self.inv_freq.to(device)
            cos, sin = rotary_cos_sin(
                positions,
                self.dim,
                self.theta,
                self.interleaved,
                dtype,
                inv_freq=inv_freq,
                attention_factor=self.attention_factor,
            )
            table = self._tables[(device, dtype)] = (cos[0, 0], sin[0, 0])  # (size, dim)
        return table


def _hf_rope_config(cfg: OptConfig) -> Any:
    """The config transformers' rope functions read: they take only the rope parameters, head_dim,
    hidden_size, num_attention_heads and max_position_embeddings from it, so a LlamaConfig carries them
    for every family."""
    from transformers import LlamaConfig

    params = cfg.rope_parameters
    max_positions = cfg.max_seq_len
    if cfg.rope_type == "dynamic":
        # flexrun's max_seq_len is the context dynamic scaling extends to; transformers scales from the
        # trained one, its max_position_embeddings.
        max_positions = _trained_positions(cfg)
        params.pop("original_max_position_embeddings", None)
    # rope_theta and rope_scaling, as transformers 4 spells them; transformers 5 reads them into rope_parameters.
    fields: dict[str, Any] = dict(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.n_head,
        head_dim=cfg.head_dim,
        max_position_embeddings=max_positions,
        rope_theta=cfg.rope_theta,
        rope_scaling=params,
    )
    if cfg.rotary_dim != cfg.head_dim:
        fields["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
    return LlamaConfig(**fields)


def _trained_positions(cfg: OptConfig) -> int:
    """The context the model was trained for: original_max_position_embeddings, else max_seq_len."""
    return int(cfg.rope_parameters.get("original_max_position_embeddings", cfg.max_seq_len))


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
