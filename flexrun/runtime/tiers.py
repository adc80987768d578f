"""Memory tiers and their budgets, and the compute device.

On a machine without CUDA the compute device is the CPU and the ``device`` tier *is* host RAM: shares
placed on ``device`` are held in host memory and count against the host budget, and nothing is copied
between the two.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexrun.errors import BudgetError, PlacementError
from flexrun.memlimits import ProcessMemory, process_memory
from flexrun.units import format_bytes

log = logging.getLogger(__name__)


def compute_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# Resident memory a run adds beyond the buffers its ledger plans once it computes: shared libraries the first
# kernels page in (oneDNN, OpenMP), thread stacks, the allocator's slack and per-op temporaries the ledger
# does not name. Measured over OPT-125M and OPT-1.3B bf16 runs on a CPU (issue 25, benchmarks/README.md).
RUNTIME_RSS = 48 << 20
# The share of what is free that an unset budget takes: room for the kernel's own memory and estimate error.
FREE_SHARE = 0.9

MemGetInfo = Callable[[], tuple[int, int]]


@dataclass(frozen=True)
class HostBudget:
    """The host tier's budget: the bytes flexrun's buffers may take (what the ledger is checked against),
    the process's baseline beside them, and where the figure comes from."""

    buffers: int
    baseline: int  # resident memory before any buffer (interpreter, libraries; measured) + RUNTIME_RSS
    source: str

    @property
    def peak(self) -> int:
        """The most the process's resident memory may reach under this budget."""
        return self.baseline + self.buffers


@dataclass(frozen=True)
class Budgets:
    """Bytes flexrun may hold on each tier (``None``: what the process may still take).

    ``ranks`` tensor-parallel ranks on this machine share its host memory (and a cgroup's limit) and the
    offload dir's disk: each budget is then one rank's equal part, of the flag's figure or of what is free
    (a device budget is not divided: each rank has its own GPU). ``memory`` and ``free_disk``, when set,
    are what was free when the ranks took their parts together (``shared``), before any of them allocated.
    """

    device: int | None = None
    host: int | None = None
    disk: int | None = None
    ranks: int = 1
    memory: ProcessMemory | None = None
    free_disk: int | None = None

    def shared(self, ranks: int, offload_dir: Path) -> Budgets:
        """These budgets as one of ``ranks`` local ranks' parts, with what is free read now (every rank reads
        at the same moment, before any allocates, so no rank's part is taken from what another holds)."""
        return dataclasses.replace(self, ranks=ranks, memory=process_memory(), free_disk=disk_free(offload_dir))

    def _part(self, what: str, figure: int | None = None) -> str:
        """Where a budget comes from: ``what``, or one rank's part of it (of ``figure`` bytes, a flag's)."""
        if self.ranks == 1:
            return what
        whole = f"{what} {format_bytes(figure)}" if figure is not None else what
        return f"1/{self.ranks} of {whole}, one of {self.ranks} local ranks' part"

    def resolved(self, offload_dir: Path, has_cuda: bool) -> dict[str, int]:
        """Concrete budgets (``described``'s bytes)."""
        return self.described(offload_dir, has_cuda)[0]

    def described(
        self, offload_dir: Path, has_cuda: bool, mem_get_info: MemGetInfo | None = None
    ) -> tuple[dict[str, int], dict[str, str]]:
        """Concrete budgets and where each comes from. Unset tiers get 90% of what is free now: host, what
        the machine, the process's cgroup and its rlimits leave it (``host_budget``); device, the free memory
        the CUDA driver reports (``mem_get_info``, ``torch.cuda.mem_get_info`` by default); disk, the offload
        dir's filesystem's free space. Host and disk are then one of ``ranks``' parts.

        Raises BudgetError when an explicit host budget exceeds the process's hard memory limit (a cgroup's
        or an rlimit): the kernel would kill the run once it held that much.
        """
        host = self.host_budget()
        device, device_from = self.device_budget(has_cuda, mem_get_info)
        free_disk = self.free_disk if self.free_disk is not None else disk_free(offload_dir)
        free_from = f"free space under {offload_dir}"
        if self.disk is None:
            disk, disk_from = free_disk // self.ranks, self._part(free_from)
        elif self.disk <= free_disk:
            disk, disk_from = self.disk // self.ranks, self._part("--disk-mem", self.disk)
        else:
            disk, disk_from = free_disk // self.ranks, self._part(f"{free_from} (< --disk-mem)")
        sizes = {"device": device, "host": host.buffers, "disk": disk}
        return sizes, {"device": device_from, "host": host.source, "disk": disk_from}

    def device_budget(self, has_cuda: bool, mem_get_info: MemGetInfo | None = None) -> tuple[int, str]:
        """(device budget in bytes, where it comes from): the explicit one, or 90% of the free memory the
        driver reports (not the card's total: another process or a MIG slice may hold the rest); 0 without
        CUDA, where the device tier is host RAM."""
        if not has_cuda:
            if self.device is not None:
                log.info("no CUDA device: the device tier is host RAM, --device-mem is ignored")
            return 0, "no CUDA device: the device tier is host RAM"
        if self.device is not None:
            return self.device, "--device-mem"
        free, total = (mem_get_info or torch.cuda.mem_get_info)()
        share = f"{int(FREE_SHARE * 100)}%"
        return int(
            free * FREE_SHARE
        ), f"{share} of the free memory CUDA reports ({format_bytes(free)} of {format_bytes(total)})"

    def host_budget(self) -> HostBudget:
        """The host budget: the explicit one (flexrun's buffers; with the baseline, checked against the hard
        limit), or 90% of what the tightest bound lets this process hold, less its baseline; one of
        ``ranks``' parts of either."""
        mem = self.memory or process_memory()
        baseline = mem.resident + RUNTIME_RSS
        may_hold = mem.may_hold if self.ranks == 1 else mem.share(self.ranks)
        total = int(may_hold * FREE_SHARE)
        if self.host is not None:
            host = self.host // self.ranks
            hard = mem.hard_limit
            whole = hard.limit if hard is not None else None
            limit = None if hard is None or whole is None else whole // (1 if hard.per_process else self.ranks)
            if hard is not None and whole is not None and limit is not None and host + baseline > limit:
                share = "" if limit == whole else f" (1/{self.ranks} of {format_bytes(whole)} for each local rank)"
                raise BudgetError(
                    f"--host-mem {format_bytes(host)}{'' if self.ranks == 1 else ' per rank'} and this process's "
                    f"baseline {format_bytes(baseline)} (interpreter, libraries) exceed its memory limit "
                    f"{format_bytes(limit)}{share} ({hard.source}): "
                    f"the kernel would kill the run; give at most "
                    f"{format_bytes(max(total - baseline, 0) * self.ranks)} or leave --host-mem unset",
                    "host",
                    host + baseline,
                    limit,
                )
            return HostBudget(host, baseline, self._part("--host-mem", self.host))
        holds = "this process may hold" if self.ranks == 1 else f"each of {self.ranks} local ranks may hold"
        source = (
            f"{int(FREE_SHARE * 100)}% of the {format_bytes(may_hold)} {holds} ({mem.source}), "
            f"less its baseline {format_bytes(baseline)}"
        )
        return HostBudget(max(total - baseline, 0), baseline, source)


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

    def check(
        self, budgets: dict[str, int], offload_dir: Path | None = None, sources: dict[str, str] | None = None
    ) -> None:
        """Raise PlacementError naming the first tier whose planned use exceeds its budget, and by how much
        (and where a budget that is a tensor-parallel rank's part comes from, given ``sources``).

        Run before anything is allocated or generated, so a job never starts without room for its disk share.
        """
        for tier in ("device", "host", "disk"):
            need, have = self.total(tier), budgets[tier]
            if need > have:
                parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.items[tier].items() if v)
                source = (sources or {}).get(tier, "")
                part = f" ({source})" if "local ranks" in source else ""
                raise BudgetError(
                    f"placement does not fit: the {tier} tier needs {format_bytes(need)} ({parts}) but its budget is "
                    f"{format_bytes(have)}{part}, short by {format_bytes(need - have)}; "
                    f"{budget_fix(tier, have, offload_dir)}",
                    tier,
                    need,
                    have,
                )


