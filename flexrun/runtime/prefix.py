"""Prompts that share a prefix prefill it once per block: the block's prompts packed into prefix-tree rows
(``runtime.packing``, as the scorer packs its requests), run through the stack with the tree mask, and each
prompt's keys and values gathered from its path in the tree into its own row of the KV cache.

A block's sequences run in the packing's order (their results go back in the block's order), so the rows
of a packed micro-batch fill the cache slots of consecutive sequences, and each (layer, micro-batch) slot
is fetched and stored once, on whichever tier it lives, as a plain prefill would. After the prefill the
cache is what a plain prefill leaves (each prompt left-padded to the block's longest), so decoding does not
change; each token sits at its position in its own prompt, so each prompt's logits are those it gets alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from flexrun.config import OptConfig
from flexrun.kernels import positions as P
from flexrun.layout import Group
from flexrun.parallel import TensorParallel
from flexrun.placement import Placement
from flexrun.runtime.activations import ActivationStore
from flexrun.runtime.kvcache import KV, KVCache
from flexrun.runtime.kvformat import KVFormat
from flexrun.runtime.layer import FusedLayer, LayerWeights, Mlp
from flexrun.runtime.packing import Row, can_share, pack_prompts, row_tensors, tree_mask
from flexrun.runtime.tiers import Ledger


class Runner(Protocol):
    """What the shared prefill uses of the engine running it."""

    cfg: OptConfig
    dtype: torch.dtype
    device: torch.device
    placement: Placement
    tp: TensorParallel
    cache: KVCache
    acts: ActivationStore
    layers: list[FusedLayer]
    windows: list[int]
    rope: P.Rope | None

    def walk(self, carry: bool = False) -> Iterator[tuple[Group, dict[str, Any]]]: ...

    def _embed(self, w: dict[str, torch.Tensor], ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def _head(self, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor: ...

    def _mlp(self, layer: int, rows: torch.Tensor | None) -> Mlp | None: ...


@dataclass(frozen=True)
class SharedBlock:
    """One block's shared prefill: ``order[k]``, the block position that runs k-th; ``rows``, the packed
    rows, whose members are run positions (consecutive from row to row)."""

    order: list[int]
    rows: list[Row]

    @property
    def tokens(self) -> int:
        """The tokens prefilled: the block's distinct prompt prefixes."""
        return sum(len(row) for row in self.rows)


def plan_block(prompts: list[list[int]], cfg: OptConfig, limit: int) -> SharedBlock | None:
    """The shared prefill of a block of ``prompts``, or None when sharing would prefill every token anyway
    (or the rotary scaling depends on the length); ``limit``: a packed row's most tokens."""
    if not can_share(cfg) or len(prompts) < 2:
        return None
    rows = pack_prompts(prompts, limit)
    if sum(len(row) for row in rows) == sum(map(len, prompts)):
        return None
    order = [m for row in rows for m in row.members]
    at = {m: k for k, m in enumerate(order)}
    for row in rows:
        row.members = [at[m] for m in row.members]
    return SharedBlock(order, rows)


@dataclass
class _Micro:
    """One packed micro-batch: its rows as tensors, masks and rotary angles, and where each member's keys
    and values and last position sit in it."""

    ids: torch.Tensor  # (b, s)
    pos: torch.Tensor  # (b, s), -1 in the padding
    masks: dict[int, torch.Tensor]  # by window: (b, 1 or nh, s, s)
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    members: list[int]  # run positions, consecutive
    src: list[tuple[torch.Tensor, torch.Tensor]]  # per member: its nodes' (columns, rows) in the padded batch
    last: tuple[torch.Tensor, torch.Tensor]  # (columns, rows) of each member's last node


