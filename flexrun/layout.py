"""The layer stack's layout: which stored tensors the engine loads together, and in what order.

The stack is walked in groups: the input group (token embeddings, their norm, positions, token types, the
input projection), one group per decoder layer, and the output group (final norm, output projection, LM
head, pooler). A tied LM head reads the input group's token embeddings again. The converter writes
tensors in this order, the weight manager places and streams them by group, the cost model sizes its
weight buffers by the largest group, and the schedule runs a group's compute on its weights.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import cached_property

from flexrun.config import OptConfig, Shape

# The global tensors the input group uses; every other global belongs to the output group.
INPUT_GLOBALS = ("embed_tokens", "embed_ln_w", "embed_ln_b", "embed_positions", "embed_token_types", "project_in")
# The layer slots the fused layer multiplies with (``linear``): the ones weight compression applies to.
MATMUL_SLOTS = ("qkv_w", "out_w", "gate_w", "fc1_w", "fc2_w")


@dataclass(frozen=True)
class Group:
    """One step of the walk: its kind, its layer index (-1 outside the stack) and its tensors' store names."""

    index: int
    kind: str
    layer: int
    names: tuple[str, ...]

    @cached_property
    def slots(self) -> tuple[tuple[str, str], ...]:
        """(store name, slot name) pairs: ``layers.3.qkv_w`` is slot ``qkv_w`` of layer 3."""
        return tuple((n, n.rsplit(".", 1)[-1]) for n in self.names)


@dataclass(frozen=True)
class StackLayout:
    groups: tuple[Group, ...]
    shapes: dict[str, Shape]  # every stored tensor's shape, by store name

    @property
    def store_order(self) -> list[str]:
        """Every stored tensor once, in walk order (a tied head's embeddings where the input group has them)."""
        return list(dict.fromkeys(n for g in self.groups for n in g.names))

    def compressible(self) -> list[str]:
        """The stored tensors weight compression applies to: every layer's matmul weights (embeddings, the
        head, norms and biases stay in the model's dtype)."""
        return [n for g in self.groups if g.kind == "layer" for n, slot in g.slots if slot in MATMUL_SLOTS]

    def group_elements(self, group: Group) -> int:
        return sum(math.prod(self.shapes[n]) for n in group.names)

    def max_group_elements(self) -> int:
        """Elements of the largest group: what a streaming buffer must hold at once."""
        return max(self.group_elements(g) for g in self.groups)


@functools.cache
def stack_layout(cfg: OptConfig) -> StackLayout:
    """The layout of ``cfg``'s stack (cached: configs are frozen)."""
    glob = cfg.global_shapes()
    layer = cfg.layer_shapes()
    first = tuple(n for n in glob if n in INPUT_GLOBALS)
    last = [n for n in glob if n not in INPUT_GLOBALS]
    if cfg.tie_word_embeddings and not cfg.encoder:
        last.append("embed_tokens")
    groups = [Group(0, "input", -1, first)]
    for i in range(cfg.num_hidden_layers):
        groups.append(Group(i + 1, "layer", i, tuple(f"layers.{i}.{slot}" for slot in layer)))
    groups.append(Group(cfg.num_hidden_layers + 1, "output", -1, tuple(last)))
    shapes = dict(glob)
    for i in range(cfg.num_hidden_layers):
        shapes.update({f"layers.{i}.{slot}": s for slot, s in layer.items()})
    return StackLayout(tuple(groups), shapes)
