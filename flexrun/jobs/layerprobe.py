"""The first-use probe of a job's model: one of its layers timed on this machine (``runtime.probe``) at the
job's shape, once per (machine, layer, compute dtype, shape bucket, threads), kept in the machine's
calibration (``calcache``), so that the planner's compute figures start from what this model's layer runs
at here (``Calibration.corrections``) rather than from bare matmuls."""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

import torch

from flexrun.config import OptConfig
from flexrun.costmodel import calcache
from flexrun.costmodel.calcache import Calibration, busy
from flexrun.costmodel.layerprobe import JobShape, ProbeShape, layer_compute, layer_key, probe_key, probe_shape
from flexrun.costmodel.machine import machine_load
from flexrun.errors import FlexrunError
from flexrun.memlimits import process_memory
from flexrun.parallel import current
from flexrun.runtime.probe import time_layer
from flexrun.runtime.tiers import compute_device
from flexrun.units import format_bytes

log = logging.getLogger(__name__)

# The share of the memory free now that a probe may take (the job's engine is yet to be built).
MEMORY_SHARE = 0.25


def layer_probe(
    entry: Calibration, cfg: OptConfig, job: JobShape, stderr: IO[str] | None = None
) -> dict[str, Any] | None:
    """The probe record of ``cfg``'s layer (its compute dtype resolved) at ``job``'s shape on this machine:
    the cached one, else one measured now (a line on ``stderr``) and cached. None when the layer is not
    probed (a mixture of experts, an encoder, one of several tensor-parallel ranks) or the probe failed
    (one log line; the plan then rests on the plain calibration and the recorded runs)."""
    if cfg.moe or cfg.encoder or current().world > 1:
        return None
    shape = probe_shape(cfg, entry.spec, job)
    if shape is None:
        log.info("not probing a %s layer: too slow here to time in a second or two", cfg.name)
        return None
    threads = torch.get_num_threads()
    key = probe_key(cfg, shape, threads)
    load, cores = machine_load()
    found = _refreshed(entry.probes.get(key), cfg, entry)
    if found is not None and not (busy(found) and load <= cores):  # a busy machine's probe is taken again
        return found
    need, free = _probe_bytes(cfg, shape), _free_bytes()
    if need > MEMORY_SHARE * free:
        log.warning(
            "not probing a %s layer: it would take %s of the %s free; planning with the plain calibration",
            cfg.name,
            format_bytes(need),
            format_bytes(free),
        )
        return None
    print(
        f"flexrun: timing one {cfg.name} layer on this machine for the planner ({cfg.run_dtype}, "
        f"{shape.describe()}; once per model and shape, cached in {calcache.calibration_dir()})",
        file=stderr or sys.stderr,
        flush=True,
    )
    try:
        times = time_layer(cfg, shape)
    except (RuntimeError, MemoryError, FlexrunError) as exc:  # torch's out-of-memory error is a RuntimeError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("the %s layer probe failed (%s); planning with the plain calibration", cfg.name, reason)
        return None
    measured = {"prefill": times.prefill_s, "decode": times.decode_s}
    record = {
        "model": cfg.name,
        "layer": layer_key(cfg),
        "dtype": cfg.run_dtype,
        "shape": shape.to_dict(),
        "phases": {p: {"measured_s": s} for p, s in measured.items() if s > 0},
        "when": time.strftime("%Y-%m-%d"),
        "seconds": round(times.total_s, 3),
        "load": round(load, 2),
        "load_end": round(machine_load()[0], 2),
        "cores": cores,
        "threads": threads,
    }
    log.info("probed one %s layer in %.2f s: %s", cfg.name, times.total_s, measured)
    entry.probes[key] = record
    try:
        entry.save()
    except OSError as exc:
        log.warning("cannot cache the layer probe in %s: %s", calcache.calibration_dir(), exc.strerror)
    return _refreshed(record, cfg, entry)


def _refreshed(record: Any, cfg: OptConfig, entry: Calibration) -> dict[str, Any] | None:
    """``record`` with each phase's time as the cost model predicts it now (with ``entry``'s uncorrected spec,
    whatever spec or cost model it was measured under) and its shape described; None when it is unreadable."""
    if not isinstance(record, dict):
        return None
    try:
        shape = ProbeShape(**{k: int(v) for k, v in dict(record["shape"]).items()})
        measured = {p: float(f["measured_s"]) for p, f in dict(record["phases"]).items()}
    except (KeyError, TypeError, ValueError):
        return None
    if "prefill" not in measured or not all(s > 0 for s in measured.values()):
        return None
    prefill_s, decode_s = layer_compute(cfg, entry.spec, shape)
    predicted = {"prefill": prefill_s, "decode": decode_s}
    if not all(predicted.get(p, 0.0) > 0 for p in measured):
        return None
    phases = {p: {"predicted_s": predicted[p], "measured_s": s} for p, s in measured.items()}
    return {**record, "phases": phases, "described": shape.describe()}


def _probe_bytes(cfg: OptConfig, shape: ProbeShape) -> int:
    """Bytes a probe of ``shape`` holds: one layer's weights, a prefill's intermediates, both calls' caches."""
    cache = 2 * (shape.rows * shape.prompt_len + shape.decode_rows * (shape.context + 1)) * cfg.kv_dim
    cpu = compute_device().type == "cpu"
    return cfg.layer_bytes() + cfg.working_bytes(shape.rows, shape.prompt_len, cpu) + cache * cfg.dtype_bytes


def _free_bytes() -> int:
    """Bytes free on the compute device (on a CPU: what this process may still take)."""
    device = compute_device()
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return process_memory().available
