"""``flexrun calibrate``: measure this machine's bandwidths and compute rates into a ``HardwareSpec``.

Each figure is measured on the operation the engine runs: disk reads with O_DIRECT into page-aligned
buffers (``flexrun.diskio``), disk writes ending in fsync, pinned host<->device copies, the fused layer's
``linear`` at prefill-like (many tokens) and decode-like (one token per sequence) shapes, its
``cached_attention`` over a prompt and over a position-major cache, on a CPU its linears over int8 and
int4 weights (dequantizing, and torch's fused ops), and the all-reduce between two local tensor-parallel
ranks (gloo, ``costmodel.interconnect``). A full run takes well under a
minute; ``quick=True`` shrinks every size for tests (figures then understate the machine).

Everything CUDA is created inside the functions, so this module imports on a machine without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from flexrun import diskio
from flexrun.costmodel.calcache import Calibration, DiskFigures
from flexrun.costmodel.hardware import HardwareSpec
from flexrun.costmodel.interconnect import measure_interconnect
from flexrun.costmodel.machine_id import filesystem_key, machine_fingerprint
from flexrun.errors import ConfigError
from flexrun.kernels import select_kernels
from flexrun.kernels.positions import additive_mask
from flexrun.kernels.quantized import chunked_dequantized_linear
from flexrun.memlimits import process_memory
from flexrun.paths import offload_root
from flexrun.quant.formats import QuantSpec, quantize
from flexrun.weights.store import TORCH_DTYPES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is: the full run, or the quick one for tests."""

    disk_bytes: int  # file written then read back
    disk_chunk: int  # bytes per write / read call
    copy_bytes: int  # memory and host<->device copies
    hidden: int  # matmul: (tokens, h) x (4h, h)
    prefill_tokens: int
    decode_batch: int
    heads: int  # attention: heads x 64 dims
    prompt_len: int  # prefill attention over (s, s)
    context_len: int  # decode attention over a cache of this many tokens
    min_seconds: float  # repeat each compute measurement at least this long
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # the decode matmul rate's row counts
    disk_repeats: int = 5  # reads of the file, for a median and a spread (a virtual disk moves 2x between runs)
    # Rows of the (rows, hidden) activations all-reduced between two local processes (empty: not measured).
    tp_rows: tuple[int, ...] = (1, 16, 256, 2048)
    # Bytes per read call the disk is also read at: the engine reads each tensor in one call, from a page of
    # biases to a vocabulary's embeddings, most of its bytes in calls of a few to a few hundred MiB.
    disk_requests: tuple[int, ...] = (1 << 20, 4 << 20, 16 << 20, 64 << 20)


FULL = Sizes(512 << 20, 32 << 20, 256 << 20, 2048, 512, 64, 16, 512, 1024, 0.5)
FULL = dataclasses.replace(FULL, disk_requests=(256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20))
# What a job measures on first use, before its first plan: the engine's shapes, a few seconds in all.
# A job's first-use calibration leaves the interconnect to `flexrun calibrate` (the cost model's loopback
# figures stand in): most jobs run on one process.
FIRST = Sizes(128 << 20, 16 << 20, 128 << 20, 2048, 256, 64, 16, 256, 512, 0.1, (1, 4, 16, 64, 256), 3, ())
QUICK = Sizes(8 << 20, 4 << 20, 8 << 20, 256, 64, 16, 4, 64, 128, 0.02, (1, 4, 16), 2, (1, 16, 256), (1 << 20, 4 << 20))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: Callable[[], object], device: torch.device, min_seconds: float, max_reps: int = 50) -> float:
    """Seconds of one call of ``fn``: warm up once, then the fastest of repeats lasting ``min_seconds``."""
    fn()
    _sync(device)
    best, spent, reps = float("inf"), 0.0, 0
    while (spent < min_seconds or reps < 2) and reps < max_reps:
        start = time.perf_counter()
        fn()
        _sync(device)
        elapsed = time.perf_counter() - start
        best, spent, reps = min(best, elapsed), spent + elapsed, reps + 1
    return best


