"""The interconnect between tensor-parallel ranks on this machine, as ``calibrate`` measures it: gloo all-reduces
between local processes over loopback, at the sizes the engine reduces (a micro-batch's [rows, hidden]
activations, float32 as gloo sums them), fitted to the cost model's ``latency + 2 (N - 1) / N x bytes / bandwidth``
(``equations.all_reduce_seconds``).

The ranks are forked (nothing to import again) and each sets one intra-op thread before touching a tensor, as
a forked worker must; they build their gloo group from a store the parent hosts, not the default process group,
so a process that is itself a rank of a group can measure too.
"""

from __future__ import annotations

import logging
import statistics
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flexrun.errors import ConfigError

log = logging.getLogger(__name__)

#: Seconds the measurement may take before it is abandoned (a rank that cannot start, a blocked port).
TIMEOUT_S = 120.0


def _rank(rank: int, world: int, port: int, sizes: list[int], repeats: int, out: Any) -> None:
    """One rank: each size's all-reduce ``repeats`` times after a warm-up; rank 0 reports the medians."""
    torch.set_num_threads(1)  # a forked process must not enter the parent's OpenMP pool
    timeout = timedelta(seconds=TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, None, is_master=False, timeout=timeout)
    # the backend object itself (its stubs omit the collectives it has)
    group: Any = dist.ProcessGroupGloo(dist.PrefixStore("interconnect", store), rank, world, timeout)
    medians = {}
    for numel in sizes:
        t = torch.ones(numel)  # (rows * hidden,) float32
        group.allreduce([t]).wait()  # warm-up: the pair's buffers for this size
        seconds = []
        for _ in range(repeats):
            group.barrier().wait()
            start = time.perf_counter()
            group.allreduce([t]).wait()
            seconds.append(time.perf_counter() - start)
        medians[numel * t.element_size()] = statistics.median(seconds)
    if rank == 0:
        out.put(medians)


def measure_all_reduce(sizes: list[int], ranks: int = 2, repeats: int = 5) -> dict[int, float]:
    """{bytes: median seconds} of a gloo all-reduce of ``n`` float32 values over ``ranks`` local processes, for
    each ``n`` in ``sizes``."""
    ctx = mp.get_context("fork")
    out = ctx.SimpleQueue()
    store = dist.TCPStore(
        "127.0.0.1", 0, None, is_master=True, timeout=timedelta(seconds=TIMEOUT_S), wait_for_workers=False
    )
    procs = mp.start_processes(
        _rank, args=(ranks, store.port, sizes, repeats, out), nprocs=ranks, join=False, start_method="fork"
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not procs.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"measuring the all-reduce between {ranks} local processes took over {TIMEOUT_S:.0f} s"
                )
    except mp.ProcessRaisedException as exc:
        raise ConfigError(f"measuring the all-reduce between local processes failed: {str(exc).strip()}") from None
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    return dict(out.get())


def fit(samples: dict[int, float], ranks: int = 2) -> tuple[float, float]:
    """(bytes/s, seconds per call) of ``latency + 2 (N - 1) / N x bytes / bandwidth`` fitted to ``samples``
    by least squares; a fit the noise bends (a negative slope or intercept) falls back to the largest message's
    rate and the smallest's time."""
    moved = {2 * (ranks - 1) / ranks * n: s for n, s in samples.items()}
    xs, ys = list(moved), list(moved.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var > 0 else 0.0
    latency = my - slope * mx
    big, small = max(xs), min(xs)
    if slope <= 0 or latency <= 0:
        return big / moved[big], moved[small]
    return 1.0 / slope, latency


def measure_interconnect(hidden: int, rows: tuple[int, ...], ranks: int = 2, repeats: int = 5) -> tuple[float, float]:
    """(bytes/s, seconds per all-reduce) between ``ranks`` local processes, from all-reduces of ``rows x hidden``
    float32 activations."""
    start = time.perf_counter()
    samples = measure_all_reduce([r * hidden for r in rows], ranks, repeats)
    bw, latency = fit(samples, ranks)
    shown = ", ".join(f"{n >> 10} KiB {s * 1e3:.2f} ms" for n, s in sorted(samples.items()))
    log.info(
        "all-reduce over gloo between %d local processes: %s -> %.3g GB/s, %.0f us per call (%.1f s)",
        ranks,
        shown,
        bw / 1e9,
        latency * 1e6,
        time.perf_counter() - start,
    )
    return bw, latency
