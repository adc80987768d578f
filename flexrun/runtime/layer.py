"""The fused decoder layer: attention + MLP computed from named weight slots, with a chosen kernel set.

Every architecture's policy maps its Hugging Face layer onto these slots; the flags in ``LayerSpec``
(derived from the config for one layer index) select the variant: pre/post layer norm, sequential or
parallel attention and MLP, activation and gate, norm type, rotary embeddings, attention scale. The
attention mask (causal, padding, local window, ALiBi bias) and the rotary angles come from the engine,
which alone knows the positions. The layer never names a kernel or a weight format: matmuls go through
the kernel set's ``linear`` (which dispatches on the weight's type), cached keys and values through the
KV format, and each row-parallel projection's partial sum through ``reduce`` (tensor parallelism's
all-reduce), before its bias and the residual add.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexrun.config import OptConfig
from flexrun.errors import CheckpointError
from flexrun.kernels import KernelSet, Weight
from flexrun.runtime.kvformat import KVFormat


@dataclass
class LayerWeights:
    """One decoder layer's weights by slot (Linear weights are [out, in]; qkv is [Q | K | V]).

    Matrices are dense tensors or any weight type the kernel set's ``linear`` knows; vectors (norms,
    biases) are tensors in the compute dtype."""

    ln1_w: torch.Tensor
    qkv_w: Weight
    out_w: Weight
    fc1_w: Weight | None = None  # absent in a mixture-of-experts layer without a shared expert (Mixtral)
    fc2_w: Weight | None = None
    ln2_w: torch.Tensor | None = None  # absent when one norm feeds attention and MLP (GPT-J)
    ln1_b: torch.Tensor | None = None
    qkv_b: torch.Tensor | None = None
    out_b: torch.Tensor | None = None
    ln2_b: torch.Tensor | None = None
    fc1_b: torch.Tensor | None = None
    fc2_b: torch.Tensor | None = None
    gate_w: Weight | None = None
    gate_b: torch.Tensor | None = None
    router_w: Weight | None = None  # mixture of experts: (num_experts, h); the experts load as routed
    shared_gate_w: Weight | None = None  # (1, h): Qwen2-MoE's gate on its shared expert (gate/fc1/fc2)

    @classmethod
    def from_slots(cls, slots: dict[str, Weight]) -> LayerWeights:
        """The layer's weights from its slots; a slot the fused layer has no place for is an error, not dropped."""
        unknown = sorted(set(slots) - _SLOTS)
        if unknown:
            raise CheckpointError(f"the fused layer has no slot {', '.join(unknown)}; the store does not match it")
        return cls(**slots)


_SLOTS = frozenset(f.name for f in dataclasses.fields(LayerWeights))


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
# Sums a row-parallel projection's partial results across tensor-parallel ranks (None: one rank).
Reduce = Callable[[torch.Tensor], torch.Tensor]

# Attention over the cache, given the new tokens' queries (b, nh, s, d) and their keys and values
# (b, s, kv_dim), keys already rotated: caches the new keys and values and returns (b, nh, s, d). The
# engine supplies it, so one layer call can span micro-batches whose caches live in different buffers.
AttentionCore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# The MLP of a layer whose MLP is not the slots' own (a mixture of experts): (weights, normed x (b, s, h)) ->
# what it adds to the residual (b, s, h).
Mlp = Callable[["LayerWeights", torch.Tensor], torch.Tensor]