# ---- disk ------------------------------------------------------------------------------------------
def measure_disk(directory: Path, sizes: Sizes) -> tuple[list[float], float, bool, dict[str, float]]:
    """(read bytes/s with O_DIRECT of each of ``sizes.disk_repeats`` reads in ``disk_chunk`` calls, write
    bytes/s ending in fsync, whether reads bypassed the page cache, read bytes/s by bytes per read call for
    each of ``disk_requests`` that the file holds)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"calibrate-{os.getpid()}.bin"
    total = diskio.padded(sizes.disk_bytes)
    requests = sorted(r for r in sizes.disk_requests if r <= total)
    chunk = diskio.aligned_empty(max([sizes.disk_chunk, *requests]))
    chunk.copy_(torch.randint(0, 256, (chunk.numel(),), dtype=torch.uint8))  # incompressible
    view = memoryview(chunk.numpy()[: sizes.disk_chunk])  # type: ignore[arg-type]
    direct = False
    try:
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            done = 0
            while done < total:
                done += os.write(fd, view[: min(len(view), total - done)])
            os.fsync(fd)
        finally:
            os.close(fd)
        write_bw = total / (time.perf_counter() - start)
        reads: list[float] = []
        for _ in range(max(sizes.disk_repeats, 1)):
            rate, direct = _read_pass(path, chunk, total, sizes.disk_chunk)
            reads.append(rate)
        # Smaller calls cost a request's latency each: read enough of them to time (a few dozen MiB at least).
        by_size = {str(r): _read_pass(path, chunk, min(total, max(8 * r, 32 << 20)), r)[0] for r in requests}
    finally:
        path.unlink(missing_ok=True)
    return reads, write_bw, direct, by_size


def _read_pass(path: Path, buf: torch.Tensor, nbytes: int, request: int) -> tuple[float, bool]:
    """Bytes/s of reading ``nbytes`` of ``path`` from its start in calls of ``request`` bytes into ``buf``,
    with O_DIRECT where the filesystem allows it (and whether it did), the page cache dropped first."""
    fd = os.open(path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):  # drop what the writes (or the last read) left in the page cache
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    fd, direct = diskio.open_for_read(path, direct=True)
    try:
        start = time.perf_counter()
        offset = 0
        while offset < nbytes:
            n = diskio.read_into(fd, buf, offset, min(request, nbytes - offset))
            if n == 0:
                break
            offset += n
        return offset / (time.perf_counter() - start), direct
    finally:
        os.close(fd)


# ---- memory and links ------------------------------------------------------------------------------
def measure_memory_bw(device: torch.device, sizes: Sizes) -> float:
    """The device memory's bandwidth: bytes read + written per second by a large copy."""
    n = sizes.copy_bytes
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * n / _best_time(lambda: dst.copy_(src), device, sizes.min_seconds / 4)


def measure_links(device: torch.device, sizes: Sizes) -> tuple[float, float]:
    """(host->device, device->host) bytes/s of pinned copies (CUDA only)."""
    n = sizes.copy_bytes
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    h2d = n / _best_time(lambda: dev.copy_(host, non_blocking=True), device, sizes.min_seconds / 4)
    d2h = n / _best_time(lambda: host.copy_(dev, non_blocking=True), device, sizes.min_seconds / 4)
    return h2d, d2h


# ---- compute ---------------------------------------------------------------------------------------
def measure_matmul(device: torch.device, dtype: torch.dtype, tokens: int, sizes: Sizes) -> float:
    """FLOP/s of the engine's ``linear`` over ``tokens`` rows against an MLP-shaped (4h, h) weight."""
    linear = select_kernels(device).linear
    h = sizes.hidden
    x = torch.randn(tokens, h, device=device).to(dtype)  # (tokens, h)
    w = torch.randn(4 * h, h, device=device).to(dtype) / h**0.5  # (4h, h)
    seconds = _best_time(lambda: linear(x, w, None), device, sizes.min_seconds)
    return 2 * tokens * h * 4 * h / seconds


