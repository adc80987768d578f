"""What makes one machine's calibration valid for another run: a fingerprint of the machine and a key per
filesystem.

A calibration measured on one CPU says little about another: the same matmul runs ~7x apart with and
without bf16 hardware, and a torch upgrade moves its kernels. The fingerprint holds what changes the
measured figures (CPU model and the instruction-set flags the kernels use, cores this process may run on,
memory, GPUs, torch); a calibration is used only where every field matches. Disks are measured per
filesystem (the offload dir may sit on another device than the cache), keyed by ``filesystem_key``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

# The flags whose presence changes what torch's CPU kernels run (vector width, bf16/fp16/int8 units).
_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "bf16",
    "i8mm",
)
GiB = 1 << 30


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, str]:
    """(CPU model name, the kernel-relevant flags it has, space-separated) from ``/proc/cpuinfo``."""
    model, flags = "", set()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return model or platform.machine(), " ".join(f for f in _FLAGS if f in flags)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _memory_gib(path: Path = Path("/proc/meminfo")) -> int:
    """The machine's RAM in whole GiB (MemTotal; a cgroup limit is a budget, not a different machine)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / GiB)
    except (OSError, ValueError, IndexError):
        pass
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB)


def _gpus() -> str:
    import torch

    if not torch.cuda.is_available():
        return "none"
    return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


def machine_fingerprint() -> dict[str, str]:
    """This machine as the cost model sees it: every field a calibration's figures depend on."""
    import torch

    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "cpu_flags": flags,
        "cores": str(_cores()),
        "memory_gib": str(_memory_gib()),
        "gpu": _gpus(),
        "torch": str(torch.__version__),
    }


def fingerprint_key(fingerprint: dict[str, str]) -> str:
    """A short stable name for ``fingerprint`` (any field changed, another name)."""
    blob = json.dumps(fingerprint, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _mount_of(device: int, mountinfo: Path = Path("/proc/self/mountinfo")) -> tuple[str, str]:
    """(mount point, filesystem type) of the mount whose device number is ``device``; ("", "") if unknown."""
    want = f"{os.major(device)}:{os.minor(device)}"
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return "", ""
    found = ("", "")
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[2] != want or "-" not in fields:
            continue
        fstype = fields[fields.index("-") + 1]
        # The last mount of that device wins, as it is the one a path resolves through; prefer the shortest
        # mount point among bind mounts of the same device.
        if not found[0] or len(fields[4]) <= len(found[0]):
            found = (fields[4], fstype)
    return found


def filesystem_key(directory: str | Path) -> str:
    """The filesystem ``directory`` (or its nearest existing parent) lives on: device, mount point, type."""
    probe = Path(directory).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    device = probe.stat().st_dev
    mount, fstype = _mount_of(device)
    return f"{os.major(device)}:{os.minor(device)} {mount or '?'} {fstype or '?'}"
