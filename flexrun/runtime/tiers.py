"""Memory tiers and their budgets, and the compute device.

On a machine without CUDA the compute device is the CPU and the ``device`` tier *is* host RAM: shares
placed on ``device`` are held in host memory and count against the host budget, and nothing is copied
between the two.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexrun.errors import BudgetError, PlacementError
from flexrun.memlimits import process_memory
from flexrun.units import format_bytes

log = logging.getLogger(__name__)


def compute_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class Budgets:
    """Bytes flexrun may hold on each tier (``None``: what the process may still take)."""

    device: int | None = None
    host: int | None = None
    disk: int | None = None

    def resolved(self, offload_dir: Path, has_cuda: bool) -> dict[str, int]:
        """Concrete budgets: unset tiers get 90% of what is free now (host: what the machine has available and
        the process's cgroup and rlimits leave, ``flexrun.memlimits``; device: the GPU's free memory).

        Raises BudgetError when an explicit host budget exceeds the process's hard memory limit (a cgroup's
        or an rlimit): the kernel would kill the run once it held that much.
        """
        host = self.host_budget()[0]
        if has_cuda:
            device = self.device if self.device is not None else int(torch.cuda.mem_get_info()[0] * 0.9)
        else:
            if self.device is not None:
                log.info("no CUDA device: the device tier is host RAM, --device-mem is ignored")
            device = 0
        free_disk = disk_free(offload_dir)
        disk = min(self.disk, free_disk) if self.disk is not None else free_disk
        return {"device": device, "host": host, "disk": disk}

    def host_budget(self) -> tuple[int, str]:
        """(host budget in bytes, where it comes from): the explicit one, checked against the hard limit, or
        90% of what the tightest bound on this process leaves."""
        mem = process_memory()
        if self.host is not None:
            hard = mem.hard_limit
            if hard is not None and hard.limit is not None and self.host > hard.limit:
                raise BudgetError(
                    f"--host-mem {format_bytes(self.host)} exceeds this process's memory limit "
                    f"{format_bytes(hard.limit)} ({hard.source}): the kernel would kill the run; "
                    f"give at most {format_bytes(int(mem.available * 0.9))} or leave --host-mem unset",
                    "host",
                    self.host,
                    hard.limit,
                )
            return self.host, "--host-mem"
        return int(mem.available * 0.9), f"90% of what {mem.source} leaves"


@dataclass
class Ledger:
    """What the runtime plans to hold on each tier, by purpose; checked against the budgets up front."""

    items: dict[str, dict[str, int]] = field(default_factory=lambda: {"device": {}, "host": {}, "disk": {}})

    def add(self, tier: str, what: str, nbytes: int) -> None:
        self.items[tier][what] = self.items[tier].get(what, 0) + int(nbytes)

    def fold_device_into_host(self) -> None:
        """Without CUDA the device tier is host RAM: count what was planned for it against the host."""
        self.items["host"].update({f"{k} (device)": v for k, v in self.items.pop("device").items()})
        self.items["device"] = {}

    def total(self, tier: str) -> int:
        return sum(self.items[tier].values())

    def check(self, budgets: dict[str, int], offload_dir: Path | None = None) -> None:
        """Raise PlacementError naming the first tier whose planned use exceeds its budget, and by how much.

        Run before anything is allocated or generated, so a job never starts without room for its disk share.
        """
        for tier in ("device", "host", "disk"):
            need, have = self.total(tier), budgets[tier]
            if need > have:
                parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.items[tier].items() if v)
                fix = f"move shares off {tier} or raise --{tier}-mem"
                if tier == "disk" and offload_dir is not None:
                    free = disk_free(offload_dir)
                    if free <= have:
                        fix = f"the offload dir {offload_dir} has {format_bytes(free)} free: move shares off disk or "
                        fix += "point --offload-dir at a disk with room"
                raise BudgetError(
                    f"placement does not fit: the {tier} tier needs {format_bytes(need)} ({parts}) but its budget is "
                    f"{format_bytes(have)}, short by {format_bytes(need - have)}; {fix}",
                    tier,
                    need,
                    have,
                )


def make_workdir(root: Path, prefix: str) -> Path:
    """A fresh temporary directory under the offload root ``root`` for one run's disk-resident tensors."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    except OSError as exc:
        raise PlacementError(f"offload dir {root} is not usable: {exc.strerror}") from None


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) ``path``."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