class FusedLayer:
    """Computes one decoder layer, appending to position-major KV slots through an ``AttentionCore``.

    A KV slot is (max_len, b, ...) in the KV format's layout: row t holds every sequence's key (value) at
    position t, so appending a token is one contiguous write, in memory and on disk alike. Keys are cached
    after the rotary rotation, so cached keys never need their positions again.
    """

    def __init__(self, spec: LayerSpec, kernels: KernelSet, kv_format: KVFormat, reduce: Reduce | None = None) -> None:
        self.spec = spec
        self.k = kernels
        self.kv = kv_format
        self.reduce = reduce
        self._norm = kernels.norms[spec.norm]
        self._add_norm = kernels.add_norms[spec.norm]
        self._act_ = kernels.activations[spec.activation]

    def __call__(
        self,
        w: LayerWeights,
        x: torch.Tensor,
        core: AttentionCore,
        rotary: Rotary | None = None,
        mlp: Mlp | None = None,
    ) -> torch.Tensor:
        """x: (b, s, h); rotary: cos and sin (b, 1, s, rotary_dim) of the new tokens' positions; ``mlp``: the
        MLP of a pre-norm sequential layer, when not the slots' own. Returns (b, s, h)."""
        sp = self.spec
        if sp.parallel_attn:
            # GPT-J: one norm feeds both branches; GPT-NeoX: ln1 feeds attention, ln2 the MLP.
            attn_in = self._norm(x, w.ln1_w, w.ln1_b, sp.eps)
            mlp_in = attn_in if sp.shared_norm else self._norm2(w, x)
            attn, up = self._attend(w, attn_in, core, rotary), self._up(w, mlp_in)
            return self._residual(x, [(attn, w.out_w, w.out_b), (up, w.fc2_w, w.fc2_b)])
        if not sp.pre_norm:  # post-LN: normalise after each residual add
            _, x = self._residual_norm(x, (self._attend(w, x, core, rotary), w.out_w, w.out_b), w.ln1_w, w.ln1_b)
            return self._residual_norm(x, (self._up(w, x), w.fc2_w, w.fc2_b), w.ln2_w, w.ln2_b)[1]
        attn = self._attend(w, self._norm(x, w.ln1_w, w.ln1_b, sp.eps), core, rotary)
        x, h = self._residual_norm(x, (attn, w.out_w, w.out_b), w.ln2_w, w.ln2_b)
        if mlp is not None:
            return x + mlp(w, h)
        return self._residual(x, [(self._up(w, h), w.fc2_w, w.fc2_b)])

    def cached_core(
        self,
        k_slot: torch.Tensor,
        v_slot: torch.Tensor,
        past: int,
        mask: torch.Tensor,
        kernels: KernelSet | None = None,
    ) -> AttentionCore:
        """The core for one micro-batch: KV slots with rows [0, past) filled, into whose rows [past, past + s)
        the new keys and values go; mask: additive, (b, 1 or nh, s, past + s).

        Attention runs where the slots are: slots in host memory while the layer computes on a GPU (host-side
        attention) take the new q, k, v there and send only the output back, computed by ``kernels`` (the
        host's kernel set; default: this layer's)."""
        sp, kv = self.spec, self.kv
        ks = kernels or self.k

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            t = past + k.shape[1]
            where = k_slot.device
            kv.append(k_slot, past, k.to(where))
            kv.append(v_slot, past, v.to(where))
            # The cache may be kept in the stored dtype (or compressed) while attention runs in the compute
            # dtype: the set reads it through the format, or in the format's own bytes where it has a kernel.
            out = ks.attend_cache(kv, q.to(where), k_slot, v_slot, t, mask.to(where), sp.scale)
            return out.to(q.device)  # (b, nh, s, d)

        return core

    def _norm2(self, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        assert w.ln2_w is not None, "this layer has no second norm"
        return self._norm(x, w.ln2_w, w.ln2_b, self.spec.eps)

    def _residual_norm(
        self,
        x: torch.Tensor,
        part: tuple[torch.Tensor, Weight | None, torch.Tensor | None],
        norm_w: torch.Tensor | None,
        norm_b: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x plus one projection (input, weight, bias), and that sum normalised: the residual add and the
        norm after it in one kernel set call (one kernel where the set fuses them)."""
        assert norm_w is not None, "this layer has no second norm"
        a, w, b = part
        if self.reduce is not None:  # the partial sums reduced (and the bias added once) before the add
            x = self._residual(x, [part])
            return x, self._norm(x, norm_w, norm_b, self.spec.eps)
        assert w is not None, "this layer has no such projection"
        return self._add_norm(x, self.k.linear(a, w, b), norm_w, norm_b, self.spec.eps)

    def _residual(
        self, x: torch.Tensor, parts: list[tuple[torch.Tensor, Weight | None, torch.Tensor | None]]
    ) -> torch.Tensor:
        """x plus the row-parallel projections of ``parts`` (input, weight, bias), reduced once together with
        ``reduce``, each bias added after the reduction (once, not once per rank)."""
        assert all(w is not None for _, w, _ in parts), "this layer has no such projection"
        if self.reduce is None:
            for a, w, b in parts:
                x = self.k.linear(a, w, b).add_(x)  # into the projection's fresh output: no temporary
            return x
        total = self.k.linear(parts[0][0], parts[0][1], None)
        for a, w, _ in parts[1:]:
            total = total + self.k.linear(a, w, None)
        total = self.reduce(total)
        for _, _, b in parts:
            if b is not None:
                total = total + b
        return x + total

    def _attend(self, w: LayerWeights, hs: torch.Tensor, core: AttentionCore, rotary: Rotary | None) -> torch.Tensor:
        """Attention before its output projection: (b, s, h) from hs (b, s, h)."""
        sp = self.spec
        b, s, _ = hs.shape
        qkv = self.k.linear(hs, w.qkv_w, w.qkv_b).contiguous()  # (b, s, (nh + 2 * nkv) * d)
        q_dim, kv_dim = sp.n_head * sp.head_dim, sp.n_kv_head * sp.head_dim
        qk = qkv[..., : q_dim + kv_dim].view(b, s, sp.n_head + sp.n_kv_head, sp.head_dim)
        if sp.rotary:  # q's and k's heads rotated together, in the (b, s, heads, d) layout the matmul wrote
            assert rotary is not None, "a rotary layer needs the rotary angles"
            cos, sin = rotary
            qk = self.k.apply_rotary(qk, cos.transpose(1, 2), sin.transpose(1, 2), sp.rotary_interleaved)
        q = qk[:, :, : sp.n_head].transpose(1, 2)  # (b, nh, s, d)
        k = qk[:, :, sp.n_head :].reshape(b, s, kv_dim)  # (b, s, kv_dim)
        v = qkv[..., q_dim + kv_dim :]  # (b, s, kv_dim)
        attn = core(q, k, v)  # (b, nh, s, d)
        return attn.transpose(1, 2).reshape(b, s, sp.n_head * sp.head_dim)  # (b, s, h)

    def _up(self, w: LayerWeights, hs: torch.Tensor) -> torch.Tensor:
        """The MLP's activated first matrix (and gate): (b, s, ffn)."""
        assert w.fc1_w is not None, "this layer has no dense MLP"
        up = self.k.linear(hs, w.fc1_w, w.fc1_b)  # (b, s, ffn)
        if self.spec.gated_mlp:
            assert w.gate_w is not None
            return self._act_(self.k.linear(hs, w.gate_w, w.gate_b)).mul_(up)
        return self._act_(up)
