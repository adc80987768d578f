"""This machine's calibration: measured on first use, valid only for the machine it was measured on (the
fingerprint), disks per filesystem, and the planner's constants corrected by recorded runs, boundedly."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flexrun.costmodel import calcache, calibrate, machine, machine_id
from flexrun.costmodel.calcache import Calibration, DiskFigures
from flexrun.costmodel.calibrate import QUICK
from flexrun.costmodel.hardware import PRESETS
from flexrun.costmodel.hotset import hot_terms
from flexrun.costmodel.prediction import predict
from flexrun.jobs.autoplace import choose_placement
from flexrun.jobs.calibration import record_run
from flexrun.jobs.options import EngineOptions, ModelOptions, PlacementRequest
from flexrun.placement import Placement, Shares
from flexrun.resolver import resolve
from flexrun.runtime.stats import RunStats
from flexrun.runtime.tiers import Budgets

FP = {"cpu": "Test CPU", "cpu_flags": "avx avx2", "cores": "2", "memory_gib": "24", "gpu": "none", "torch": "2.13"}
GiB = 1 << 30


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache dir, this machine taken to be ``FP``, and no hardware named by the environment."""
    monkeypatch.setenv("FLEXRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(machine.ENV, raising=False)
    monkeypatch.setattr(machine, "machine_fingerprint", lambda: dict(FP))
    monkeypatch.setattr(machine, "FIRST", QUICK)  # the first-use sizes shrunk: seconds, not the real figures
    monkeypatch.setattr(machine, "machine_load", lambda: (0.5, 2))  # a quiet machine, whatever this one's load
    return tmp_path / "cache"


def _entry(fingerprint: dict[str, str] | None = None, directory: Path | None = None) -> Calibration:
    spec = dataclasses.replace(PRESETS["cpu"], name="calibrated", source="test")
    disks = (
        {machine_id.filesystem_key(directory): DiskFigures(2 * GiB, GiB, [GiB, 2 * GiB, 3 * GiB])} if directory else {}
    )
    return Calibration(dict(fingerprint or FP), spec, disks)


# ---- the fingerprint ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field", sorted(FP), ids=lambda f: f"field_{f}")
def test_the_fingerprint_key_changes_with_each_field(field: str) -> None:
    changed = {**FP, field: FP[field] + "x"}
    assert machine_id.fingerprint_key(changed) != machine_id.fingerprint_key(FP)
    assert machine_id.fingerprint_key(dict(reversed(list(FP.items())))) == machine_id.fingerprint_key(FP)


def test_the_fingerprint_reads_the_cpu_and_its_kernel_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 fma avx512f avx512_bf16\n")
    assert machine_id._cpuinfo(info) == ("AMD EPYC", "avx avx2 fma avx512f avx512_bf16")
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 fma\n")
    assert machine_id._cpuinfo(info) == ("AMD EPYC", "avx avx2 fma")  # the same model without AVX-512: another key
    fp = machine_id.machine_fingerprint()
    assert set(fp) == set(FP) and int(fp["cores"]) >= 1 and int(fp["memory_gib"]) >= 1


def test_filesystem_key_names_the_device_and_mount(tmp_path: Path) -> None:
    key = machine_id.filesystem_key(tmp_path / "not" / "made" / "yet")
    assert key == machine_id.filesystem_key(tmp_path) and key.split()[0].count(":") == 1
    assert machine_id.filesystem_key("/proc") != key  # another filesystem


# ---- first use, and a stale calibration ----------------------------------------------------------------
def test_first_use_calibrates_once_and_caches(cache: Path, tmp_path: Path) -> None:
    err = io.StringIO()
    hw = machine.hardware_for(None, tmp_path / "off", stderr=err)
    assert "no calibration for this machine" in err.getvalue() and str(cache / "calibration") in err.getvalue()
    assert hw.name == "calibrated" and "on first use" in hw.source and hw.disk_to_host_bw > 0
    assert calcache.path_for(FP).is_file()
    again = io.StringIO()
    assert machine.hardware_for(None, tmp_path / "off", stderr=again).source == hw.source
    assert again.getvalue() == ""  # cached: measured once


def test_a_calibration_of_another_machine_is_not_used(cache: Path, tmp_path: Path) -> None:
    other = _entry({**FP, "cpu_flags": "avx avx2 avx512f"}, tmp_path)
    other.save()
    err = io.StringIO()
    hw = machine.hardware_for(None, tmp_path, stderr=err)
    assert "no calibration for this machine" in err.getvalue() and hw.source != "test"
    # A file under this machine's name whose recorded fingerprint is another's (copied from elsewhere).
    forged = _entry(FP, tmp_path)
    forged.save()
    text = calcache.path_for(FP).read_text().replace('"Test CPU"', '"Other CPU"')
    calcache.path_for(FP).write_text(text)
    assert calcache.load(FP) is None


def test_presets_and_the_environment_win_over_the_calibration(cache: Path, tmp_path: Path, monkeypatch) -> None:
    _entry(FP, tmp_path).save()
    assert machine.hardware_for("t4", tmp_path) == PRESETS["t4"]
    monkeypatch.setenv(machine.ENV, "a100-80gb")
    assert machine.hardware_for(None, tmp_path) == PRESETS["a100-80gb"]


def test_the_disk_is_measured_per_offload_filesystem(cache: Path, tmp_path: Path) -> None:
    entry = _entry(FP)  # measured nowhere yet
    entry.save()
    hw = machine.hardware_for(None, tmp_path / "off", stderr=io.StringIO())
    saved = calcache.load(FP)
    assert saved is not None and list(saved.disks) == [machine_id.filesystem_key(tmp_path)]
    assert hw.disk_to_host_bw == saved.disks[machine_id.filesystem_key(tmp_path)].read_bw
    assert len(saved.disks[machine_id.filesystem_key(tmp_path)].read_samples) == QUICK.disk_repeats


# ---- corrections from recorded runs ------------------------------------------------------------------
def _run(ratio: float, cls: str = "decode compute") -> dict[str, Any]:
    return {"phases": {"decode": {"predicted_s": 1.0, "measured_s": ratio, "class": cls}}}


def test_one_run_moves_a_constant_half_way_and_the_correction_is_bounded() -> None:
    entry = _entry()
    entry.runs = [_run(2.0)]
    factor, n = entry.corrections()["decode compute"]
    assert n == 1 and factor == pytest.approx(math.sqrt(2.0))
    entry.runs = [_run(1000.0)] * 10
    assert entry.corrections()["decode compute"][0] == pytest.approx(calcache.MAX_CORRECTION)
    entry.runs = [_run(1e-4)] * 10
    assert entry.corrections()["decode compute"][0] == pytest.approx(1 / calcache.MAX_CORRECTION)
    # The median: one wild run among consistent ones barely moves it.
    entry.runs = [_run(1.2), _run(1.2), _run(1.2), _run(40.0)]
    assert entry.corrections()["decode compute"][0] == pytest.approx(1.2 ** (4 / 5))
    entry.runs = [_run(0.5, "disk"), {"phases": {"decode": {"predicted_s": 0, "measured_s": 1, "class": "disk"}}}]
    assert set(entry.corrections()) == {"disk"} and entry.corrections()["disk"][1] == 1


def test_runs_recorded_on_a_busy_machine_are_left_out_of_the_corrections() -> None:
    entry = _entry()
    quiet = {**_run(2.0), "load": 1.5, "load_end": 3.0, "threads": 2, "cores": 2}  # itself 2 of the 3 at its end
    busy_start = {**_run(40.0), "load": 2.5, "load_end": 3.0, "threads": 2, "cores": 2}  # others above 2 cores
    busy_end = {**_run(40.0), "load": 0.5, "load_end": 4.5, "threads": 2, "cores": 2}  # 2.5 of others by its end
    unknown = _run(2.0)  # recorded before loads were: counted
    entry.runs = [quiet, busy_start, busy_end]
    assert [calcache.busy(r) for r in entry.runs] == [False, True, True] and not calcache.busy(unknown)
    assert entry.corrections()["decode compute"] == pytest.approx((math.sqrt(2.0), 1))
    entry.runs = [busy_start] * 30 + [unknown]  # busy records do not crowd quiet ones out of the recent window
    assert entry.corrections()["decode compute"] == pytest.approx((math.sqrt(2.0), 1))


def test_a_record_carries_the_load_when_planned_and_at_its_end(cache: Path, tmp_path: Path, monkeypatch) -> None:
    _entry(FP, tmp_path).save()
    loads = iter([(3.25, 2), (4.5, 2)])  # when planning, then when recording
    monkeypatch.setattr(machine, "machine_load", lambda: next(loads))
    machine.hardware_for(None, tmp_path)
    pred = SimpleNamespace(prefill_s=1.0, decode_s=3.0, gen_len=4, prefill=SimpleNamespace(bottleneck="compute"))
    pred.decode = SimpleNamespace(bottleneck="disk->host")
    stats = RunStats(blocks=1, prefill_s=1.0, decode_s=3.0, decode_steps=3)
    record = machine.run_record(pred, stats, Placement(), "m", "float32")
    assert record is not None and record["load"] == 3.25 and record["load_end"] == 4.5 and record["cores"] == 2
    assert record["threads"] >= 1 and calcache.busy(record)


def test_corrections_scale_only_their_class_constants() -> None:
    base = PRESETS["cpu"]
    disk = machine.corrected(base, {"disk": (2.0, 3)})
    assert disk.disk_to_host_bw == base.disk_to_host_bw / 2 and disk.host_to_disk_bw == base.host_to_disk_bw / 2
    assert disk.mm_flops_decode == base.mm_flops_decode and "disk x2.00 (3 runs)" in disk.source
    dec = machine.corrected(base, {"decode compute": (2.0, 1)})
    assert dec.mm_flops_decode == base.mm_flops_decode / 2 and dec.mm_flops_prefill == base.mm_flops_prefill
    assert dec.mm_decode_rate(8) == pytest.approx(base.mm_decode_rate(8) / 2)
    assert all(
        dec.rates_by_dtype[d]["mm_flops_prefill"] == r["mm_flops_prefill"] for d, r in base.rates_by_dtype.items()
    )
    assert machine.corrected(base, {}) == base


def test_a_run_is_recorded_against_the_uncorrected_spec(cache: Path, tmp_path: Path, monkeypatch) -> None:
    _entry(FP, tmp_path).save()
    monkeypatch.setattr(machine, "MIN_RECORD_S", 0.0)
    cfg = resolve("opt-125m")
    placement = Placement(gpu_batch_size=4, num_gpu_batches=1)
    stats = RunStats(sequences=4, blocks=1, prefill_s=0.5, decode_s=3.0, decode_steps=3)
    opts = EngineOptions(ModelOptions("opt-125m"), offload_dir=str(tmp_path))
    assert record_run(opts, cfg, placement, stats, 16, 4)
    for _ in range(2):  # the same run again: the ratio must not compound
        record_run(opts, cfg, placement, stats, 16, 4)
    entry = calcache.load(FP)
    assert entry is not None and len(entry.runs) == 3
    decode = entry.runs[0]["phases"]["decode"]
    assert decode["measured_s"] == pytest.approx(1.0) and decode["class"] in calcache.CLASSES
    assert {r["phases"]["decode"]["predicted_s"] for r in entry.runs} == {decode["predicted_s"]}
    hw = machine.hardware_for(None, tmp_path)
    assert "corrected by recorded runs" in hw.source
    # Not recorded: a job planned with a named spec, or with no calibration to record into.
    assert not record_run(
        dataclasses.replace(opts, placement=PlacementRequest(hardware=PRESETS["t4"])), cfg, placement, stats, 16, 4
    )
    calcache.path_for(FP).unlink()
    assert not record_run(opts, cfg, placement, stats, 16, 4)


def test_a_short_run_is_not_recorded() -> None:
    pred = SimpleNamespace(prefill_s=1.0, decode_s=1.0, gen_len=4, prefill=None, decode=None)
    stats = RunStats(blocks=1, prefill_s=0.1, decode_s=0.1, decode_steps=3)
    assert machine.run_record(pred, stats, Placement(), "m", "float32") is None


# ---- the job's shape ---------------------------------------------------------------------------------
def test_the_plan_never_takes_a_block_bigger_than_the_job() -> None:
    cfg = resolve("opt-125m")
    request = PlacementRequest(hardware=PRESETS["cpu"])
    budgets = Budgets(host=8 * GiB, disk=8 * GiB)
    free = choose_placement(cfg, request, budgets, 32, 8).placement
    assert free.block_size > 3  # the planner would take a bigger block for a bigger job
    three = choose_placement(cfg, request, budgets, 32, 8, num_prompts=3).placement
    assert three.block_size <= 3


def test_a_cache_dir_that_cannot_be_written_costs_no_job(cache: Path, tmp_path: Path, monkeypatch) -> None:
    def refuse(self: Calibration) -> Path:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Calibration, "save", refuse)
    hw = machine.hardware_for(None, tmp_path / "off", stderr=io.StringIO())
    assert hw.name == "calibrated" and not calcache.path_for(FP).exists()


