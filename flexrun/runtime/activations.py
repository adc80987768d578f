"""Hidden states between layers, per micro-batch, kept on the tier the placement gives each layer."""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path

import torch

from flexrun.config import OptConfig
from flexrun.placement import Shares
from flexrun.runtime.iopool import IOPool
from flexrun.runtime.tiers import Ledger
from flexrun.weights.store import TORCH_DTYPES


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
    ) -> None:
        on_cuda = device.type == "cuda"
        self.tiers = [t if on_cuda or t != "device" else "host" for t in shares.split(cfg.num_hidden_layers)]
        self.device = device
        self.pool = pool
        self.dtype = TORCH_DTYPES[cfg.run_dtype]
        self.workdir = workdir
        self._held: dict[int, torch.Tensor] = {}
        self._on_disk: dict[int, tuple[Future[None], torch.Size]] = {}
        nbytes = cfg.hidden_bytes(1, max_tokens)  # (b, s, h) of the largest micro-batch
        for tier in sorted(set(self.tiers)):
            ledger.add(tier, "activations", num_batches * nbytes)

    def put(self, i: int, j: int, x: torch.Tensor) -> None:
        tier = self.tiers[i]
        if tier == "disk":
            host = x.cpu() if x.device.type != "cpu" else x
            self._on_disk[j] = (self.pool.submit(self._write, j, host), x.shape)
        elif tier == "host" and x.device.type != "cpu":
            self._held[j] = x.to("cpu", non_blocking=False)
        else:
            self._held[j] = x

    def _write(self, j: int, x: torch.Tensor) -> None:
        data = memoryview(x.contiguous().view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        with open(self.workdir / f"act-{j}.bin", "wb") as f:
            f.write(data)

    def take(self, j: int) -> torch.Tensor:
        if j in self._on_disk:
            fut, shape = self._on_disk.pop(j)
            fut.result()
            path = self.workdir / f"act-{j}.bin"
            x = torch.empty(shape, dtype=self.dtype)
            with open(path, "rb") as f:
                f.readinto(memoryview(x.view(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
            os.unlink(path)
            return x.to(self.device)
        return self._held.pop(j).to(self.device)
