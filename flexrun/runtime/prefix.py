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
    """One block's shared prefill: ``stem``, the prefix every prompt of the block begins with (computed once,
    one sequence long); ``rows``, the rest of the prompts packed into prefix-tree rows, whose members are run
    positions (consecutive from row to row); ``order[k]``, the block position that runs k-th."""

    order: list[int]
    stem: list[int]
    rows: list[Row]

    @property
    def tokens(self) -> int:
        """The tokens prefilled: the block's distinct prompt prefixes (each row's trie, and the stem once)."""
        return len(self.stem) + sum(len(row) for row in self.rows)


def plan_block(prompts: list[list[int]], cfg: OptConfig, limit: int) -> SharedBlock | None:
    """The shared prefill of a block of ``prompts``, or None when sharing would prefill every token anyway
    (or the rotary scaling depends on the length); ``limit``: the positions a sequence may take."""
    if not can_share(cfg) or len(prompts) < 2:
        return None
    # Every prompt keeps a token after the stem: its next-token logits come from its own row.
    stem = min(_common(prompts[0], p) for p in prompts[1:])
    stem = min(stem, min(map(len, prompts)) - 1)
    rows = pack_prompts([p[stem:] for p in prompts], limit - stem)
    if stem + sum(len(row) for row in rows) == sum(map(len, prompts)):
        return None
    order = [m for row in rows for m in row.members]
    at = {m: k for k, m in enumerate(order)}
    for row in rows:
        row.members = [at[m] for m in row.members]
    return SharedBlock(order, prompts[0][:stem], rows)


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@dataclass
class _Micro:
    """One packed micro-batch: its rows as tensors, masks and rotary angles, and where each member's keys
    and values (after the stem's, in the slot's first rows) and last position sit in it."""

    ids: torch.Tensor  # (b, s)
    pos: torch.Tensor  # (b, s), -1 in the padding
    masks: dict[int, torch.Tensor]  # by window: (b, 1 or nh, s, stem + s)
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    members: list[int]  # run positions, consecutive
    src: list[tuple[torch.Tensor, torch.Tensor]]  # per member: its slot rows (stem's and its own) and batch rows
    last: tuple[torch.Tensor, torch.Tensor]  # (columns, rows) of each member's last node in the batch


@dataclass
class _Stem:
    """The stem as one sequence: its ids, positions, masks and rotary angles."""

    ids: torch.Tensor  # (1, L)
    pos: torch.Tensor  # (1, L)
    masks: dict[int, torch.Tensor]  # (1, 1 or nh, L, L)
    rotary: tuple[torch.Tensor, torch.Tensor] | None


