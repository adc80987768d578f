"""The fused decoder layer: attention + MLP computed from named weight slots.

Every architecture's policy maps its Hugging Face layer onto these slots; the flags in ``LayerSpec``
(derived from the config for one layer index) select the variant: pre/post layer norm, sequential or
parallel attention and MLP, activation and gate, norm type, rotary embeddings, attention scale. The
attention mask (causal, padding, local window, ALiBi bias) and the rotary angles come from the engine,
which alone knows the positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexrun.config import OptConfig
from flexrun.kernels import reference as K


@dataclass
class LayerWeights:
    """One decoder layer's tensors by slot (Linear weights are [out, in]; qkv is [Q | K | V])."""

    ln1_w: torch.Tensor
    qkv_w: torch.Tensor
    out_w: torch.Tensor
    fc1_w: torch.Tensor
    fc2_w: torch.Tensor
    ln2_w: torch.Tensor | None = None  # absent when one norm feeds attention and MLP (GPT-J)
    ln1_b: torch.Tensor | None = None
    qkv_b: torch.Tensor | None = None
    out_b: torch.Tensor | None = None
    ln2_b: torch.Tensor | None = None
    fc1_b: torch.Tensor | None = None
    fc2_b: torch.Tensor | None = None
    gate_w: torch.Tensor | None = None
    gate_b: torch.Tensor | None = None

    @classmethod
    def from_slots(cls, slots: dict[str, torch.Tensor]) -> LayerWeights:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in slots.items() if k in names})


@dataclass(frozen=True)
class LayerSpec:
    """The flags and sizes the fused layer needs, derived once from the config for one layer."""

    n_head: int
    n_kv_head: int
    head_dim: int
    pre_norm: bool
    activation: str
    norm: str
    eps: float
    gated_mlp: bool
    scale: float
    parallel_attn: bool = False
    shared_norm: bool = False
    rotary: bool = False
    rotary_interleaved: bool = False
    window: int = 0  # local attention window in tokens; 0 = global

    @classmethod
    def from_config(cls, cfg: OptConfig, layer: int = 0) -> LayerSpec:
        return cls(
            n_head=cfg.n_head,
            n_kv_head=cfg.n_kv_head,
            head_dim=cfg.head_dim,
            pre_norm=cfg.do_layer_norm_before,
            activation=cfg.activation,
            norm=cfg.norm,
            eps=cfg.layer_norm_eps,
            gated_mlp=cfg.gated_mlp,
            scale=cfg.attention_scale(layer),
            parallel_attn=cfg.parallel_attn,
            shared_norm=cfg.shared_norm,
            rotary=cfg.position == "rotary",
            rotary_interleaved=cfg.rotary_interleaved,
            window=cfg.attention_window(layer),
        )


Rotary = tuple[torch.Tensor, torch.Tensor]

# Attention over the cache, given the new tokens' queries (b, nh, s, d) and their keys and values
# (b, s, kv_dim), keys already rotated: caches the new keys and values and returns (b, nh, s, d). The
# engine supplies it, so one layer call can span micro-batches whose caches live in different buffers.
AttentionCore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class FusedLayer:
    """Computes one decoder layer, appending to position-major KV buffers through an ``AttentionCore``.

    The KV buffers are (max_len, b, kv_dim): row t holds every sequence's key (value) at position t, so
    appending a token is one contiguous write, in memory and on disk alike. Keys are cached after the
    rotary rotation, so cached keys never need their positions again.
    """

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec
        self._norm = K.NORMS[spec.norm]
        self._act_ = K.ACTIVATIONS[spec.activation]

    def __call__(
        self, w: LayerWeights, x: torch.Tensor, core: AttentionCore, rotary: Rotary | None = None
    ) -> torch.Tensor:
        """x: (b, s, h); rotary: cos and sin (b, 1, s, rotary_dim) of the new tokens' positions. Returns (b, s, h)."""
        sp = self.spec
        if sp.parallel_attn:
            # GPT-J: one norm feeds both branches; GPT-NeoX: ln1 feeds attention, ln2 the MLP.
            attn_in = self._norm(x, w.ln1_w, w.ln1_b, sp.eps)
            mlp_in = attn_in if sp.shared_norm else self._norm2(w, x)
            return x + self._attention(w, attn_in, core, rotary) + self._mlp(w, mlp_in)
        if not sp.pre_norm:  # post-LN: normalise after each residual add
            x = self._norm(x + self._attention(w, x, core, rotary), w.ln1_w, w.ln1_b, sp.eps)
            return self._norm2(w, x + self._mlp(w, x))
        x = x + self._attention(w, self._norm(x, w.ln1_w, w.ln1_b, sp.eps), core, rotary)
        return x + self._mlp(w, self._norm2(w, x))

    def cached_core(self, k_buf: torch.Tensor, v_buf: torch.Tensor, past: int, mask: torch.Tensor) -> AttentionCore:
        """The core for one micro-batch: k_buf/v_buf (>= past + s, b, kv_dim) with rows [0, past) filled,
        into whose rows [past, past + s) the new keys and values go; mask: additive, (b, 1 or nh, s, past + s)."""
        sp = self.spec

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            b, s = k.shape[:2]
            t = past + s
            k_buf[past:t].copy_(k.transpose(0, 1))  # (s, b, kv_dim)
            v_buf[past:t].copy_(v.transpose(0, 1))
            # The cache may be kept in the stored dtype while attention runs in the compute dtype.
            keys = k_buf[:t].view(t, b, sp.n_kv_head, sp.head_dim)  # (t, b, nkv, d)
            values = v_buf[:t].view(t, b, sp.n_kv_head, sp.head_dim)
            return K.cached_attention(q, keys, values, mask, sp.scale)

        return core

    def _norm2(self, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        assert w.ln2_w is not None, "this layer has no second norm"
        return self._norm(x, w.ln2_w, w.ln2_b, self.spec.eps)

    def _attention(self, w: LayerWeights, hs: torch.Tensor, core: AttentionCore, rotary: Rotary | None) -> torch.Tensor:
        sp = self.spec
        b, s, h = hs.shape
        qkv = K.linear(hs, w.qkv_w, w.qkv_b)  # (b, s, h + 2 * kv_dim)
        kv_dim = sp.n_kv_head * sp.head_dim
        q, k, v = qkv.split([sp.n_head * sp.head_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(b, s, sp.n_head, sp.head_dim).transpose(1, 2)  # (b, nh, s, d)
        if sp.rotary:
            assert rotary is not None, "a rotary layer needs the rotary angles"
            cos, sin = rotary
            q = K.apply_rotary(q, cos, sin, sp.rotary_interleaved)
            k4 = k.view(b, s, sp.n_kv_head, sp.head_dim).transpose(1, 2)  # (b, nkv, s, d)
            k = K.apply_rotary(k4, cos, sin, sp.rotary_interleaved).transpose(1, 2).reshape(b, s, kv_dim)
        attn = core(q, k, v)  # (b, nh, s, d)
        return K.linear(attn.transpose(1, 2).reshape(b, s, h), w.out_w, w.out_b)  # (b, s, h)

    def _mlp(self, w: LayerWeights, hs: torch.Tensor) -> torch.Tensor:
        up = K.linear(hs, w.fc1_w, w.fc1_b)  # (b, s, ffn)
        if self.spec.gated_mlp:
            assert w.gate_w is not None
            up = self._act_(K.linear(hs, w.gate_w, w.gate_b)).mul_(up)
        else:
            up = self._act_(up)
        return K.linear(up, w.fc2_w, w.fc2_b)  # (b, s, h)
