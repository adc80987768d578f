"""The layer stack's layout: which stored tensors the engine loads together, and in what order.

The stack is walked in groups: the input group (token embeddings, their norm, positions, token types, the
input projection), one group per decoder layer, and the output group (final norm, output projection, LM
head, pooler). A mixture-of-experts layer's experts follow its group, one group each, loaded only when a
token is routed to them (never by the walk). A tied LM head reads the input group's token embeddings again. The converter writes
tensors in this order, the weight manager places and streams them by group, the cost model sizes its
weight buffers by the largest group, and the schedule runs a group's compute on its weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import cached_property

from flexrun.config import OptConfig, Shape

# The global tensors the input group uses; every other global belongs to the output group.
INPUT_GLOBALS = ("embed_tokens", "embed_ln_w", "embed_ln_b", "embed_positions", "embed_token_types", "project_in")
# The layer slots the fused layer multiplies with (``linear``): the ones weight compression applies to.
MATMUL_SLOTS = ("qkv_w", "out_w", "gate_w", "fc1_w", "fc2_w")
# The input tables a generation step reads only the rows of (the tokens' and their positions'), so a
# disk-resident one costs a few pages per step rather than its size (``runtime.weights.RowTable``).
GATHERED = ("embed_tokens", "embed_positions")
GATHER_BUFFER = 1 << 20  # bytes of each such table's read buffer (runs of rows longer than that are read in parts)
EXPERT_PREFIX = "expert"  # an expert's slots are expert{e}_gate_w, expert{e}_fc1_w, expert{e}_fc2_w
KV_STAGE_BYTES = 32 << 20  # host bytes a disk-resident KV cache may stage ahead through (``kv_stage_depth``)


@dataclass(frozen=True)
class Group:
    """One step of the walk: its kind, its layer index (-1 outside the stack) and its tensors' store names."""

    index: int
    kind: str  # input, layer, expert or output
    layer: int
    names: tuple[str, ...]
    expert: int = -1

    @cached_property
    def slots(self) -> tuple[tuple[str, str], ...]:
        """(store name, slot name) pairs: ``layers.3.qkv_w`` is slot ``qkv_w`` of layer 3, ``layers.3.expert5_fc1_w``
        slot ``fc1_w`` of expert 5 of layer 3."""
        return tuple((n, expert_slot(n.rsplit(".", 1)[-1])) for n in self.names)


@dataclass(frozen=True)
class HotSet:
    """Bytes along ``StackLayout.residency_order`` as a disk share grows from its end: the tables read by rows
    go to disk first (``gathered`` bytes, read a few rows a step), the largest group's tensors last
    (``first`` bytes at the order's front). The disk's double buffer holds the largest group on disk:
    ``next_largest`` until the largest (``largest``) goes there too."""

    total: int
    gathered: int
    first: int
    largest: int
    next_largest: int


