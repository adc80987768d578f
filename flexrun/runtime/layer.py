"""The fused decoder layer: attention + MLP computed from named weight slots.

Every architecture's policy maps its Hugging Face layer onto these slots; the flags in ``LayerSpec``
(derived from the config) select the variant: pre/post layer norm, activation, norm type.
"""

from __future__ import annotations

import dataclasses
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
    ln2_w: torch.Tensor
    fc1_w: torch.Tensor
    fc2_w: torch.Tensor
    ln1_b: torch.Tensor | None = None
    qkv_b: torch.Tensor | None = None
    out_b: torch.Tensor | None = None
    ln2_b: torch.Tensor | None = None
    fc1_b: torch.Tensor | None = None
    fc2_b: torch.Tensor | None = None
    gate_w: torch.Tensor | None = None

    @classmethod
    def from_slots(cls, slots: dict[str, torch.Tensor]) -> LayerWeights:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in slots.items() if k in names})


@dataclass(frozen=True)
class LayerSpec:
    """The flags and sizes the fused layer needs, derived once from the config."""

    n_head: int
    n_kv_head: int
    head_dim: int
    pre_norm: bool
    activation: str
    norm: str
    eps: float
    gated_mlp: bool
    scale: float

    @classmethod
    def from_config(cls, cfg: OptConfig) -> LayerSpec:
        return cls(
            n_head=cfg.n_head,
            n_kv_head=cfg.n_kv_head,
            head_dim=cfg.head_dim,
            pre_norm=cfg.do_layer_norm_before,
            activation=cfg.activation,
            norm=cfg.norm,
            eps=cfg.layer_norm_eps,
            gated_mlp=cfg.gated_mlp,
            scale=cfg.head_dim**-0.5,
        )


class FusedLayer:
    """Computes one decoder layer for one micro-batch, appending to a position-major KV buffer.

    The KV buffers are (max_len, b, kv_dim): row t holds every sequence's key (value) at position t, so
    appending a token is one contiguous write, in memory and on disk alike.
    """

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec
        self._norm = K.NORMS[spec.norm]
        self._act = K.ACTIVATIONS[spec.activation]

    def __call__(
        self,
        w: LayerWeights,
        x: torch.Tensor,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        past: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """x: (b, s, h); k_buf/v_buf: (>= past + s, b, kv_dim) with rows [0, past) filled; mask: (b, 1, s, past + s).

        Writes the new keys and values into rows [past, past + s) of the buffers and returns (b, s, h).
        """
        sp = self.spec
        b, s, h = x.shape
        t = past + s
        residual = x
        hs = self._norm(x, w.ln1_w, w.ln1_b, sp.eps) if sp.pre_norm else x
        qkv = K.linear(hs, w.qkv_w, w.qkv_b)  # (b, s, h + 2 * kv_dim)
        kv_dim = sp.n_kv_head * sp.head_dim
        q, k, v = qkv.split([sp.n_head * sp.head_dim, kv_dim, kv_dim], dim=-1)
        k_buf[past:t].copy_(k.transpose(0, 1))  # (s, b, kv_dim)
        v_buf[past:t].copy_(v.transpose(0, 1))
        q = q.view(b, s, sp.n_head, sp.head_dim).transpose(1, 2)  # (b, nh, s, d)
        keys = k_buf[:t].view(t, b, sp.n_kv_head, sp.head_dim).permute(1, 2, 0, 3)  # (b, nkv, t, d)
        values = v_buf[:t].view(t, b, sp.n_kv_head, sp.head_dim).permute(1, 2, 0, 3)
        attn = K.attention(q, keys, values, mask, sp.scale)  # (b, nh, s, d)
        attn = attn.transpose(1, 2).reshape(b, s, h)
        x = residual + K.linear(attn, w.out_w, w.out_b)
        if not sp.pre_norm:
            x = self._norm(x, w.ln1_w, w.ln1_b, sp.eps)

        residual = x
        hs = self._norm(x, w.ln2_w, w.ln2_b, sp.eps) if sp.pre_norm else x
        up = K.linear(hs, w.fc1_w, w.fc1_b)  # (b, s, ffn)
        if sp.gated_mlp:
            assert w.gate_w is not None
            up = self._act(K.linear(hs, w.gate_w, None)) * up
        else:
            up = self._act(up)
        x = residual + K.linear(up, w.fc2_w, w.fc2_b)
        if not sp.pre_norm:
            x = self._norm(x, w.ln2_w, w.ln2_b, sp.eps)
        return x