# ---- the disk at the engine's request sizes ------------------------------------------------------------
def test_the_disk_probe_reads_at_each_request_size_the_file_holds(tmp_path: Path) -> None:
    reads, write, _, by_size = calibrate.measure_disk(tmp_path, QUICK)
    assert len(reads) == QUICK.disk_repeats and write > 0
    assert set(by_size) == {str(r) for r in QUICK.disk_requests} and all(v > 0 for v in by_size.values())
    small = dataclasses.replace(QUICK, disk_requests=(1 << 20, 1 << 40))  # a call bigger than the file: skipped
    assert set(calibrate.measure_disk(tmp_path, small)[3]) == {str(1 << 20)}
    disk = DiskFigures(2 * GiB, GiB, [2 * GiB], read_by_size={"1048576": GiB, "67108864": 3 * GiB})
    assert DiskFigures.from_dict(disk.to_dict()) == disk


def test_the_planner_reads_weights_at_the_rate_of_the_engines_request_size(tmp_path: Path) -> None:
    curve = {str(1 << 20): 0.5e9, str(64 << 20): 2e9}
    spec = dataclasses.replace(PRESETS["cpu"], disk_read_by_size=curve)
    assert spec.disk_read_rate(1 << 10) == 0.5e9 and spec.disk_read_rate(1 << 30) == 2e9  # clamped
    assert spec.disk_read_rate(8 << 20) == pytest.approx(0.5e9 * 4**0.5)  # log-log: half way from 1 to 64 MiB
    assert PRESETS["cpu"].disk_read_rate(8 << 20) == PRESETS["cpu"].disk_to_host_bw  # no curve: one rate
    assert type(spec).from_dict(spec.to_dict()).disk_read_by_size == curve
    # A calibration's curve reaches the planner's spec, and a disk correction scales it with the rest.
    entry = _entry(FP, tmp_path)
    entry.disks[machine_id.filesystem_key(tmp_path)].read_by_size = curve
    base = machine.base_spec(entry, tmp_path)
    assert base.disk_read_by_size == curve
    assert machine.corrected(base, {"disk": (2.0, 3)}).disk_read_rate(1 << 20) == 0.25e9
    # OPT-1.3B reads its weights in calls of tens of MiB (a tensor each): the rate there, not the 16 MiB probe's.
    cfg = resolve("opt-1.3b")
    placement = Placement(weights=Shares.only("disk"))
    slow = predict(cfg, dataclasses.replace(spec, disk_read_by_size={}), placement, 32, 8)
    fast = predict(cfg, spec, placement, 32, 8)
    request = hot_terms(cfg).request
    assert 16 << 20 < request < 128 << 20
    ratio = spec.disk_read_rate(request) / spec.disk_to_host_bw
    assert slow.decode.links["disk->host"] / fast.decode.links["disk->host"] == pytest.approx(ratio)
