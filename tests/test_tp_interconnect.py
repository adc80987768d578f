"""The interconnect between local tensor-parallel ranks: ``calibrate`` times gloo all-reduces between two forked
processes at the engine's message sizes and fits the cost model's latency + bytes / bandwidth; the planner's
all-reduce terms then use the calibrated figures instead of the loopback constants. A rank's roofline is its
share's; its runs are not recorded into the corrections."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from flexrun.costmodel import calcache, machine, machine_id
from flexrun.costmodel.calcache import Calibration, DiskFigures
from flexrun.costmodel.equations import LOOPBACK_BW
from flexrun.costmodel.hardware import PRESETS
from flexrun.costmodel.interconnect import fit, measure_interconnect
from flexrun.jobs import calibration
from flexrun.jobs.calibration import record_run
from flexrun.jobs.options import EngineOptions, ModelOptions
from flexrun.paths import offload_root
from flexrun.placement import Placement
from flexrun.resolver import resolve
from flexrun.runtime.stats import RunStats
from tests.helpers import run

FP = {"cpu": "Test CPU", "cpu_flags": "avx avx2", "cores": "2", "memory_gib": "24", "gpu": "none", "torch": "2.13"}
GiB = 1 << 30


def test_the_fit_recovers_latency_and_bandwidth() -> None:
    sizes = [16 << 10, 256 << 10, 4 << 20, 32 << 20]
    two = {n: 2e-4 + n / 0.5e9 for n in sizes}  # two ranks each move the whole message once
    assert fit(two, 2) == pytest.approx((0.5e9, 2e-4))
    four = {n: 2e-4 + 1.5 * n / 0.5e9 for n in sizes}  # a ring of four moves 2 x 3/4 of it
    assert fit(four, 4) == pytest.approx((0.5e9, 2e-4))
    # Noise that bends the line (bigger messages faster) falls back to the largest message's rate and the
    # smallest's time, never a negative figure.
    bw, latency = fit({1 << 10: 1e-3, 1 << 20: 5e-4}, 2)
    assert bw > 0 and latency == 1e-3


def test_two_local_processes_are_measured() -> None:
    bw, latency = measure_interconnect(64, (1, 64), repeats=2)
    # Loopback on any machine: more than 1 MB/s, a call under a second.
    assert bw > 1e6 and 0 < latency < 1.0


def test_plan_tp_uses_this_machines_calibrated_interconnect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(machine.ENV, raising=False)
    monkeypatch.setattr(machine, "machine_fingerprint", lambda: dict(FP))
    spec = dataclasses.replace(
        PRESETS["cpu"], name="calibrated", source="test", interconnect_bw=0.3e9, interconnect_latency=7e-4
    )
    disks = {machine_id.filesystem_key(offload_root(None)): DiskFigures(2 * GiB, GiB, [2 * GiB])}
    Calibration(dict(FP), spec, disks).save()
    args = ["plan", "-m", "facebook/opt-1.3b", "--prompt-len", "64", "--gen-len", "8", "--host-mem", "8GiB"]
    args += ["--max-block-size", "4", "--compress-weight", "none", "--compress-cache", "none", "--tp", "2"]
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    tp = json.loads(r.stdout)["tensor_parallel"]
    assert tp["interconnect_bw"] == 0.3e9 and tp["latency_s"] == 7e-4
    r = run(*args)
    assert "over 0.3 GB/s and 700 us each (calibrate's)" in r.stdout
    # A preset carries no interconnect: the loopback constants, said to be assumed.
    r = run(*args, "--hardware", "cpu")
    assert f"over {LOOPBACK_BW / 1e9:.3g} GB/s" in r.stdout and "(assumed: gloo over loopback)" in r.stdout


def test_a_tp_rank_plans_its_share_and_its_run_is_not_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(machine.ENV, raising=False)
    monkeypatch.setattr(machine, "machine_fingerprint", lambda: dict(FP))
    monkeypatch.setattr(machine, "machine_load", lambda: (0.5, 2), raising=False)  # a quiet machine
    spec = dataclasses.replace(PRESETS["cpu"], name="calibrated", source="test")
    Calibration(dict(FP), spec, {machine_id.filesystem_key(tmp_path): DiskFigures(2 * GiB, GiB, [2 * GiB])}).save()
    cfg = resolve("opt-125m")
    placement = Placement(gpu_batch_size=4, num_gpu_batches=1)
    stats = RunStats(sequences=4, blocks=1, prefill_s=0.5, decode_s=3.0, decode_steps=3)
    opts = EngineOptions(ModelOptions("opt-125m"), offload_dir=str(tmp_path))
    assert record_run(opts, cfg, placement, stats, 16, 4) and calibration.job_hardware(opts).tp_ranks == 1
    # Rank 0 of two: the roofline's spec is one rank's; the run, its collectives included, is kept out of the
    # corrections of one process's constants.
    monkeypatch.setattr(calibration, "current", lambda: SimpleNamespace(world=2))
    assert calibration.job_hardware(opts).tp_ranks == 2
    assert not record_run(opts, cfg, placement, stats, 16, 4)
    entry = calcache.load(FP)
    assert entry is not None and len(entry.runs) == 1
