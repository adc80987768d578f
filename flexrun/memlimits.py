"""How much memory this process may use: the machine's available memory, and the limits it runs under.

A container, a Kubernetes pod, systemd's ``MemoryMax`` or a Slurm job put the process in a memory cgroup
whose limit is usually far below the machine's RAM; going over it gets the process killed by the kernel
(SIGKILL, exit 137) with no message. ``process_memory()`` reads every bound that applies and names the
tightest, so budgets derived from it fit where the process really lives:

- the machine: ``MemAvailable`` (psutil);
- cgroup v2: ``memory.max`` minus ``memory.current`` of the process's cgroup and of each ancestor (a
  parent may hold the limit), from ``/proc/self/cgroup``'s ``0::`` line, under wherever
  ``/proc/self/mountinfo`` says the hierarchy is mounted (v1's memory controller likewise);
- cgroup v1: ``memory.limit_in_bytes`` minus ``memory.usage_in_bytes`` of the ``memory`` controller's
  cgroup and its ancestors (the huge "unlimited" value is no limit);
- ``RLIMIT_AS`` / ``RLIMIT_DATA`` minus the address space / data segment already in use.

A cgroup's usage counts the page cache its processes brought in; the inactive part of it
(``inactive_file``, v1 ``total_inactive_file``) is reclaimed before the kernel kills anything, so it is
subtracted from usage, as docker and the kubelet do. The roots of ``/sys`` and ``/proc`` are arguments so
tests can fake them.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flexrun.units import format_bytes

# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit number; anything this big is none.
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class MemoryBound:
    """One bound on the process's memory: where it comes from, its hard limit, and what is left under it now."""

    source: str  # e.g. "cgroup v1 /sys/fs/cgroup/memory/foo memory.limit_in_bytes"
    limit: int | None  # the hard cap in bytes (None: the machine's available memory, not a cap)
    available: int  # bytes the process may still take under this bound
    per_process: bool = False  # each process has its own (an rlimit); else processes on the machine share it

    def describe(self) -> str:
        if self.limit is None:
            return self.source
        return f"{self.source} {format_bytes(self.limit)}"