def measure_attention(
    device: torch.device, dtype: torch.dtype, batch: int, query_len: int, context: int, sizes: Sizes
) -> float:
    """FLOP/s of the engine's attention kernel: ``query_len`` queries over ``context`` keys held, as the
    engine holds its KV cache, position-major."""
    cached_attention = select_kernels(device).cached_attention
    nh, d = sizes.heads, 64
    q = torch.randn(batch, nh, query_len, d, device=device).to(dtype)  # (b, nh, q, d)
    k = torch.randn(context, batch, nh, d, device=device).to(dtype)  # (t, b, nh, d)
    v = torch.randn(context, batch, nh, d, device=device).to(dtype)
    valid = torch.ones(batch, context, dtype=torch.bool, device=device)
    mask = additive_mask(valid, query_len, dtype)  # (b, 1, q, t)
    seconds = _best_time(lambda: cached_attention(q, k, v, mask, d**-0.5), device, sizes.min_seconds)
    return 4 * batch * query_len * context * nh * d / seconds  # Q K^T and P V


def measure_quant(device: torch.device, sizes: Sizes) -> dict[str, dict[str, float]]:
    """The compressed-weight linears' figures (``HardwareSpec.quant_rates``) on a CPU, per kind: values per
    second of the dequantizing path, taken at one row (where its matmul costs next to nothing), into
    float32 (the compute dtype of a 16-bit model on a CPU without 16-bit matmuls); FLOP/s of the fused op
    at decode rows on the weight prepared as the engine prepares a resident one; for int4, values per
    second of that preparation (what a weight read from disk pays at every read)."""
    kernels = select_kernels(device)
    h = sizes.hidden
    w = (torch.randn(4 * h, h) / h**0.5).to(torch.bfloat16)  # (4h, h)
    one, rows = torch.randn(1, h), torch.randn(sizes.decode_batch, h)  # (1, h), (b, h)
    rates: dict[str, dict[str, float]] = {}
    for kind in ("int8", "int4"):
        q = quantize(w, QuantSpec.of(kind))
        prepared = kernels.prepare(q)
        dequant = _best_time(functools.partial(chunked_dequantized_linear, one, q, None), device, sizes.min_seconds)
        fused = _best_time(functools.partial(kernels.linear, rows, prepared, None), device, sizes.min_seconds)
        rates[kind] = {"dequant": w.numel() / dequant, "fused_mm_flops": 2 * rows.shape[0] * w.numel() / fused}
        if kind == "int4":  # read from disk, it is repacked for the fused op as a resident one is at load
            rates[kind]["repack"] = w.numel() / _best_time(
                functools.partial(kernels.prepare, q), device, sizes.min_seconds
            )
    return rates


# ---- the whole run ---------------------------------------------------------------------------------
def calibrate(
    offload_dir: str | Path | None = None,
    out: str | Path | None = None,
    dtype: str | None = None,
    quick: bool = False,
    save: bool = True,
    progress: bool = True,
) -> HardwareSpec:
    """Measure this machine and return its ``HardwareSpec``; save it as this machine's calibration in the
    cache (``calcache``: the runs recorded against an earlier one start afresh) and, given ``out``, as a
    spec JSON file for ``--hardware``.

    ``offload_dir``: where the disk is measured (default: the cache dir's ``offload``). ``dtype``: the
    compute dtype (default bfloat16 without CUDA, float16 with). ``quick``: small sizes, for tests.
    """
    directory = offload_root(offload_dir)
    label = "`flexrun calibrate`" + (" --quick" if quick else "")
    spec, disk = measure_machine(directory, QUICK if quick else FULL, dtype, progress, label)
    if save:
        path = Calibration(machine_fingerprint(), spec, {filesystem_key(directory): disk}).save()
        log.info("saved %s", path)
        if out:
            spec.save(Path(out).expanduser())
    return spec