class SharedPrefill:
    """The scratch keys and values of one packed micro-batch (planned on the ledger, allocated at first use)
    and the shared prefill of a block."""

    def __init__(self, fmt: KVFormat, max_len: int, max_batch: int, device: torch.device, ledger: Ledger) -> None:
        self.fmt, self.max_len, self.device = fmt, max_len, device
        self.elems = max_len * fmt.row_elems(max_batch)
        ledger.add("device", "shared prefill k/v", 2 * max_len * fmt.row_bytes(max_batch))
        self._kv: torch.Tensor | None = None

    def _scratch(self, s: int, b: int) -> KV:
        if self._kv is None:
            self._kv = torch.zeros(2, self.elems, dtype=self.fmt.dtype, device=self.device)
        return self.fmt.slot(self._kv[0], s, b), self.fmt.slot(self._kv[1], s, b)

    def _micro(self, run: Runner, rows: list[Row]) -> _Micro:
        cfg, dev = run.cfg, run.device
        ids, positions, ends, pad = row_tensors(rows, cfg.fill_token_id)
        pos, end = positions.to(dev), ends.to(dev)
        masks = {win: tree_mask(pos, end, run.dtype, win) for win in run.windows}
        if cfg.position == "alibi":
            h0, h1 = run.tp.shard.part(cfg.n_head)  # a rank's heads keep their global slopes
            bias = P.alibi_bias(pos, cfg.n_head, run.dtype)[:, h0:h1]  # (b, nh, 1, s)
            masks = {win: m + bias for win, m in masks.items()}
        rotary = run.rope.cos_sin(pos, run.dtype) if run.rope is not None else None
        members, src, last_col, last_row = [], [], [], []
        for r, row in enumerate(rows):
            for m, path in zip(row.members, row.scored, strict=True):
                cols = torch.tensor(path, device=dev) + pad[r]
                members.append(m)
                src.append((cols, torch.full_like(cols, r)))
                last_col.append(pad[r] + path[-1])
                last_row.append(r)
        last = (torch.tensor(last_col, device=dev), torch.tensor(last_row, device=dev))
        return _Micro(ids.to(dev), pos, masks, rotary, members, src, last)

    def prefill(self, run: Runner, shared: SharedBlock, lengths: list[int], sizes: list[int]) -> torch.Tensor:
        """Prefill a block whose sequences run in ``shared.order``: ``lengths``, their prompts' lengths in run
        order; ``sizes``, the block's micro-batch sizes. Returns the logits of each sequence's next token, in
        run order (this rank's part of the vocabulary)."""
        with torch.inference_mode():
            logits = self._prefill(run, shared, lengths, sizes)
        return logits.clone()

    def _prefill(self, run: Runner, shared: SharedBlock, lengths: list[int], sizes: list[int]) -> torch.Tensor:
        gbs, s = run.placement.gpu_batch_size, max(lengths)
        micros = [self._micro(run, shared.rows[a : a + gbs]) for a in range(0, len(shared.rows), gbs)]
        n_layers = run.cfg.num_hidden_layers
        logits: list[torch.Tensor] = []
        for group, w in run.walk(carry=True):
            if group.kind == "input":
                for p, mb in enumerate(micros):
                    run.acts.put(0, p, run._embed(w, mb.ids, mb.pos))
                continue
            if group.kind == "output":
                for p, mb in enumerate(micros):
                    x = run.acts.take(p)[mb.last[1], mb.last[0]]  # (m, h): each member's last position
                    logits.append(run._head(w, x[:, None]))
                continue
            i = group.layer
            lw = LayerWeights.from_slots({slot: w[name] for name, slot in group.slots})
            layer = run.layers[i]
            slots = _Slots(run.cache, i, sizes, s, lengths)
            for p, mb in enumerate(micros):
                k, v = self._scratch(*mb.ids.shape[::-1])  # (s_p, b_p, ...) each
                core = layer.cached_core(k, v, 0, mb.masks[layer.spec.window])
                x = layer(lw, run.acts.take(p), core, mb.rotary, run._mlp(i, mb.pos >= 0))  # padding routes nowhere
                run.acts.put(min(i + 1, n_layers - 1), p, x)
                for m, (cols, rows) in zip(mb.members, mb.src, strict=True):
                    slots.write(m, k[cols, rows], v[cols, rows])
            slots.close()
        return torch.cat(logits).cpu()


class _Slots:
    """Layer ``i``'s cache slots of a block, filled sequence by sequence in run order: a slot is fetched when
    its first sequence comes and stored when its last one is in, so one is open at a time."""

    def __init__(self, cache: KVCache, i: int, sizes: list[int], s: int, lengths: list[int]) -> None:
        self.cache, self.i, self.sizes, self.s, self.lengths = cache, i, sizes, s, lengths
        self.starts = [sum(sizes[:j]) for j in range(len(sizes))]
        self.j = -1
        self.kv: KV | None = None
        self.turn = -1

    def write(self, m: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Sequence ``m``'s keys and values (len, ...), in the format's rows, at its left-padded columns."""
        j = max(n for n, start in enumerate(self.starts) if start <= m)
        if j != self.j:
            self.close()
            self.j = j
            self.kv, self.turn = self.cache.fetch(self.i, j, self.sizes[j], 0).result()
        assert self.kv is not None
        r, n = m - self.starts[j], self.lengths[m]
        self.kv[0][self.s - n : self.s, r] = k
        self.kv[1][self.s - n : self.s, r] = v

    def close(self) -> None:
        if self.kv is not None:
            self.cache.store(self.i, self.j, self.kv, self.turn, 0, self.s)
            self.kv = None