@dataclass(frozen=True)
class StackLayout:
    groups: tuple[Group, ...]
    shapes: dict[str, Shape]  # every stored tensor's shape, by store name

    @cached_property
    def walked(self) -> tuple[Group, ...]:
        """The groups a step walks in order: all but the experts, which are loaded as they are routed to."""
        return tuple(g for g in self.groups if g.kind != "expert")

    @cached_property
    def experts(self) -> dict[tuple[int, int], Group]:
        """Expert groups by (layer, expert)."""
        return {(g.layer, g.expert): g for g in self.groups if g.kind == "expert"}

    @property
    def store_order(self) -> list[str]:
        """Every stored tensor once, in walk order (a tied head's embeddings where the input group has them)."""
        return list(dict.fromkeys(n for g in self.groups for n in g.names))

    def compressible(self) -> list[str]:
        """The stored tensors weight compression applies to: every layer's matmul weights (embeddings, the
        head, norms and biases stay in the model's dtype)."""
        return [n for g in self.groups if g.kind in ("layer", "expert") for n, slot in g.slots if slot in MATMUL_SLOTS]

    def whole_reads(self, name: str, gathered: Collection[str] = ()) -> int:
        """How many of a step's walked groups read ``name`` whole from disk: the input group reads a table in
        ``gathered`` by rows only, and a tied head reads the token embeddings again."""
        return sum(name in g.names and not (g.kind == "input" and name in gathered) for g in self.walked)

    def residency_order(self, nbytes: Mapping[str, int], gathered: Collection[str] = ()) -> list[str]:
        """Every stored tensor once, the one whose residency saves the most disk reads per step first: what
        weight shares keep resident (device, then host) before the rest goes to disk.

        A tensor read whole once per step saves its size; a routed expert, only when a token is routed to it;
        a table read by rows, next to nothing: those follow, in that order. Among the first, the tensors of
        the largest groups (a head as big as the vocabulary, say) come first: the disk's double buffer is
        sized by the largest group left on disk, so keeping that one resident also shrinks the buffer.
        """
        group_bytes = dict.fromkeys(self.store_order, 0)  # the largest group each tensor is read whole in
        for g in self.groups:
            whole = [n for n in g.names if not (g.kind == "input" and n in gathered)]
            size = sum(nbytes[n] for n in whole)
            for n in whole:
                group_bytes[n] = max(group_bytes[n], size)
        experts = self._expert_names

        def rank(item: tuple[int, str]) -> tuple[int, int, int, int]:
            index, n = item
            reads = self.whole_reads(n, gathered)
            return (1 if n in experts else 0 if reads else 2), -reads, -group_bytes[n], index

        return [n for _, n in sorted(enumerate(self.store_order), key=rank)]

    def hot_set(self, nbytes: Mapping[str, int], gathered: Collection[str] = ()) -> HotSet:
        """What the cost model needs of ``residency_order``: see ``HotSet``."""
        order = self.residency_order(nbytes, gathered)
        whole = [n for n in order if self.whole_reads(n, gathered) or n in self._expert_names]
        sizes = [sum(nbytes[n] for n in g.names if not (g.kind == "input" and n in gathered)) for g in self.groups]
        top = max(sizes)
        first = next(g for g, size in zip(self.groups, sizes, strict=True) if size == top)
        held = [n for n in whole if n in first.names]
        rest = [size for g, size in zip(self.groups, sizes, strict=True) if g is not first and size]
        return HotSet(
            total=sum(nbytes[n] for n in order),
            gathered=sum(nbytes[n] for n in order if n not in whole),
            first=sum(nbytes[n] for n in held),
            largest=top,
            next_largest=max(rest, default=0),
        )

    @cached_property
    def _expert_names(self) -> frozenset[str]:
        return frozenset(n for g in self.groups if g.kind == "expert" for n in g.names)

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
    dense = tuple(slot for slot in layer if not slot.startswith(EXPERT_PREFIX))
    for i in range(cfg.num_hidden_layers):
        groups.append(Group(len(groups), "layer", i, tuple(f"layers.{i}.{slot}" for slot in dense)))
        for e in range(cfg.num_experts):
            names = tuple(f"layers.{i}.{EXPERT_PREFIX}{e}_{slot}" for slot in ("gate_w", "fc1_w", "fc2_w"))
            groups.append(Group(len(groups), "expert", i, names, e))
    groups.append(Group(len(groups), "output", -1, tuple(last)))
    shapes = dict(glob)
    for i in range(cfg.num_hidden_layers):
        shapes.update({f"layers.{i}.{slot}": s for slot, s in layer.items()})
    return StackLayout(tuple(groups), shapes)


def expert_slot(slot: str) -> str:
    """An expert's slot name without its expert prefix (``expert5_fc1_w`` -> ``fc1_w``); other slots as they are."""
    if slot.startswith(EXPERT_PREFIX) and "_" in slot and slot[len(EXPERT_PREFIX) : slot.index("_")].isdigit():
        return slot.split("_", 1)[1]
    return slot


# ---- mixture-of-experts sizes: what a step reads of a layer's experts ---------------------------------
def expert_bytes(cfg: OptConfig) -> int:
    """Bytes of one expert's weights (a SwiGLU MLP)."""
    return 3 * cfg.hidden_size * cfg.ffn_embed_dim * cfg.dtype_bytes


def expected_experts(cfg: OptConfig, tokens: float) -> float:
    """Experts a layer reads for ``tokens`` tokens routed uniformly, top-k of E each: the expected size of the
    union, E * (1 - (1 - k/E)^tokens); 0 for a dense model."""
    e, k = cfg.num_experts, cfg.experts_per_token
    return e * (1.0 - (1.0 - k / e) ** max(tokens, 0.0)) if e else 0.0


def active_layer_bytes(cfg: OptConfig, tokens: float) -> float:
    """One layer's weight bytes a step over ``tokens`` tokens reads: all but the experts none of them is
    routed to (``layer_bytes`` for a dense layer)."""
    return cfg.layer_bytes() - (cfg.num_experts - expected_experts(cfg, tokens)) * expert_bytes(cfg)


def active_params(cfg: OptConfig) -> int:
    """Parameters one token computes with: all but the experts it is not routed to."""
    unused = (cfg.num_experts - cfg.experts_per_token) * expert_bytes(cfg) * cfg.num_hidden_layers
    return (cfg.model_bytes() - unused) // cfg.dtype_bytes


def kv_stage_depth(num_batches: int, slot_bytes: float, device_is_host: bool) -> int:
    """Staging turns a disk-resident KV cache reads through, each one micro-batch's K and V of one layer.

    A small cache read queued behind a streamed weight read waits for it (tens of milliseconds on a virtual
    disk, measured in issue 25), so on a CPU every micro-batch of the next layer is read at once: a turn per
    micro-batch and one for the micro-batch computing, within ``KV_STAGE_BYTES``. Where staging also takes
    device memory (CUDA) the cache is double-buffered.
    """
    if not device_is_host:
        return 2
    fits = int(KV_STAGE_BYTES // max(2 * slot_bytes, 1))
    return max(2, min(num_batches + 1, fits))
