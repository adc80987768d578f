"""The hardware spec a job plans with on this machine: calibrated on first use, its disk measured per offload
filesystem, its constants corrected by the runs recorded since.

``hardware_for(None, offload_dir)`` is what ``generate``, ``bench`` and ``plan`` use without ``--hardware``:
``$FLEXRUN_HARDWARE`` when set (a preset or a JSON file), else this machine's calibration from the cache
(``calcache``) when its fingerprint matches, else a short calibration run now (seconds, a progress line on
stderr) that is cached for the next job. Presets are for planning another machine (``--hardware t4``).
A job that knows its model also probes one of its layers first (``jobs.layerprobe``), and plans with
``machine_spec(entry, offload_dir, probe)``: the compute corrected from that probe on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from flexrun.costmodel import calcache
from flexrun.costmodel.calcache import MAX_CORRECTION, Calibration, DiskFigures, bound_class
from flexrun.costmodel.calibrate import FIRST, measure_disk, measure_machine
from flexrun.costmodel.hardware import COMPUTE_RATES, HardwareSpec, load_hardware
from flexrun.costmodel.machine_id import filesystem_key, machine_fingerprint
from flexrun.memlimits import process_memory
from flexrun.paths import offload_root

log = logging.getLogger(__name__)

ENV = "FLEXRUN_HARDWARE"
_PREFILL_RATES = ("mm_flops_prefill", "bmm_flops_prefill")
_DECODE_RATES = tuple(r for r in COMPUTE_RATES if r not in _PREFILL_RATES)
MIN_RECORD_S = 1.0  # runs shorter than this are mostly start-up and are not recorded
_PLANNED: dict[str, float] = {}  # the load average when this process last planned with its calibration


def machine_load() -> tuple[float, int]:
    """The 1-minute load average and the cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return os.getloadavg()[0], cores


def _scaled(rates: Mapping[str, float], keys: tuple[str, ...], factor: float) -> dict[str, float]:
    return {k: (v / factor if k in keys else v) for k, v in rates.items()}


def corrected(
    spec: HardwareSpec, factors: Mapping[str, tuple[float, int]], probe: Mapping[str, Any] | None = None
) -> HardwareSpec:
    """``spec`` with each class's constants divided by its measured/predicted factor (``Calibration.corrections``);
    ``probe``, the probe record the compute factors started from, is named in the source."""
    pre = factors.get("prefill compute", (1.0, 0))[0]
    dec = factors.get("decode compute", (1.0, 0))[0]
    disk = factors.get("disk", (1.0, 0))[0]
    link = factors.get("link", (1.0, 0))[0]
    changes: dict[str, Any] = {
        "mm_flops_prefill": spec.mm_flops_prefill / pre,
        "bmm_flops_prefill": spec.bmm_flops_prefill / pre,
        "mm_flops_decode": spec.mm_flops_decode / dec,
        "bmm_flops_decode": spec.bmm_flops_decode / dec,
        "host_attn_flops": spec.host_attn_flops / dec,
        "device_mem_bw": spec.device_mem_bw / dec,
        "rates_by_dtype": {
            d: _scaled(_scaled(r, _PREFILL_RATES, pre), _DECODE_RATES, dec) for d, r in spec.rates_by_dtype.items()
        },
        "decode_by_batch": {d: {b: v / dec for b, v in c.items()} for d, c in spec.decode_by_batch.items()},
        "quant_rates": {k: {n: v / dec for n, v in r.items()} for k, r in spec.quant_rates.items()},
        "disk_to_host_bw": spec.disk_to_host_bw / disk,
        "disk_read_by_size": {r: v / disk for r, v in spec.disk_read_by_size.items()},
        "host_to_disk_bw": spec.host_to_disk_bw / disk,
        "host_to_disk_cache_bw": spec.host_to_disk_cache_bw and spec.host_to_disk_cache_bw / disk,
        "host_to_device_bw": spec.host_to_device_bw / link,
        "device_to_host_bw": spec.device_to_host_bw / link,
        "device_to_host_cache_bw": spec.device_to_host_cache_bw and spec.device_to_host_cache_bw / link,
    }
    probed = {f"{p} compute" for p in (probe or {}).get("phases", {})}
    source = spec.source + (_probe_note(probe) if probe else "")
    used = [
        f"{c} x{f:.2f} ({'the probe and ' if c in probed else ''}{n} run{'s' if n != 1 else ''}"
        + (" of this layer)" if c in probed else ")")
        for c, (f, n) in factors.items()
        if n
    ]
    if used:
        source += f"; corrected by recorded runs: {', '.join(used)}"
    changes["source"] = source
    return dataclasses.replace(spec, **changes)


def _probe_note(probe: Mapping[str, Any]) -> str:
    """The source's note of a probe: the layer's model, dtype, shape and date, and its factors (bounded)."""
    ratios = []
    for phase, f in probe.get("phases", {}).items():
        bounded = max(1 / MAX_CORRECTION, min(MAX_CORRECTION, f["measured_s"] / f["predicted_s"]))
        ratios.append(f"{phase} x{bounded:.2f}")
    where = ", ".join(str(probe[k]) for k in ("dtype", "described", "when") if probe.get(k))
    return f"; compute probed on one {probe.get('model', '?')} layer ({where}): {', '.join(ratios)}"


def _with_disk(spec: HardwareSpec, disk: DiskFigures, where: str) -> HardwareSpec:
    low, high = disk.spread()
    note = f"; disk {where}: read {disk.read_bw / 2**30:.2f} GiB/s (runs {low / 2**30:.2f}-{high / 2**30:.2f})"
    if not disk.direct:
        note += ", O_DIRECT unsupported (reads may be flattered by the page cache)"
    return dataclasses.replace(
        spec,
        disk_to_host_bw=disk.read_bw,
        disk_read_by_size=dict(disk.read_by_size),
        host_to_disk_bw=disk.write_bw,
        source=spec.source.split("; disk ")[0] + note,
    )


