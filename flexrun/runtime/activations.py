"""Hidden states between layers, per micro-batch, kept on the tier the placement gives each layer.

Where the device's memory is apart from the host's (CUDA), a hidden state leaving the device is copied into a
page-locked host buffer of its micro-batch on the ``acts_out`` stream, after the layer that computed it, and
(on disk) written to a file on an I/O thread once that copy is done; it comes back on the ``acts_in`` stream,
the compute stream waiting on the copy's event. Taking micro-batch j starts bringing j + 1 in, so its copy
runs while j computes (``runtime.transfer``).
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from flexrun.config import OptConfig
from flexrun.placement import Shares
from flexrun.runtime.iopool import IOPool, done
from flexrun.runtime.tiers import Ledger
from flexrun.runtime.transfer import Event, Mover
from flexrun.weights.store import TORCH_DTYPES


@dataclass
class _Out:
    """A hidden state off the device: host rows (a view of its micro-batch's buffer), the event after which
    they hold it, and for the disk tier the write of them to a file."""

    host: torch.Tensor
    event: Event
    written: Future[None] | None = None


class ActivationStore:
    """``put(i, j, x)`` after layer ``i`` computed micro-batch ``j``; ``take(j)`` before the next layer."""

    def __init__(
        self,
        cfg: OptConfig,
        shares: Shares,
        device: torch.device,
        pool: IOPool,
        ledger: Ledger,
        workdir: Path,
        max_tokens: int,
        num_batches: int,
        mover: Mover | None = None,
    ) -> None:
        self.mover = mover or Mover(device)
        self.staged = self.mover.separate
        self.tiers = [t if self.staged or t != "device" else "host" for t in shares.split(cfg.num_hidden_layers)]
        self.device = device
        self.pool = pool
        self.dtype = TORCH_DTYPES[cfg.run_dtype]
        self.workdir = workdir
        self.num_batches = num_batches
        self._held: dict[int, torch.Tensor] = {}
        self._on_disk: dict[int, tuple[Future[None], torch.Size]] = {}
        self._out: dict[int, _Out] = {}  # staged: what left the device, by micro-batch
        self._coming: dict[int, Future[tuple[torch.Tensor, Event]]] = {}  # staged: on its way back in
        self._buffers: dict[int, torch.Tensor] = {}  # staged: each micro-batch's host buffer, made on first use
        self.nbytes = cfg.hidden_bytes(1, max_tokens)  # (b, s, h) of the largest micro-batch
        for tier in sorted(set(self.tiers)):
            ledger.add(tier, "activations", num_batches * self.nbytes)
        if self.staged and any(t != "device" for t in self.tiers):
            ledger.add("device", "activations in flight", self.nbytes)  # the next micro-batch's, prefetched

    def put(self, i: int, j: int, x: torch.Tensor) -> None:
        tier = self.tiers[i]
        if tier == "device" or (tier == "host" and not self.staged):
            self._held[j] = x
        elif self.staged:
            need = x.numel() * x.element_size()
            if j not in self._buffers or self._buffers[j].numel() < need:
                self._buffers[j] = self.mover.host_buffer(max(need, self.nbytes))
            host = self._buffers[j][:need].view(x.dtype).view(x.shape)
            out = _Out(host, self.mover.copy("acts_out", [(host, x)], [self.mover.mark()]))
            if tier == "disk":
                out.written = self.pool.submit(self._write, j, host, out.event)
            self._out[j] = out
        else:  # disk, on a CPU
            self._on_disk[j] = (self.pool.submit(self._write, j, x), x.shape)

    def _write(self, j: int, x: torch.Tensor, copied: Event = None) -> None:
        self.mover.sync(copied)
        data = memoryview(x.contiguous().view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        with open(self.workdir / f"act-{j}.bin", "wb") as f:
            f.write(data)

    def _read(self, j: int, into: torch.Tensor) -> torch.Tensor:
        path = self.workdir / f"act-{j}.bin"
        with open(path, "rb") as f:
            f.readinto(memoryview(into.view(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
        os.unlink(path)
        return into

    def take(self, j: int) -> torch.Tensor:
        if self.staged and (j in self._out or j in self._coming):
            x, event = (self._coming.pop(j) if j in self._coming else self._bring(j)).result()
            self.mover.wait(event)
            nxt = (j + 1) % self.num_batches
            if nxt in self._out and nxt not in self._coming:
                self._coming[nxt] = self._bring(nxt)
            return x
        if j in self._on_disk:
            fut, shape = self._on_disk.pop(j)
            fut.result()
            return self._read(j, torch.empty(shape, dtype=self.dtype)).to(self.device)
        return self._held.pop(j).to(self.device)

    def _bring(self, j: int) -> Future[tuple[torch.Tensor, Event]]:
        """Start copying micro-batch ``j``'s hidden state back to the device: (the device tensor, the event
        after which it holds it)."""
        out = self._out.pop(j)
        x = torch.empty(out.host.shape, dtype=out.host.dtype, device=self.device)
        if out.written is None:
            return done((x, self.mover.copy("acts_in", [(x, out.host)], [out.event])))

        def load() -> tuple[torch.Tensor, Event]:
            assert out.written is not None
            out.written.result()
            return x, self.mover.copy("acts_in", [(x, self._read(j, out.host))])

        return self.pool.submit(load)
