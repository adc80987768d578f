"""The KV cache, placed per layer on a tier, stored position-major in its format's rows: (max_len, b, ...)
for K and for V.

Row ``t`` holds every sequence's key (value) at position ``t``, so appending a token is one contiguous
write and reading positions [0, t) is one contiguous read, in memory and on disk alike. Each (layer,
micro-batch) has one slot sized for the largest micro-batch; a smaller micro-batch uses a prefix of it.
What a row holds is the format's business (``runtime.kvformat``): the cache moves rows as bytes.
Disk slots are files in the offload dir, read with O_DIRECT into reusable staging buffers so that
the next micro-batches' cache loads while this one computes: on a CPU every micro-batch of a layer at once
(``layout.kv_stage_depth``), two on CUDA. A layer with a sliding window shorter than the
run keeps on disk only a ring of the last ``window`` rows (row t at t mod the ring's rows), read whole and
put back in place in the staging buffer; the staging rows before the window keep another slot's (finite)
values, which the window's mask hides.

On CUDA a host or disk layer's slot is staged into one of two device buffers for attention: its rows copied in
on the ``cache_in`` stream after the compute that last read that buffer, the new rows copied out on the
``cache_out`` stream after the layer that wrote them (``runtime.transfer``). With host-side attention
(``host_attention``, FlexGen's ``cpu_cache_compute``) a host or disk layer's decode attention runs on the CPU
over the host copy instead, and nothing of the cache crosses to the device: ``attends_on_host`` says where. A
prefill (nothing cached yet) is still staged and attended on the device, as FlexGen does.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path

import torch

from flexrun import diskio
from flexrun.errors import PlacementError
from flexrun.layout import kv_stage_depth
from flexrun.placement import Shares
from flexrun.runtime.iopool import IOPool, done
from flexrun.runtime.kvformat import KVFormat
from flexrun.runtime.tiers import Ledger
from flexrun.runtime.transfer import Event, Mover

KV = tuple[torch.Tensor, torch.Tensor]


class KVCache:
    def __init__(
        self,
        fmt: KVFormat,
        num_layers: int,
        shares: Shares,
        device: torch.device,
        pool: IOPool,
        ledger: Ledger,
        workdir: Path,
        max_len: int,
        max_batch: int,
        num_batches: int,
        windows: list[int] | None = None,
        mover: Mover | None = None,
        host_attention: bool = False,
    ) -> None:
        """``windows``: each layer's attention window (0: global): a disk layer whose window is shorter than
        ``max_len`` stores only a ring of it. ``host_attention``: decode attention over a host or disk layer's
        cache runs on the host."""
        self.fmt = fmt
        self.device = device
        self.pool = pool
        self.max_len = max_len
        self.dtype = fmt.dtype
        self.mover = mover or Mover(device)
        self.staged = self.mover.separate  # the device's memory is apart from the host's: stage through it
        self.host_attention = host_attention
        self._last_store: Event = None  # the latest copy out on the cache_out stream
        on_cuda = device.type == "cuda"
        self.tiers = [t if on_cuda or t != "device" else "host" for t in shares.split(num_layers)]
        self.slot_elems = max_len * fmt.row_elems(max_batch)
        self.slot_bytes = max_len * fmt.row_bytes(max_batch)
        self._resident: dict[tuple[int, int], KV] = {}
        self._files: dict[tuple[int, int], Path] = {}
        self._file_pending: dict[tuple[int, int], Future[None]] = {}
        self.bytes_read = 0
        self.bytes_written = 0
        self.workdir = workdir
        self.num_batches = num_batches
        # Bytes of K's (and V's) region of a disk slot: the whole slot, or a ring of pages holding the window.
        wins = windows or [0] * num_layers
        self.ring = [
            diskio.padded(w * fmt.row_bytes(max_batch)) if t == "disk" and 0 < w < max_len else 0
            for w, t in zip(wins, self.tiers, strict=True)
        ]
        self.region = [r or diskio.padded(self.slot_bytes) for r in self.ring]
        for i, tier in enumerate(self.tiers):
            size = 2 * (self.region[i] if tier == "disk" else self.slot_bytes)
            ledger.add(tier, "kv cache", num_batches * size)
        # Staging turns: each holds one micro-batch's K and V of one layer (``depth - 1`` reads in flight).
        self.depth = kv_stage_depth(num_batches, diskio.padded(self.slot_bytes), not self.staged)
        if any(self.ring):  # a ring read whole, then its rows put in place
            ledger.add("host", "kv ring buffers", 2 * self.depth * max(self.ring))
        # Staging: host buffers for disk slots; on CUDA also device buffers for host and disk slots.
        self._needs_host_staging = any(t == "disk" for t in self.tiers)
        self._needs_gpu_staging = self.staged and any(t != "device" for t in self.tiers)
        if self._needs_host_staging:
            ledger.add("host", "kv staging", 2 * self.depth * diskio.padded(self.slot_bytes))
        if self._needs_gpu_staging:
            ledger.add("device", "kv staging", 2 * self.depth * self.slot_bytes)
        self._host_stage: list[KV] = []
        self._ring_stage: list[KV] = []
        self._gpu_stage: list[KV] = []
        self._stage_pending: list[Future[None] | None] = [None] * self.depth
        self._turn = 0

    def allocate(self) -> None:
        """Create the cache tensors, files and staging buffers (after the budgets were checked)."""
        for i, tier in enumerate(self.tiers):
            for j in range(self.num_batches):
                if tier == "disk":
                    path = self.workdir / f"kv-{i}-{j}.bin"
                    try:
                        with open(path, "wb") as f:
                            f.truncate(2 * self.region[i])
                    except OSError as exc:
                        raise PlacementError(
                            f"cannot create KV cache files in {self.workdir}: {exc.strerror}"
                        ) from None
                    self._files[(i, j)] = path
                elif tier == "device":
                    k = torch.zeros(self.slot_elems, dtype=self.dtype, device=self.device)
                    self._resident[(i, j)] = (k, torch.zeros_like(k))
                else:  # page-locked on CUDA: copied to and from the device asynchronously
                    host = self.mover.host_zeros
                    self._resident[(i, j)] = (host(self.slot_elems, self.dtype), host(self.slot_elems, self.dtype))
        if self._needs_host_staging:
            size = diskio.padded(self.slot_bytes)
            # Zeroed once: rows a windowed read skips must hold finite values (masked, they weigh 0).
            buf = self.mover.host_buffer
            self._host_stage = [(buf(size).zero_(), buf(size).zero_()) for _ in range(self.depth)]
        if any(self.ring):
            size = max(self.ring)
            self._ring_stage = [(diskio.aligned_empty(size), diskio.aligned_empty(size)) for _ in range(self.depth)]
        if self._needs_gpu_staging:
            self._gpu_stage = [
                tuple(torch.empty(self.slot_elems, dtype=self.dtype, device=self.device) for _ in range(2))  # type: ignore[misc]
                for _ in range(self.depth)
            ]

    def _shape(self, flat: torch.Tensor, b: int) -> torch.Tensor:
        return self.fmt.slot(flat, self.max_len, b)

    def _host_view(self, buf: torch.Tensor, b: int) -> torch.Tensor:
        return self._shape(buf[: self.slot_bytes].view(self.dtype), b)

    def attends_on_host(self, i: int, length: int) -> bool:
        """Whether layer ``i``'s attention after ``length`` cached positions runs on the host over the host copy
        of its cache (host-side attention in decode), rather than where the layer computes."""
        return self.host_attention and self.tiers[i] != "device" and length > 0

    def fetch(self, i: int, j: int, b: int, length: int, window: int = 0) -> Future[tuple[KV, int]]:
        """Start making layer ``i``/micro-batch ``j``'s cache available where its attention runs (the compute
        device, or the host: ``attends_on_host``), with rows [0, length) valid, or, from a disk ring, with a
        ``window`` only rows [length - window + 1, length), the ones a query at ``length`` sees. The result is
        ((k, v), staging turn), each a slot of the format's (max_len, b, ...); turn -1: the resident slot itself."""
        tier = self.tiers[i]
        on_host = not self.staged or self.attends_on_host(i, length)
        if tier == "device" or (tier == "host" and on_host):
            if tier == "host" and self._last_store is not None:  # the host slot's rows copied out must be in
                self.mover.sync(self._last_store)
                self._last_store = None
            k, v = self._resident[(i, j)]
            return done(((self._shape(k, b), self._shape(v, b)), -1))
        turn = self._turn
        self._turn = (turn + 1) % self.depth
        # The device buffer of this turn was last read by compute enqueued before now, and last copied out
        # by the latest store: the copy in waits for both.
        after = (self.mover.mark(), self._last_store) if self.staged and not on_host else ()
        return self.pool.submit(self._fetch, i, j, b, length, turn, window, after)

    def _fetch(
        self, i: int, j: int, b: int, length: int, turn: int, window: int = 0, after: tuple[Event, ...] = ()
    ) -> tuple[KV, int]:
        pending = self._stage_pending[turn]
        if pending is not None:
            pending.result()
        if self.tiers[i] == "disk":
            file_pending = self._file_pending.get((i, j))
            if file_pending is not None:
                file_pending.result()
            hk, hv = self._host_stage[turn]
            nbytes = diskio.padded(length * self.fmt.row_bytes(b))
            if length and self.ring[i]:
                self._read_ring(i, j, b, length, window, turn)
            elif length:
                fd, _ = diskio.open_for_read(self._files[(i, j)])
                try:
                    diskio.read_into(fd, hk, 0, nbytes)
                    diskio.read_into(fd, hv, self.region[i], nbytes)
                finally:
                    os.close(fd)
                self.bytes_read += 2 * nbytes
            src = (self._host_view(hk, b), self._host_view(hv, b))
        else:
            k, v = self._resident[(i, j)]
            src = (self._shape(k, b), self._shape(v, b))
        if not self.staged or self.attends_on_host(i, length):
            return src, turn
        gk, gv = self._gpu_stage[turn]
        dst = (self._shape(gk, b), self._shape(gv, b))
        if length:
            pairs = [(dst[0][:length], src[0][:length]), (dst[1][:length], src[1][:length])]
            # Waited for here, on the I/O thread: the caller's compute starts once its cache is in.
            self.mover.sync(self.mover.copy("cache_in", pairs, after))
        return dst, turn

    def _read_ring(self, i: int, j: int, b: int, length: int, window: int, turn: int) -> None:
        """Layer ``i``'s ring: read whole, the rows a query at ``length`` sees put at their places in staging."""
        row, size = self.fmt.row_bytes(b), self.ring[i]
        rows = size // row
        lo = max(0, length - (window or rows) + 1)
        at = torch.arange(lo, length) % rows  # where each needed row sits in the ring
        fd, _ = diskio.open_for_read(self._files[(i, j)])
        try:
            for region, (ring, stage) in enumerate(zip(self._ring_stage[turn], self._host_stage[turn], strict=True)):
                diskio.read_into(fd, ring, region * size, size)
                stage[lo * row : length * row].view(-1, row).copy_(ring[: rows * row].view(rows, row)[at])
        finally:
            os.close(fd)
        self.bytes_read += 2 * size

    def store(self, i: int, j: int, kv: KV, turn: int, start: int, end: int) -> None:
        """Persist rows [start, end) that the layer wrote into the fetched buffers ``kv`` (``start``: the
        ``length`` they were fetched with)."""
        if turn < 0:  # the resident slot itself was written
            return
        b = kv[0].shape[1]
        rows = (kv[0][start:end], kv[1][start:end])
        copied: Event = None
        if self.staged and not self.attends_on_host(i, start):  # rows in a device buffer: copy them out
            if self.tiers[i] == "host":
                k, v = self._resident[(i, j)]
                dst = (self._shape(k, b)[start:end], self._shape(v, b)[start:end])
            else:  # into the host staging rows they were fetched through, then to disk
                hk, hv = self._host_stage[turn]
                dst = (self._host_view(hk, b)[start:end], self._host_view(hv, b)[start:end])
            copied = self._last_store = self.mover.copy("cache_out", zip(dst, rows, strict=True), [self.mover.mark()])
            rows = dst
            if self.tiers[i] == "host":
                return
        fut = self.pool.submit(self._write, i, j, rows, start, copied)
        self._file_pending[(i, j)] = fut
        self._stage_pending[turn] = fut

    def _write(self, i: int, j: int, rows: KV, start: int, copied: Event = None) -> None:
        self.mover.sync(copied)  # the rows copied out of the device are in host memory
        row_bytes = self.fmt.row_bytes(rows[0].shape[1])
        ring = self.ring[i] // row_bytes  # rows a ring holds; 0: the whole slot, row t at row t
        if ring and len(rows[0]) > ring:  # only the last ``ring`` rows can be seen again
            start += len(rows[0]) - ring
            rows = (rows[0][-ring:], rows[1][-ring:])
        fd = os.open(self._files[(i, j)], os.O_WRONLY)
        try:
            for region, t in enumerate(rows):
                data = memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
                base, first = region * self.region[i], start % ring if ring else start
                split = (ring - first if ring else len(t)) * row_bytes  # a ring's write may wrap round
                os.pwrite(fd, data[:split], base + first * row_bytes)
                if len(data) > split:
                    os.pwrite(fd, data[split:], base)
                self.bytes_written += len(data)
        finally:
            os.close(fd)

    def flush(self) -> None:
        for fut in self._file_pending.values():
            fut.result()
