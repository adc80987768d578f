"""The hardware a job plans with, and what a finished job tells the planner: each ``generate`` or ``bench``
run records its predicted and measured phase times in this machine's calibration, from which later plans
correct the cost model's constants (``costmodel.calcache``)."""

from __future__ import annotations

import dataclasses
import logging
import os

from flexrun.config import OptConfig
from flexrun.costmodel.hardware import HardwareSpec
from flexrun.costmodel.machine import ENV, base_spec, hardware_for, machine_calibration, run_record
from flexrun.costmodel.prediction import predict
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


def job_hardware(opts: EngineOptions) -> HardwareSpec:
    """``--hardware`` when given, else ``$FLEXRUN_HARDWARE``, else this machine's (calibrated on first use); for
    one tensor-parallel rank's share of the work."""
    return per_rank(hardware_for(opts.placement.hardware, opts.offload_dir))


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
        record = run_record(prediction, stats, placement, cfg.name, cfg.run_dtype)
        if record is None:
            return False
        entry.record(record)
    except OSError as exc:  # a read-only cache dir costs the corrections, never the job
        log.info("run not recorded in the calibration cache: %s", exc)
        return False
    return True