def ranks_note(ranks: int) -> str:
    """What a refusal naming budgets adds when they are one of ``ranks`` local ranks' parts."""
    if ranks == 1:
        return ""
    return (
        f"; these budgets are each one of {ranks} local tensor-parallel ranks' part: --host-mem and --disk-mem "
        f"give the machine's, {ranks}x a rank's"
    )


def budget_fix(tier: str, have: int, offload_dir: Path | None = None) -> str:
    """What to do about a ``tier`` budget of ``have`` bytes that a placement exceeds: a disk budget that is
    the offload dir's free space is raised by another disk, any other by its flag."""
    if tier == "disk" and offload_dir is not None:
        free = disk_free(offload_dir)
        if free <= have:
            return (
                f"the offload dir {offload_dir} has {format_bytes(free)} free: move shares off disk or "
                "point --offload-dir at a disk with room"
            )
    return f"move shares off {tier} or raise --{tier}-mem"


# A run's workdir holds this file locked while the run lives: one whose lock can be taken was left by a run
# that was killed (SIGKILL, the kernel's OOM killer, a lost machine), and the next run removes it.
WORKDIR_LOCK = ".flexrun-run.lock"
_held: dict[Path, int] = {}  # this process's workdirs: the descriptor holding each one's lock


def make_workdir(root: Path, prefix: str) -> Path:
    """A fresh temporary directory under the offload root ``root`` for one run's disk-resident tensors, locked
    while this process holds it (``release_workdir`` removes it); the workdirs of killed runs are removed first."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        sweep_stale_workdirs(root)
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        # Locked under another name, then renamed: a sweep never sees the lock file unlocked.
        fd = os.open(path / f"{WORKDIR_LOCK}.new", os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as exc:
        raise PlacementError(f"offload dir {root} is not usable: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(path / f"{WORKDIR_LOCK}.new", path / WORKDIR_LOCK)
    except OSError:  # a filesystem without locks: the dir is still this run's, it is just not swept if killed
        log.debug("cannot lock %s; it will not be swept if this run is killed", path)
    _held[path] = fd
    return path


def release_workdir(path: Path) -> None:
    """Remove a workdir ``make_workdir`` made, and let go of its lock."""
    shutil.rmtree(path, ignore_errors=True)
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def sweep_stale_workdirs(root: Path) -> int:
    """Remove the workdirs under ``root`` that runs now dead left behind (their lock is free); returns the bytes
    freed. A directory without flexrun's lock file is never touched, nor one a live run (of any process,
    another container's included, where the filesystem shares locks) holds."""
    freed, dirs = 0, 0
    for lock in root.glob(f"*/{WORKDIR_LOCK}"):
        path = lock.parent
        if path in _held:
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: the run is alive
            os.close(fd)
            continue
        try:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        if not path.exists():
            freed, dirs = freed + size, dirs + 1
    if dirs:
        log.warning("removed %d offload dir(s) that killed runs left in %s (%s)", dirs, root, format_bytes(freed))
    return freed


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) ``path``."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
