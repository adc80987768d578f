"""Mixture-of-experts layers (Mixtral, Qwen2-MoE): the router runs on the compute device with the layer's
weights; the experts its tokens are routed to are then loaded one after another, each once for the whole
block and the next one loading while this one computes, and never an expert no token was routed to.

Each expert is a group of its own in the stack's layout, placed on device / host / disk by the weight
shares like any other weight; one held on disk is read into the weight manager's expert arenas.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from flexrun.config import OptConfig
from flexrun.kernels import KernelSet, Weight
from flexrun.kernels.moe import route, routed
from flexrun.layout import StackLayout
from flexrun.runtime.layer import LayerWeights, Mlp
from flexrun.runtime.weights import WeightManager


class ExpertStream:
    """Loads a layer's routed experts in turn through the weight manager, and counts what it loads."""

    def __init__(self, weights: WeightManager, layout: StackLayout) -> None:
        self.weights = weights
        self.layout = layout
        self.read = 0  # experts loaded
        self.loads = 0  # (layer, step) loads (one per micro-batch in prefill)
        #: When a list: (layer, experts) of every load, for tests and diagnostics.
        self.log: list[tuple[int, tuple[int, ...]]] | None = None

    def __call__(self, layer: int, experts: list[int]) -> Iterator[tuple[int, dict[str, Weight]]]:
        """Each of ``experts`` of ``layer`` with its weights by slot (gate_w, fc1_w, fc2_w), in order."""
        self.read += len(experts)
        self.loads += 1
        if self.log is not None:
            self.log.append((layer, tuple(experts)))
        groups = [self.layout.experts[(layer, e)] for e in experts]
        if not groups:
            return
        fut = self.weights.prefetch(groups[0].index)
        for n, group in enumerate(groups):
            loaded = self.weights.wait(fut)
            if n + 1 < len(groups):
                fut = self.weights.prefetch(groups[n + 1].index)
            yield group.expert, {slot: loaded[name] for name, slot in group.slots}


class MoeMlp:
    """A mixture-of-experts MLP: routed experts summed with their routing weights, plus a gated shared expert."""

    def __init__(self, cfg: OptConfig, kernels: KernelSet, stream: ExpertStream) -> None:
        self.top_k = cfg.experts_per_token
        self.renormalise = cfg.norm_topk_prob
        self.k = kernels
        self.act = kernels.activations[cfg.activation]
        self.stream = stream

    def bind(self, layer: int, rows: torch.Tensor | None) -> Mlp:
        """The MLP of ``layer`` for a call whose real tokens are ``rows`` (b, s) bool (None: all of them)."""
        return lambda w, hs: self(layer, w, hs, rows)

    def __call__(self, layer: int, w: LayerWeights, hs: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """hs: the normed hidden states (b, s, h) -> the MLP's output (b, s, h)."""
        b, s, h = hs.shape
        x = hs.reshape(b * s, h)
        top, idx = route(self.k.linear(x, w.router_w, None), self.top_k, self.renormalise)  # (n, k) each
        live = None if rows is None else rows.reshape(-1).to(x.device)
        out = torch.zeros_like(x)
        for e, ew in self.stream(layer, routed(idx, live)):
            hit = idx == e  # (n, k): at most one hit per token
            if live is not None:
                hit &= live[:, None]
            tok, pos = torch.where(hit)
            y = self._swiglu(x[tok], ew["gate_w"], ew["fc1_w"], ew["fc2_w"])  # (m, h)
            out.index_add_(0, tok, (y * top[tok, pos, None]).to(out.dtype))
        if w.shared_gate_w is not None:
            assert w.gate_w is not None and w.fc1_w is not None and w.fc2_w is not None
            shared = self._swiglu(x, w.gate_w, w.fc1_w, w.fc2_w)
            out += torch.sigmoid(self.k.linear(x, w.shared_gate_w, None)) * shared
        return out.view(b, s, h)

    def _swiglu(self, x: torch.Tensor, gate: Weight, up: Weight, down: Weight) -> torch.Tensor:
        """act(x gate^T) * (x up^T), projected down: (m, h) -> (m, h)."""
        return self.k.linear(self.act(self.k.linear(x, gate, None)).mul_(self.k.linear(x, up, None)), down, None)