@dataclass(frozen=True)
class ProcessMemory:
    """Every bound found on this process's memory; the tightest decides."""

    machine_total: int
    bounds: tuple[MemoryBound, ...]
    resident: int = 0  # this process's resident memory when the bounds were read (VmRSS)

    @property
    def tightest(self) -> MemoryBound:
        return min(self.bounds, key=lambda b: b.available)

    @property
    def available(self) -> int:
        """Bytes this process may still take now."""
        return max(self.tightest.available, 0)

    @property
    def may_hold(self) -> int:
        """Bytes this process may hold in all: what it holds now plus what it may still take, at most the
        tightest bound's hard limit (shared libraries it maps may be charged to another cgroup)."""
        held, limit = self.available + self.resident, self.tightest.limit
        return held if limit is None else min(held, limit)

    def share(self, ranks: int) -> int:
        """Bytes one of ``ranks`` like processes on this machine may hold (tensor-parallel ranks started together):
        its own resident memory plus an equal part of what a shared bound (the machine, a cgroup) leaves, at
        most an equal part of its hard limit; a per-process bound (an rlimit) is not divided."""
        held = []
        for b in self.bounds:
            n = 1 if b.per_process else max(ranks, 1)
            most = max(b.available, 0) // n + self.resident
            held.append(most if b.limit is None else min(most, b.limit // n))
        return min(held)

    @property
    def source(self) -> str:
        """Where ``available`` comes from, for plan lines and summaries."""
        return self.tightest.describe()

    @property
    def hard_limit(self) -> MemoryBound | None:
        """The smallest hard limit (cgroup or rlimit), if there is one."""
        hard = [b for b in self.bounds if b.limit is not None]
        return min(hard, key=lambda b: b.limit or 0) if hard else None

    @property
    def total(self) -> int:
        """The most this process could ever hold: the machine's RAM or the smallest hard limit."""
        hard = self.hard_limit
        return (
            min(self.machine_total, hard.limit) if hard is not None and hard.limit is not None else self.machine_total
        )


def _read_int(path: Path) -> int | None:
    """The integer in a cgroup file; None when missing, unreadable, ``max`` or "unlimited"."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _stat_field(path: Path, name: str) -> int:
    """A field of a cgroup ``memory.stat`` file (0 when absent or unreadable)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        key, _, value = line.partition(" ")
        if key == name:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _cgroup_paths(proc: Path) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory-controller path) of this process, from ``/proc/self/cgroup``."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None, None
    v2 = v1 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(mount: Path, path: str) -> list[Path]:
    """``mount/path`` and each directory above it up to ``mount``, the ones that exist.

    Inside a container with no cgroup namespace the path names the host's hierarchy while the mount shows
    only the container's own group: the missing levels are skipped and the mount's root is read instead.
    """
    parts = [p for p in path.strip("/").split("/") if p]
    dirs = [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _unescape(field: str) -> str:
    """A mountinfo path field: spaces, tabs, newlines and backslashes are written as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _cgroup_mounts(proc: Path, fs_root: Path) -> dict[str, tuple[Path, str]]:
    """Where the cgroup v2 hierarchy ("v2") and the v1 memory controller ("v1") are mounted, from
    ``/proc/self/mountinfo``: (mount point under ``fs_root``, the hierarchy path the mount shows as its
    root). A v2 hierarchy may sit anywhere (``/sys/fs/cgroup/unified`` on a hybrid host, ``/cgroup2``);
    the usual places are assumed when mountinfo cannot be read."""
    fs = fs_root / "sys" / "fs" / "cgroup"
    found: dict[str, tuple[Path, str]] = {}
    try:
        lines = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return {"v2": (fs, "/"), "v1": (fs / "memory", "/")}
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(after) < 3:
            continue
        root, point = _unescape(fields[3]), fs_root / _unescape(fields[4]).lstrip("/")
        if after[0] == "cgroup2":
            found.setdefault("v2", (point, root))
        elif after[0] == "cgroup" and "memory" in after[2].split(","):
            found.setdefault("v1", (point, root))
    return found


def _within(path: str, root: str) -> str:
    """``path`` (from /proc/self/cgroup) relative to a mount whose root is ``root`` in the hierarchy."""
    if root not in ("", "/") and (path == root or path.startswith(root.rstrip("/") + "/")):
        return path[len(root.rstrip("/")) :] or "/"
    return path


def _cgroup_bounds(sys_root: Path, proc_root: Path) -> list[MemoryBound]:
    v2_path, v1_path = _cgroup_paths(proc_root)
    mounts = _cgroup_mounts(proc_root, sys_root.parent)
    bounds = []
    # (mount, path, limit file, usage file, reclaimable page-cache field of memory.stat, label)
    layouts = []
    if v2_path is not None and "v2" in mounts:
        mount, root = mounts["v2"]
        layouts.append((mount, _within(v2_path, root), "memory.max", "memory.current", "inactive_file", "cgroup v2"))
    if v1_path is not None and "v1" in mounts:
        mount, root = mounts["v1"]
        layouts.append(
            (
                mount,
                _within(v1_path, root),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
                "cgroup v1",
            )
        )
    for mount, path, limit_file, usage_file, inactive, label in layouts:
        for d in _ancestors(mount, path):
            limit = _read_int(d / limit_file)
            if limit is None:
                continue
            usage = _read_int(d / usage_file) or 0
            usage = max(usage - _stat_field(d / "memory.stat", inactive), 0)
            bounds.append(MemoryBound(f"{label} {d} {limit_file}", limit, limit - usage))
    return bounds


def _rlimit_bounds(
    getrlimit: Callable[[int], tuple[int, int]], in_use: Callable[[], tuple[int, int]]
) -> list[MemoryBound]:
    bounds = []
    vms = data = None
    for name, which in (("RLIMIT_AS", resource.RLIMIT_AS), ("RLIMIT_DATA", resource.RLIMIT_DATA)):
        soft, _ = getrlimit(which)
        if soft == resource.RLIM_INFINITY or soft < 0 or soft >= _UNLIMITED:
            continue
        if vms is None or data is None:
            vms, data = in_use()
        used = vms if name == "RLIMIT_AS" else data
        bounds.append(MemoryBound(name, soft, soft - used, per_process=True))
    return bounds


def _machine() -> tuple[int, int]:
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def _address_space_in_use() -> tuple[int, int]:
    """(virtual size, data segment) of this process in bytes, what RLIMIT_AS / RLIMIT_DATA count."""
    import psutil

    info = psutil.Process().memory_info()
    return int(info.vms), int(getattr(info, "data", info.vms))


def resident_bytes(proc: Path = Path("/proc")) -> int:
    """This process's resident memory now (``VmRSS``), 0 where ``/proc`` does not say."""
    try:
        for line in (proc / "self" / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_memory(
    sys_root: Path = Path("/sys"),
    proc_root: Path = Path("/proc"),
    machine: Callable[[], tuple[int, int]] = _machine,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    in_use: Callable[[], tuple[int, int]] = _address_space_in_use,
) -> ProcessMemory:
    """Every bound on this process's memory now (see the module docstring); ``machine`` gives (total,
    available) RAM, ``getrlimit`` and ``in_use`` (virtual size, data segment) the rlimits and their use.
    The cgroup hierarchies are found through ``proc_root``'s mountinfo, their mount points read under
    ``sys_root``'s parent (the filesystem's root)."""
    total, available = machine()
    bounds = [MemoryBound("machine available memory", None, available)]
    bounds += _cgroup_bounds(sys_root, proc_root)
    bounds += _rlimit_bounds(getrlimit, in_use)
    return ProcessMemory(total, tuple(bounds), resident_bytes(proc_root))