def measure_machine(
    directory: Path, sizes: Sizes, dtype: str | None = None, progress: bool = True, label: str = "flexrun"
) -> tuple[HardwareSpec, DiskFigures]:
    """This machine's spec (its disk measured under ``directory``) and that disk's figures, at ``sizes``."""
    from tqdm import tqdm

    has_cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if has_cuda else torch.device("cpu")
    dtype = dtype or ("float16" if has_cuda else "bfloat16")
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    figures: dict[str, float] = {}
    disks: list[DiskFigures] = []

    def disk() -> None:
        reads, write, direct, by_size = measure_disk(directory, sizes)
        disks.append(DiskFigures(statistics.median(reads), write, reads, direct, time.strftime("%Y-%m-%d"), by_size))
        figures["disk_to_host_bw"], figures["host_to_disk_bw"] = disks[0].read_bw, write

    def links() -> None:
        if has_cuda:
            figures["host_to_device_bw"], figures["device_to_host_bw"] = measure_links(device, sizes)
        else:
            figures["host_to_device_bw"] = figures["device_to_host_bw"] = 0.0

    # The compute rates are measured in every dtype a model may run in here (the requested one first,
    # whose figures fill the spec's main fields): without bf16 hardware, bfloat16 and float32 differ ~7x.
    others = ("float16", "bfloat16", "float32") if has_cuda else ("bfloat16", "float32")
    rates: dict[str, dict[str, float]] = {d: {} for d in dict.fromkeys([dtype, *others])}
    curves: dict[str, dict[str, float]] = {}

    def compute(d: str) -> None:
        td, r = TORCH_DTYPES[d], rates[d]
        r["mm_flops_prefill"] = measure_matmul(device, td, sizes.prefill_tokens, sizes)
        r["mm_flops_decode"] = measure_matmul(device, td, sizes.decode_batch, sizes)
        curves[d] = {str(b): measure_matmul(device, td, b, sizes) for b in sizes.decode_batches}
        r["bmm_flops_prefill"] = measure_attention(device, td, 1, sizes.prompt_len, sizes.prompt_len, sizes)
        r["bmm_flops_decode"] = measure_attention(device, td, sizes.decode_batch, 1, sizes.context_len, sizes)

    def host_attention() -> None:
        if has_cuda:  # host-side attention runs in float32 on the CPU, as FlexGen's
            b = sizes.decode_batch
            host = measure_attention(torch.device("cpu"), torch.float32, b, 1, sizes.context_len, sizes)
        for r in rates.values():
            r["host_attn_flops"] = host if has_cuda else r["bmm_flops_decode"]
        figures.update(rates[dtype])

    quant: dict[str, dict[str, float]] = {}

    def compressed() -> None:
        if not has_cuda:  # the GPU dequantizes with the reference, priced as passes over memory
            quant.update(measure_quant(device, sizes))

    def interconnect() -> None:
        if sizes.tp_rows:  # gloo between local CPU ranks (NCCL between GPUs is not measured)
            bw, latency = measure_interconnect(sizes.hidden, sizes.tp_rows, repeats=sizes.disk_repeats)
            figures["interconnect_bw"], figures["interconnect_latency"] = bw, latency

    steps: list[tuple[str, Callable[[], None]]] = [
        ("disk", disk),
        ("interconnect", interconnect),
        ("host<->device", links),
        ("memory bandwidth", lambda: figures.__setitem__("device_mem_bw", measure_memory_bw(device, sizes))),
        *[(f"compute ({d})", functools.partial(compute, d)) for d in rates],
        ("host attention", host_attention),
        ("compressed weights", compressed),
    ]
    start = time.perf_counter()
    bar = tqdm(steps, desc="calibrate", unit="step", file=sys.stderr, disable=not progress, leave=False)
    for name, fn in bar:
        bar.set_postfix_str(name)
        fn()
        log.debug("calibrate %s: %s", name, {k: f"{v:.3g}" for k, v in figures.items()})
    bar.close()

    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    where = (
        torch.cuda.get_device_name(device)
        if has_cuda
        else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    source = f"measured by {label} on {where} in {dtype}, {time.strftime('%Y-%m-%d')}"
    low, high = disks[0].spread()
    source += (
        f"; disk read median of {len(disks[0].read_samples)}: {disks[0].read_bw / 2**30:.2f} GiB/s "
        f"(runs {low / 2**30:.2f}-{high / 2**30:.2f})"
    )
    if not disks[0].direct:
        source += f"; O_DIRECT unsupported under {directory}, disk reads may be flattered by the page cache"
    spec = HardwareSpec(
        name="calibrated",
        source=source,
        device_mem=int(torch.cuda.get_device_properties(device).total_memory) if has_cuda else 0,
        host_mem=process_memory().total,
        disk_mem=int(shutil.disk_usage(probe).free),
        device_is_host=not has_cuda,
        dtype=dtype,
        rates_by_dtype=rates,
        decode_by_batch=curves,
        quant_rates=quant,
        disk_read_by_size=dict(disks[0].read_by_size),
        **figures,
    )
    log.info("calibrated in %.1f s: %s", time.perf_counter() - start, spec.source)
    return spec, disks[0]
