"""The KV cache, placed per layer on a tier, stored position-major in its format's rows: (max_len, b, ...)
for K and for V.

Row ``t`` holds every sequence's key (value) at position ``t``, so appending a token is one contiguous
write and reading positions [0, t) is one contiguous read, in memory and on disk alike. Each (layer,
micro-batch) has one slot sized for the largest micro-batch; a smaller micro-batch uses a prefix of it.
What a row holds is the format's business (``runtime.kvformat``): the cache moves rows as bytes.
Disk slots are files in the offload dir, read with O_DIRECT into two reusable staging buffers so that
the next micro-batch's cache loads while this one computes. A layer with a sliding window shorter than the
run keeps on disk only a ring of the last ``window`` rows (row t at t mod the ring's rows), read whole and
put back in place in the staging buffer; the staging rows before the window keep another slot's (finite)
values, which the window's mask hides.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path

import torch

from flexrun import diskio
from flexrun.errors import PlacementError
from flexrun.placement import Shares
from flexrun.runtime.iopool import IOPool, done
from flexrun.runtime.kvformat import KVFormat
from flexrun.runtime.tiers import Ledger

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
    ) -> None:
        """``windows``: each layer's attention window (0: global): a disk layer whose window is shorter than
        ``max_len`` stores only a ring of it."""
        self.fmt = fmt
        self.device = device
        self.pool = pool
        self.max_len = max_len
        self.dtype = fmt.dtype
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
        if any(self.ring):  # a ring read whole, then its rows put in place
            ledger.add("host", "kv ring buffers", 4 * max(self.ring))
        # Staging: host buffers for disk slots; on CUDA also device buffers for host and disk slots.
        self._needs_host_staging = any(t == "disk" for t in self.tiers)
        self._needs_gpu_staging = on_cuda and any(t != "device" for t in self.tiers)
        if self._needs_host_staging:
            ledger.add("host", "kv staging", 4 * diskio.padded(self.slot_bytes))
        if self._needs_gpu_staging:
            ledger.add("device", "kv staging", 4 * self.slot_bytes)
        self._host_stage: list[KV] = []
        self._ring_stage: list[KV] = []
        self._gpu_stage: list[KV] = []
        self._stage_pending: list[Future[None] | None] = [None, None]
        self._turn = 0

    def allocate(self) -> None:
        """Create the cache tensors, files and staging buffers (after the budgets were checked)."""
        pin = self.device.type == "cuda"
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
                else:
                    dev = self.device if tier == "device" else torch.device("cpu")
                    k = torch.zeros(self.slot_elems, dtype=self.dtype, device=dev)
                    v = torch.zeros(self.slot_elems, dtype=self.dtype, device=dev)
                    self._resident[(i, j)] = (k, v)
        if self._needs_host_staging:
            size = diskio.padded(self.slot_bytes)
            # Zeroed once: rows a windowed read skips must hold finite values (masked, they weigh 0).
            self._host_stage = [
                (diskio.aligned_empty(size, pin=pin).zero_(), diskio.aligned_empty(size, pin=pin).zero_())
                for _ in range(2)
            ]
        if any(self.ring):
            size = max(self.ring)
            self._ring_stage = [(diskio.aligned_empty(size), diskio.aligned_empty(size)) for _ in range(2)]
        if self._needs_gpu_staging:
            self._gpu_stage = [
                tuple(torch.empty(self.slot_elems, dtype=self.dtype, device=self.device) for _ in range(2))  # type: ignore[misc]
                for _ in range(2)
            ]

    def _shape(self, flat: torch.Tensor, b: int) -> torch.Tensor:
        return self.fmt.slot(flat, self.max_len, b)

    def _host_view(self, buf: torch.Tensor, b: int) -> torch.Tensor:
        return self._shape(buf[: self.slot_bytes].view(self.dtype), b)

    def fetch(self, i: int, j: int, b: int, length: int, window: int = 0) -> Future[tuple[KV, int]]:
        """Start making layer ``i``/micro-batch ``j``'s cache available on the compute device, with rows
        [0, length) valid, or, from a disk ring, with a ``window`` only rows [length - window + 1, length), the
        ones a query at ``length`` sees. The result is ((k, v), staging turn), each a slot of the format's (max_len, b, ...)."""
        tier = self.tiers[i]
        if tier == "device" or (tier == "host" and self.device.type == "cpu"):
            k, v = self._resident[(i, j)]
            return done(((self._shape(k, b), self._shape(v, b)), -1))
        turn = self._turn
        self._turn ^= 1
        return self.pool.submit(self._fetch, i, j, b, length, turn, window)

    def _fetch(self, i: int, j: int, b: int, length: int, turn: int, window: int = 0) -> tuple[KV, int]:
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
        if self.device.type == "cpu":
            return src, turn
        gk, gv = self._gpu_stage[turn]
        dst = (self._shape(gk, b), self._shape(gv, b))
        if length:
            dst[0][:length].copy_(src[0][:length])
            dst[1][:length].copy_(src[1][:length])
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
        """Persist rows [start, end) that the layer wrote into the fetched buffers ``kv``."""
        tier = self.tiers[i]
        if tier == "device" or (tier == "host" and self.device.type == "cpu"):
            return
        rows = (
            (kv[0][start:end].cpu(), kv[1][start:end].cpu())
            if self.device.type == "cuda"
            else (kv[0][start:end], kv[1][start:end])
        )
        if tier == "host":
            k, v = self._resident[(i, j)]
            b = kv[0].shape[1]
            self._shape(k, b)[start:end].copy_(rows[0])
            self._shape(v, b)[start:end].copy_(rows[1])
            return
        fut = self.pool.submit(self._write, i, j, rows, start)
        self._file_pending[(i, j)] = fut
        self._stage_pending[turn] = fut

    def _write(self, i: int, j: int, rows: KV, start: int) -> None:
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
