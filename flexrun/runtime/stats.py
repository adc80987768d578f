"""Measured figures: what a run measured (``RunStats``), wall-clock timers that synchronise the device, and
the process's peak resident memory."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    """What one ``Engine.generate`` or ``Encoder.encode_blocks`` measured (an encode is a prefill alone)."""

    sequences: int = 0
    blocks: int = 0
    prompt_tokens: int = 0  # prompt tokens processed in prefill, padding included
    input_tokens: int = 0  # real prompt tokens, padding excluded
    prefilled_tokens: int = 0  # prompt tokens prefill computed: padding excluded, a prefix prompts share once
    generated_tokens: int = 0  # tokens produced (padded across the block: the throughput FlexGen reports)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_cpu_s: float = 0.0  # CPU time this process spent in decode (every thread): steady under a busy machine
    first_token_s: float = 0.0  # from the run's start to its first token: the first block's prefill and sampling
    decode_steps: int = 0
    disk_bytes_read: int = 0
    decode_bytes_read: int = 0  # of which by the decode steps (weights and cache)
    peak_rss: int = 0
    peak_device: int = 0  # torch.cuda.max_memory_allocated over the run (0 without CUDA)
    base_rss: int = 0  # resident memory before the engine allocated anything (interpreter, libraries)
    planned: dict[str, dict[str, int]] = field(default_factory=dict)
    budgets: dict[str, int] = field(default_factory=dict)
    budget_sources: dict[str, str] = field(default_factory=dict)  # where each tier's budget came from
    planned_peak: int = 0  # the resident memory planned: the baseline (base_rss + RUNTIME_RSS) and the host ledger
    direct_io: bool | None = None
    # Mixture of experts, over decode steps: experts read, and (layer, step) loads they were read in.
    experts_read: int = 0
    expert_loads: int = 0
    # Tensor parallelism: seconds in the step's collectives (all-reduces, and the head's all-gathers), waiting for
    # the slowest rank included, and their count.
    collective_s: float = 0.0
    collectives: int = 0

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    def throughput(self) -> dict[str, float]:
        def rate(n: float, s: float) -> float:
            return n / s if s > 0 else 0.0

        return {
            "prefill_tok_s": rate(self.prompt_tokens, self.prefill_s),
            "decode_tok_s": rate(self.generated_tokens - self.sequences, self.decode_s),
            "total_tok_s": rate(self.generated_tokens, self.total_s),
        }

    def merge(self, part: RunStats) -> RunStats:
        """These stats with ``part``'s, a run after this one, added in place: counts and seconds add up, the
        peaks are the highest, the plan and budgets are the latest, direct I/O holds only if it held in both."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(part, f.name)
            if f.name == "first_token_s":  # the earlier run's first token came first
                self.first_token_s = mine or theirs
            elif f.name in ("peak_rss", "peak_device", "base_rss", "planned_peak"):
                setattr(self, f.name, max(mine, theirs))
            elif f.name == "direct_io":
                if theirs is not None:
                    self.direct_io = theirs if mine is None else mine and theirs
            elif f.name in ("planned", "budgets", "budget_sources"):
                setattr(self, f.name, theirs)
            else:
                setattr(self, f.name, mine + theirs)
        return self


class Timers:
    """Named accumulating timers; the device is synchronised before the clock is read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since these timers were made, the device's work so far included."""
        self._sync()
        return time.perf_counter() - self.started

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        self._sync()
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start
            self.cpu_seconds[name] += time.process_time() - cpu


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) for this process; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (VmHWM), measured by the kernel."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_device_peak(device: torch.device) -> None:
    """Start measuring the device's peak allocated memory afresh (nothing to do without CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak(device: torch.device, max_allocated: Callable[[torch.device], int] | None = None) -> int:
    """The most memory tensors held on ``device`` since the last reset, as the CUDA caching allocator counts it
    (``torch.cuda.max_memory_allocated``; the allocator's own reserve beside it is not counted); 0 on a CPU,
    whose figure is the process's peak resident memory."""
    if device.type != "cuda":
        return 0
    return int((max_allocated or torch.cuda.max_memory_allocated)(device))


def current_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)
