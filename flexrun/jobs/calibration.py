"""The hardware a job plans with, and what a finished job tells the planner: each ``generate`` or ``bench``
run records its predicted and measured phase times in this machine's calibration, from which later plans
correct the cost model's constants (``costmodel.calcache``). A job that knows its model and shape plans
with its compute corrected from a probe of the model's layer first (``jobs.layerprobe``)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import IO

from flexrun.config import OptConfig
from flexrun.costmodel.hardware import HardwareSpec
from flexrun.costmodel.layerprobe import JobShape, layer_key
from flexrun.costmodel.machine import ENV, base_spec, hardware_for, machine_calibration, machine_spec, run_record
from flexrun.costmodel.prediction import predict
from flexrun.jobs.layerprobe import layer_probe
from flexrun.jobs.options import EngineOptions
from flexrun.parallel import current
from flexrun.placement import Placement
from flexrun.runtime.stats import RunStats

log = logging.getLogger(__name__)


def per_rank(hw: HardwareSpec) -> HardwareSpec:
    """``hw`` for one of this job's tensor-parallel ranks: it holds 1/world of every layer and all-reduces
    over the interconnect ``hw`` carries (``calibrate``'s between local ranks)."""
    world = current().world
    return hw if world == 1 else dataclasses.replace(hw, tp_ranks=world)


def machine_hardware(
    named: str | HardwareSpec | None,
    offload_dir: str | Path | None,
    cfg: OptConfig | None = None,
    job: JobShape | None = None,
    stderr: IO[str] | None = None,
) -> HardwareSpec:
    """``hardware_for(named, offload_dir)``; when that is this machine's calibration and the job's model
    (``cfg``, its compute dtype resolved) and shape are given, its compute corrected from a probe of the
    model's layer at that shape (measured now the first time) and the runs of that layer recorded since."""
    if named is not None or os.environ.get(ENV) or cfg is None or job is None:
        return hardware_for(named, offload_dir, stderr)
    entry = machine_calibration(offload_dir, stderr=stderr)
    assert entry is not None
    return machine_spec(entry, offload_dir, layer_probe(entry, cfg, job, stderr))


def job_hardware(opts: EngineOptions, cfg: OptConfig | None = None, job: JobShape | None = None) -> HardwareSpec:
    """``--hardware`` when given, else ``$FLEXRUN_HARDWARE``, else this machine's (calibrated on first use, its
    compute probed on ``cfg``'s layer at ``job``'s shape when given); for one tensor-parallel rank's share of
    the work."""
    return per_rank(machine_hardware(opts.placement.hardware, opts.offload_dir, cfg, job))


def record_run(
    opts: EngineOptions, cfg: OptConfig, placement: Placement, stats: RunStats, prompt_len: int, gen_len: int
) -> bool:
    """Add this run to this machine's calibration when the job planned with it (not a preset or a file):
    each phase's time as the uncorrected spec predicts it beside what was measured. True when recorded. A run
    over tensor-parallel ranks is not recorded: the corrections would fold its collectives (waits for the
    slower rank included) into the compute constants of one process."""
    if opts.placement.hardware is not None or os.environ.get(ENV) or current().world > 1:
        return False
    try:
        entry = machine_calibration(opts.offload_dir, calibrate_missing=False)
        if entry is None:
            return False
        prediction = predict(cfg, base_spec(entry, opts.offload_dir), placement, prompt_len, gen_len)
        record = run_record(prediction, stats, placement, cfg.name, cfg.run_dtype, layer_key(cfg))
        if record is None:
            return False
        entry.record(record)
    except OSError as exc:  # a read-only cache dir costs the corrections, never the job
        log.info("run not recorded in the calibration cache: %s", exc)
        return False
    return True