def measure_filesystem(directory: Path) -> DiskFigures:
    """The disk under ``directory``: a short O_DIRECT read/write measurement, its median and spread."""
    reads, write, direct, by_size = measure_disk(directory, FIRST)
    return DiskFigures(statistics.median(reads), write, reads, direct, time.strftime("%Y-%m-%d"), by_size)


def _first_calibration(fingerprint: dict[str, str], directory: Path, stderr: IO[str]) -> Calibration:
    print(
        "flexrun: no calibration for this machine yet; measuring its disk, memory and compute for the planner "
        f"(once, a few seconds; cached in {calcache.calibration_dir()}; `flexrun calibrate` measures longer)",
        file=stderr,
        flush=True,
    )
    spec, disk = measure_machine(directory, FIRST, progress=stderr.isatty(), label="flexrun on first use")
    entry = Calibration(fingerprint, spec, {filesystem_key(directory): disk})
    _save(entry)
    return entry


def _save(entry: Calibration) -> None:
    """Cache ``entry``; a cache dir that cannot be written costs the next job a calibration, never this one."""
    try:
        entry.save()
    except OSError as exc:
        log.warning("cannot cache this machine's calibration in %s: %s", calcache.calibration_dir(), exc.strerror)


def machine_calibration(
    offload_dir: str | Path | None = None, *, calibrate_missing: bool = True, stderr: IO[str] | None = None
) -> Calibration | None:
    """This machine's calibration entry, with the offload filesystem's disk measured; calibrated now when
    there is none and ``calibrate_missing`` (else None)."""
    directory = offload_root(offload_dir)
    fingerprint = machine_fingerprint()
    entry = calcache.load(fingerprint)
    if entry is None:
        if not calibrate_missing:
            return None
        return _first_calibration(fingerprint, directory, stderr or sys.stderr)
    key = filesystem_key(directory)
    if key not in entry.disks:
        log.info("measuring the disk under %s (%s) for the planner", directory, key)
        entry.disks[key] = measure_filesystem(directory)
        _save(entry)
    return entry


def base_spec(entry: Calibration, offload_dir: str | Path | None = None) -> HardwareSpec:
    """``entry``'s spec with the offload filesystem's disk (measured by ``machine_calibration``), uncorrected."""
    directory = offload_root(offload_dir)
    return _with_disk(entry.spec, entry.disks[filesystem_key(directory)], str(directory))


def hardware_for(
    spec: str | HardwareSpec | None, offload_dir: str | Path | None = None, stderr: IO[str] | None = None
) -> HardwareSpec:
    """The spec to plan with: ``spec`` itself (a spec, a preset name, a JSON file), else ``$FLEXRUN_HARDWARE``,
    else this machine's calibration (run now if missing) with the offload filesystem's disk, corrected by
    its recorded runs, and this process's memory and free disk."""
    if isinstance(spec, HardwareSpec):
        return spec
    named = spec or os.environ.get(ENV)
    if named:
        return load_hardware(named)
    entry = machine_calibration(offload_dir, stderr=stderr)
    assert entry is not None
    return machine_spec(entry, offload_dir)


def machine_spec(
    entry: Calibration, offload_dir: str | Path | None = None, probe: dict[str, Any] | None = None
) -> HardwareSpec:
    """``entry``'s spec with the offload filesystem's disk, corrected by ``probe`` (a probe record of the job's
    layer, ``jobs.layerprobe``; None: none) and the recorded runs, with this process's memory and free disk."""
    _PLANNED["load"] = machine_load()[0]  # before this job's own threads load the machine
    hw = corrected(base_spec(entry, offload_dir), entry.corrections(probe), probe)
    where = offload_root(offload_dir)
    while not where.exists() and where != where.parent:
        where = where.parent
    return hw.with_memory(host=process_memory().total, disk=int(shutil.disk_usage(where).free))


def run_record(
    prediction: Any, stats: Any, placement: Any, cfg_name: str, dtype: str, layer: str = ""
) -> dict[str, Any] | None:
    """The record of one run: predicted (by the uncorrected spec) against measured, per phase, with the
    class that bounds each; None when the run is too short to say anything. ``layer``: the model's
    ``layerprobe.layer_key``, which the runs that refine a probe's factors are matched by."""
    if stats.total_s < MIN_RECORD_S or stats.blocks < 1:
        return None
    phases: dict[str, dict[str, Any]] = {}
    if stats.prefill_s > 0 and prediction.prefill_s > 0:
        phases["prefill"] = {
            "predicted_s": prediction.prefill_s,
            "measured_s": stats.prefill_s / stats.blocks,
            "class": bound_class("prefill", prediction.prefill.bottleneck),
        }
    steps = prediction.gen_len - 1
    if stats.decode_steps > 0 and steps > 0 and prediction.decode_s > 0:
        phases["decode"] = {
            "predicted_s": prediction.decode_s / steps,
            "measured_s": stats.decode_s / stats.decode_steps,
            "class": bound_class("decode", prediction.decode.bottleneck),
        }
    if not phases:
        return None
    load, cores = machine_load()
    record = {"model": cfg_name, "dtype": dtype, "placement": placement.describe(), "phases": phases}
    if layer:
        record["layer"] = layer
    # The machine's load, so that corrections can leave out runs taken while other work filled it (``busy``).
    start = _PLANNED.pop("load", None)
    record |= {"load_end": round(load, 2), "cores": cores, "threads": torch.get_num_threads()}
    return record | ({"load": round(start, 2)} if start is not None else {})
