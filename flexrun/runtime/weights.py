"""Weight residency: which tier holds each tensor, and loading a group's weights for compute.

The stack is walked in the groups of ``flexrun.layout`` (input embeddings, each decoder layer, output
head). Weight shares are realised per tensor, by bytes, along ``StackLayout.residency_order``: the tensors
whose residency saves the most reads per step are kept resident (a tied or large head first), the tables a
step reads only rows of go to disk first. Device- and host-resident tensors are read once at start;
disk-resident tensors are read from the tensor store in place (never copied to the offload dir), every
step, into one of two reusable page-aligned arenas, so the next group loads while this one computes; a
disk-resident table in ``gathered`` is read by rows instead (``RowTable``), only those a step's ids use.
On CUDA, host and disk tensors are then copied into one of two device arenas on a side stream.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flexrun import diskio
from flexrun.errors import CheckpointError
from flexrun.kernels import KernelSet, Weight
from flexrun.layout import GATHER_BUFFER, stack_layout
from flexrun.placement import Shares
from flexrun.runtime.iopool import IOPool, done
from flexrun.runtime.tiers import Ledger
from flexrun.runtime.transfer import Mover
from flexrun.weights.store import TensorStore

log = logging.getLogger(__name__)

_GPU_ALIGN = 256


@dataclass
class _Loaded:
    tensors: dict[str, torch.Tensor]
    event: Any = None  # a CUDA event the compute stream waits on


class WeightManager:
    def __init__(
        self,
        store: TensorStore,
        shares: Shares,
        device: torch.device,
        pool: IOPool,
        ledger: Ledger,
        kernels: KernelSet,
        mover: Mover | None = None,
        gathered: tuple[str, ...] = (),
    ) -> None:
        """Plan the residency and record it in ``ledger``; ``load()`` then reads and allocates. Weights held
        on the compute device's side are prepared once in the layout ``kernels`` computes them fastest in.
        ``mover`` makes the host buffers copies to the device run from (page-locked on CUDA, exact sizes).
        ``gathered``: the input group's tables the runner looks rows up in (``lookup``), read by rows from disk."""
        self.store = store
        self.mover = mover or Mover(device)
        self.kernels = kernels
        self.cfg = store.config
        self.device = device
        self.pool = pool
        # The device's memory is apart from the host's (CUDA; on a CPU under transfer.STAGE_ON_CPU, in tests):
        # host and disk tensors are copied into device arenas, on the ``weights`` lane's stream.
        self.staged = self.mover.separate
        layout = stack_layout(self.cfg)
        order = layout.residency_order({n: store.meta(n).nbytes for n in layout.store_order}, gathered)
        tiers = shares.split([store.meta(n).nbytes for n in order])
        # Without CUDA the device tier is host RAM.
        self.tier = {n: (t if self.staged or t != "device" else "host") for n, t in zip(order, tiers, strict=True)}
        self.groups = [list(g.names) for g in layout.groups]
        # Experts (loaded as tokens are routed to them) stream through arenas of their own, so loading one
        # never overwrites the layer whose router chose it.
        self._pair = [int(g.kind == "expert") for g in layout.groups]
        self._order = order
        self.resident: dict[str, Weight] = {}
        self._raw: dict[str, torch.Tensor] = {}  # on CUDA, host-resident weights' bytes, copied to the device per step
        for name in order:
            meta = store.meta(name)
            if self.tier[name] != "disk":
                spec = meta.spec
                extra = kernels.prepared_extra(spec, meta.shape) if spec and self._prepared(name) else 0
                ledger.add(self.tier[name], "weights", meta.nbytes + extra)
        # The input group's disk-resident tables, read by rows; per group, the disk tensors read whole each
        # step and, on CUDA, everything not on the device.
        self.rows = {n: RowTable(store, n) for n in self.groups[0] if n in gathered and self.tier[n] == "disk"}
        for table in self.rows.values():
            ledger.add("host", "gathered rows", table.size)
        whole = [[n for n in g if k or n not in self.rows] for k, g in enumerate(self.groups)]
        self._disk = [[n for n in g if self.tier[n] == "disk"] for g in whole]
        self._streamed = [[n for n in g if self.tier[n] != "device"] for g in whole] if self.staged else []
        disk_bytes = [sum(store.meta(n).padded_nbytes for n in names) for names in self._disk]
        self._arena_bytes = _largest_per_pair(disk_bytes, self._pair)
        ledger.add("host", "weight buffers", 2 * self._arena_bytes[0])
        if self._arena_bytes[1]:
            ledger.add("host", "expert buffers", 2 * self._arena_bytes[1])
        self._gpu_arena_bytes = [0, 0]
        if self.staged:
            sizes = [self._gpu_offsets(names)[1] for names in self._streamed]
            self._gpu_arena_bytes = _largest_per_pair(sizes, self._pair)
            ledger.add("device", "weight buffers", 2 * sum(self._gpu_arena_bytes))
        self._arenas: list[list[torch.Tensor]] = [[], []]
        self._gpu_arenas: list[list[torch.Tensor]] = [[], []]
        self._turn = [0, 0]
        # Every expert counted: a step reads only the routed ones (``layout.active_layer_bytes``).
        self.bytes_read_per_step = sum(store.meta(n).padded_nbytes for names in self._disk for n in names)

    def load(self) -> None:
        """Read the resident tensors and allocate the streaming arenas (after the budgets were checked)."""
        for name in self._order:
            tier = self.tier[name]
            if tier == "disk":
                continue
            meta = self.store.meta(name)
            raw = self._read(name, self.mover.host_buffer(meta.nbytes, pin=tier == "host"))
            if self.staged and tier == "host":
                self._raw[name] = raw
                continue
            w = self.store.decode(name, raw.to(self.device) if tier == "device" else raw)
            self.resident[name] = self.kernels.prepare(w) if self._prepared(name) else w
        self.store.remember_verified()  # the resident tensors were checked: not hashed again at the next open
        for table in self.rows.values():
            table.allocate()
        for k in (0, 1):
            if self._arena_bytes[k]:
                self._arenas[k] = [self.mover.host_buffer(self._arena_bytes[k]) for _ in range(2)]
            if self._gpu_arena_bytes[k]:
                size = self._gpu_arena_bytes[k]
                self._gpu_arenas[k] = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]

    def _read(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        """``store.read_raw``, with a failing read (a disk error, a file replaced by a directory) named by its
        file: it is the store's, and the job would otherwise blame the offload dir."""
        try:
            return self.store.read_raw(name, buf)
        except OSError as exc:
            file = self.store.path / self.store.meta(name).file
            raise CheckpointError(f"cannot read {file}: {exc.strerror or exc}") from None

    def _prepared(self, name: str) -> bool:
        """Whether ``name`` is kept in the kernels' own layout: a compressed weight held where it is computed."""
        return bool(self.store.meta(name).encoding) and (self.tier[name] == "device" or not self.staged)

    def _gpu_offsets(self, names: list[str]) -> tuple[dict[str, int], int]:
        offsets, off = {}, 0
        for n in names:
            offsets[n] = off
            off += -(-self.store.meta(n).nbytes // _GPU_ALIGN) * _GPU_ALIGN
        return offsets, off

    def prefetch(self, g: int) -> Future[_Loaded]:
        """Start loading group ``g``'s weights into the next free arena (of the experts' pair for an expert)."""
        if not self._disk[g] and not (self.staged and self._streamed[g]):
            # Nothing to read or copy: handing the lookup to an I/O thread would only cost a GIL hand-off
            # (milliseconds on a busy machine, for every group of every decode step).
            return done(self._load(g, 0))
        turn = self._turn[self._pair[g]]
        self._turn[self._pair[g]] ^= 1
        # The target device arena was last read by compute enqueued before now: the copy waits for it.
        return self.pool.submit(self._load, g, turn, self.mover.mark())

    def _load(self, g: int, turn: int, done_reading: Any = None) -> _Loaded:
        out: dict[str, Any] = {n: self.resident[n] for n in self.groups[g] if n in self.resident}
        if g == 0:
            out.update(self.rows)
        if self._disk[g]:
            arena, off = self._arenas[self._pair[g]][turn], 0
            for n in self._disk[g]:
                size = self.store.meta(n).padded_nbytes
                raw = self._read(n, arena[off : off + size])
                out[n] = raw if self.staged else self.store.decode(n, raw)  # on CUDA decoded once on the device
                off += size
        if not self.staged or not self._streamed[g]:
            return _Loaded(out)
        offsets, _ = self._gpu_offsets(self._streamed[g])
        gpu = self._gpu_arenas[self._pair[g]][turn]
        dsts: dict[str, torch.Tensor] = {}
        pairs = []
        for n in self._streamed[g]:
            meta = self.store.meta(n)
            dsts[n] = gpu[offsets[n] : offsets[n] + meta.nbytes]  # the file's bytes, decoded on the device
            pairs.append((dsts[n], out[n] if n in out else self._raw[n][: meta.nbytes]))
        event = self.mover.copy("weights", pairs, [done_reading])
        # The host arena is reused two loads later; make sure the copies out of it have finished.
        self.mover.sync(event)
        out.update({n: self.store.decode(n, dst) for n, dst in dsts.items()})
        return _Loaded(out, event)

    def wait(self, fut: Future[_Loaded]) -> dict[str, torch.Tensor]:
        loaded = fut.result()
        self.mover.wait(loaded.event)
        return loaded.tensors


def _largest_per_pair(sizes: list[int], pair: list[int]) -> list[int]:
    """The largest size among the layers' groups and among the experts' (what each pair of arenas holds)."""
    return [max((b for b, p in zip(sizes, pair, strict=True) if p == k), default=0) for k in (0, 1)]


class RowTable:
    """A disk-resident table (token or position embeddings) read by rows: a lookup reads the aligned pages its
    ids' rows lie on, runs of consecutive rows in one read, through a buffer of at most ``GATHER_BUFFER``."""

    def __init__(self, store: TensorStore, name: str) -> None:
        self.store, self.name, self.meta = store, name, store.meta(name)
        self.width = self.meta.shape[-1]
        self.row_bytes = self.meta.nbytes // self.meta.shape[0]
        padded = self.meta.padded_nbytes  # the whole table fits, or runs of rows through GATHER_BUFFER
        self.size = padded if padded <= GATHER_BUFFER else GATHER_BUFFER + 2 * diskio.ALIGN
        self._buf = torch.empty(0, dtype=torch.uint8)

    def allocate(self) -> None:
        self._buf = diskio.aligned_empty(self.size)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape) of the table: ``F.embedding(ids, table)``."""
        uniq, inverse = torch.unique(ids.flatten().cpu(), return_inverse=True)  # sorted
        out = torch.empty((len(uniq), self.width), dtype=self.meta.torch_dtype)
        rows = uniq.tolist()
        if rows and not 0 <= rows[0] <= rows[-1] < self.meta.shape[0]:
            raise IndexError(f"row {rows[-1] if rows[0] >= 0 else rows[0]} is outside {self.name}")
        whole = self.size == self.meta.padded_nbytes
        per_read = self.meta.shape[0] if whole else max(1, GATHER_BUFFER // self.row_bytes)
        rb, page = self.row_bytes, diskio.ALIGN
        file = self.store.path / self.meta.file
        fd, _ = diskio.open_for_read(file)
        try:
            start = 0
            while start < len(rows):
                end = start + 1  # a run of rows whose pages touch, read at once if it fits the buffer
                while (
                    end < len(rows)
                    and rows[end] * rb // page <= -(-(rows[end - 1] + 1) * rb // page)
                    and rows[end] - rows[start] < per_read
                ):
                    end += 1
                lo, hi = rows[start] * rb, (rows[end - 1] + 1) * rb
                first = lo - lo % page
                got = diskio.read_into(fd, self._buf, first, diskio.padded(hi - first))
                self.store.count_read(got)
                if got < hi - first:
                    raise CheckpointError(f"{file} is truncated; convert again")
                span = self._buf[lo - first : hi - first].view(out.dtype).view(-1, self.width)
                out[start:end] = span[torch.tensor(rows[start:end]) - rows[start]]
                start = end
        except OSError as exc:
            raise CheckpointError(f"cannot read {file}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        return out[inverse].view(*ids.shape, self.width)


def lookup(ids: torch.Tensor, table: torch.Tensor | RowTable) -> torch.Tensor:
    """Rows ``ids`` of ``table``, resident (a tensor) or read by rows from disk (a ``RowTable``)."""
    if isinstance(table, RowTable):
        return table.lookup(ids).to(ids.device)
    return F.embedding(ids, table)