class SharedPrefill:
    """The scratch of a shared prefill (one packed micro-batch's keys and values; the stem's keys, values and
    hidden states), planned on the ledger and allocated at first use, and the shared prefill of a block."""

    def __init__(
        self, fmt: KVFormat, cfg: OptConfig, max_len: int, max_batch: int, device: torch.device, ledger: Ledger
    ) -> None:
        self.fmt, self.max_len, self.device = fmt, max_len, device
        self.elems = max_len * fmt.row_elems(max_batch)
        self.stem_elems = max_len * fmt.row_elems(1)
        ledger.add("device", "shared prefill k/v", 2 * max_len * fmt.row_bytes(max_batch + 1))
        ledger.add("device", "shared prefill stem", cfg.hidden_bytes(1, max_len))
        self._kv: torch.Tensor | None = None

    def _scratch(self, s: int, b: int) -> tuple[KV, KV]:
        """A micro-batch's slots (s, b, ...) and the stem's (max_len, 1, ...), for K and for V."""
        if self._kv is None:
            self._kv = torch.zeros(2, self.elems + self.stem_elems, dtype=self.fmt.dtype, device=self.device)
        kv, stem = self._kv[:, : self.elems], self._kv[:, self.elems :]
        return (
            (self.fmt.slot(kv[0], s, b), self.fmt.slot(kv[1], s, b)),
            (self.fmt.slot(stem[0], self.max_len, 1), self.fmt.slot(stem[1], self.max_len, 1)),
        )

    def _masks(
        self, run: Runner, pos: torch.Tensor, tree: dict[int, torch.Tensor], stem: int
    ) -> dict[int, torch.Tensor]:
        """Each window's mask of rows at ``pos`` (b, s) after a stem of ``stem`` positions: the stem's keys
        seen by every real query (within its window), then the rows' own ``tree`` masks; ALiBi's bias added."""
        cfg, dev = run.cfg, run.device
        keys = torch.arange(stem, device=dev)
        masks = {}
        for win, tm in tree.items():
            seen = (pos[:, :, None] >= 0) & (keys >= 0)  # (b, s, L): a real query sees the stem
            if win > 0:
                seen &= pos[:, :, None] - keys < win
            part = torch.zeros(seen.shape, dtype=run.dtype, device=dev).masked_fill_(~seen, torch.finfo(run.dtype).min)
            masks[win] = torch.cat([part[:, None], tm], dim=-1)  # (b, 1, s, L + s)
        if cfg.position == "alibi":
            h0, h1 = run.tp.shard.part(cfg.n_head)  # a rank's heads keep their global slopes
            at = torch.cat([keys.expand(len(pos), stem), pos], dim=1)  # each key's position
            bias = P.alibi_bias(at, cfg.n_head, run.dtype)[:, h0:h1]  # (b, nh, 1, L + s)
            masks = {win: m + bias for win, m in masks.items()}
        return masks

    def _micro(self, run: Runner, rows: list[Row], stem: int) -> _Micro:
        dev = run.device
        ids, positions, ends, pad = row_tensors(rows, run.cfg.fill_token_id)
        pos = torch.where(positions >= 0, positions + stem, positions).to(dev)
        tree = {win: tree_mask(pos, ends.to(dev), run.dtype, win) for win in run.windows}
        rotary = run.rope.cos_sin(pos, run.dtype) if run.rope is not None else None
        members, src, last_col, last_row = [], [], [], []
        for r, row in enumerate(rows):
            for m, path in zip(row.members, row.scored, strict=True):
                cols = torch.tensor(list(range(stem)) + [stem + pad[r] + node for node in path], device=dev)
                members.append(m)
                src.append((cols, torch.full_like(cols, r)))
                last_col.append(pad[r] + path[-1])
                last_row.append(r)
        last = (torch.tensor(last_col, device=dev), torch.tensor(last_row, device=dev))
        return _Micro(ids.to(dev), pos, self._masks(run, pos, tree, stem), rotary, members, src, last)

    def _stem(self, run: Runner, stem: list[int]) -> _Stem:
        dev, n = run.device, len(stem)
        pos = torch.arange(n, device=dev)[None]
        valid = torch.ones((1, n), dtype=torch.bool, device=dev)
        masks = {win: P.additive_mask(valid, n, run.dtype, win) for win in run.windows}
        if run.cfg.position == "alibi":
            h0, h1 = run.tp.shard.part(run.cfg.n_head)
            bias = P.alibi_bias(pos, run.cfg.n_head, run.dtype)[:, h0:h1]
            masks = {win: m + bias for win, m in masks.items()}
        rotary = run.rope.cos_sin(pos, run.dtype) if run.rope is not None else None
        return _Stem(torch.tensor([stem], device=dev), pos, masks, rotary)

    def prefill(self, run: Runner, shared: SharedBlock, lengths: list[int], sizes: list[int]) -> torch.Tensor:
        """Prefill a block whose sequences run in ``shared.order``: ``lengths``, their prompts' lengths in run
        order; ``sizes``, the block's micro-batch sizes. Returns the logits of each sequence's next token, in
        run order (this rank's part of the vocabulary)."""
        with torch.inference_mode():
            logits = self._prefill(run, shared, lengths, sizes)
        return logits.clone()

    def _prefill(self, run: Runner, shared: SharedBlock, lengths: list[int], sizes: list[int]) -> torch.Tensor:
        gbs, s, L = run.placement.gpu_batch_size, max(lengths), len(shared.stem)
        micros = [self._micro(run, shared.rows[a : a + gbs], L) for a in range(0, len(shared.rows), gbs)]
        stem = self._stem(run, shared.stem) if L else None
        stem_x = torch.empty(0)
        n_layers = run.cfg.num_hidden_layers
        logits: list[torch.Tensor] = []
        for group, w in run.walk(carry=True):
            if group.kind == "input":
                if stem is not None:
                    stem_x = run._embed(w, stem.ids, stem.pos)  # (1, L, h)
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
            win = layer.spec.window
            if stem is not None:
                _, (sk, sv) = self._scratch(0, 1)
                core = layer.cached_core(sk, sv, 0, stem.masks[win])
                stem_x = layer(lw, stem_x, core, stem.rotary, run._mlp(i, None))
            slots = _Slots(run.cache, i, sizes, s, lengths)
            for p, mb in enumerate(micros):
                (k, v), (sk, sv) = self._scratch(L + mb.ids.shape[1], mb.ids.shape[0])  # (L + s_p, b_p, ...) each
                k[:L], v[:L] = sk[:L], sv[:L]  # the stem's keys and values, before every row's
                core = layer.cached_core(k, v, L, mb.masks[win])
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
