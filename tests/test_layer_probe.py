"""The first-use probe of a job's layer: it runs the engine's fused layer, its factor seeds the compute
corrections (bounded, refined by the runs of that layer), it is cached per machine, layer, dtype and shape
bucket, and a failed probe leaves the plan to the plain calibration. No timing is asserted: the layer's
measured seconds are replaced by made-up ones wherever a figure is checked."""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from flexrun.config import OptConfig
from flexrun.costmodel import calcache, layerprobe, machine, machine_id
from flexrun.costmodel.calcache import Calibration, DiskFigures
from flexrun.costmodel.hardware import PRESETS
from flexrun.costmodel.layerprobe import JobShape, ProbeShape, layer_compute, probe_shape
from flexrun.jobs import layerprobe as jobs_probe
from flexrun.jobs.calibration import machine_hardware
from flexrun.runtime import probe as runtime_probe
from flexrun.runtime.probe import LayerTimes, time_layer
from tests.helpers import run
from tests.hf_reference import tiny_opt_config
from tests.test_costmodel_equations import BOX, TINY, US

FP = {"cpu": "Test CPU", "cpu_flags": "avx avx2", "cores": "2", "memory_gib": "24", "gpu": "none", "torch": "2.13"}
GiB = 1 << 30
CFG = tiny_opt_config()
JOB = JobShape(prompt_len=16, gen_len=4, gpu_batch_size=2, block_size=4)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache dir holding this machine's (``FP``'s) calibration, on a quiet machine, no hardware named
    by the environment."""
    monkeypatch.setenv("FLEXRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(machine.ENV, raising=False)
    monkeypatch.setattr(machine, "machine_fingerprint", lambda: dict(FP))
    monkeypatch.setattr(machine, "machine_load", lambda: (0.5, 2))
    monkeypatch.setattr(jobs_probe, "machine_load", lambda: (0.5, 2))
    _entry(FP, tmp_path).save()
    return tmp_path


def _entry(fingerprint: dict[str, str], directory: Path) -> Calibration:
    spec = dataclasses.replace(PRESETS["cpu"], name="calibrated", source="test")
    disks = {machine_id.filesystem_key(directory): DiskFigures(2 * GiB, GiB, [2 * GiB])}
    return Calibration(dict(fingerprint), spec, disks)


class Probes:
    """Stands in for ``runtime.probe.time_layer``: counts the probes and says the layer took ``factors`` x
    what the cost model predicts (the real probe when ``factors`` is None)."""

    def __init__(self, factors: tuple[float, float] | None = (3.0, 2.0)) -> None:
        self.factors = factors
        self.shapes: list[ProbeShape] = []

    def __call__(self, cfg: OptConfig, shape: ProbeShape) -> LayerTimes:
        self.shapes.append(shape)
        if self.factors is None:
            return time_layer(cfg, shape)
        prefill_s, decode_s = layer_compute(cfg, PRESETS["cpu"], shape)
        return LayerTimes(prefill_s * self.factors[0], decode_s * self.factors[1], 0.0)


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> Probes:
    fake = Probes()
    monkeypatch.setattr(jobs_probe, "time_layer", fake)
    return fake


def _hw(cache: Path, cfg: OptConfig = CFG, job: JobShape = JOB, err: io.StringIO | None = None) -> Any:
    return machine_hardware(None, cache, cfg, job, stderr=err or io.StringIO())


# ---- what the probe runs ---------------------------------------------------------------------------
VARIANTS = {
    "opt": {},
    "opt-post-ln": {"do_layer_norm_before": False},
    "llama-gqa": {
        "arch": "llama",
        "position": "rotary",
        "norm": "rmsnorm",
        "norm_bias": False,
        "gated_mlp": True,
        "activation": "silu",
        "enable_bias": False,
        "n_kv_head": 1,
    },
    "bloom-alibi": {"arch": "bloom", "position": "alibi", "activation": "gelu", "embed_norm": True},
    "gptj-parallel": {"arch": "gptj", "position": "rotary", "parallel_attn": True, "shared_norm": True},
    "bf16-in-float32": {"dtype": "bfloat16", "compute_dtype": "float32"},
}


@pytest.mark.parametrize("fields", VARIANTS.values(), ids=list(VARIANTS))
def test_the_probe_runs_the_engines_layer_of_each_kind(fields: dict[str, Any]) -> None:
    cfg = tiny_opt_config(**fields)
    times = time_layer(cfg, ProbeShape(rows=2, prompt_len=8, decode_rows=3, gen_len=4))
    assert times.prefill_s > 0 and times.decode_s > 0 and times.total_s >= times.prefill_s
    assert time_layer(cfg, ProbeShape(2, 8, 0, 1)).decode_s == 0.0  # no decode step asked for


def test_random_weights_repeat_a_drawn_tile() -> None:
    gen = torch.Generator().manual_seed(0)
    w = runtime_probe._random((3, runtime_probe._TILE + 5), torch.bfloat16, torch.device("cpu"), gen, scale=0.5)
    flat = w.flatten()
    assert w.dtype == torch.bfloat16 and torch.equal(
        flat[: runtime_probe._TILE], flat[runtime_probe._TILE : 2 * runtime_probe._TILE]
    )
    assert 0.3 < float(flat.float().std()) < 0.7


def test_the_cost_model_prices_one_layer_without_the_head_by_hand() -> None:
    # TINY on BOX (tests/test_costmodel_equations.py): prefill of 2 x 16 tokens: matmuls max(2*2*16*49152 / 1e12
    # = 3.146 us, one read of the layer 99968 B / 1e11 = 1.0 us) + attention 4*2*16*16*64 / 1e11 = 1.311 us;
    # a decode step of 6 rows at 16 + 4/2 = 18 tokens: max(2*6*49152 / 1e11, 1.0 us) + 4*6*18*64 / 1e10.
    prefill_s, decode_s = layer_compute(TINY, BOX, ProbeShape(rows=2, prompt_len=16, decode_rows=6, gen_len=4))
    assert prefill_s == pytest.approx((3.145728 + 1.31072) * US)
    assert decode_s == pytest.approx((5.89824 + 2.7648) * US)
    assert layer_compute(TINY, BOX, ProbeShape(2, 16, 0, 4))[1] == 0.0


def test_the_probed_shape_is_the_jobs_bounded_and_bucketed() -> None:
    hw = PRESETS["cpu"]
    assert probe_shape(CFG, hw, JOB) == ProbeShape(2, 16, 4, 4)
    free = probe_shape(CFG, hw, JobShape(16, 4))  # the planner's micro-batch not known yet
    assert free.rows * 16 == layerprobe.PREFILL_TOKENS and free.decode_rows == layerprobe.DECODE_ROWS
    assert probe_shape(CFG, hw, JobShape(16, 4, num_prompts=3)) == ProbeShape(3, 16, 3, 4)
    assert probe_shape(CFG, hw, JobShape(16, 1)).decode_rows == 0  # one token: no decode step
    big = OptConfig(name="big", num_hidden_layers=2, hidden_size=8192, n_head=64, ffn_embed_dim=32768)
    fast = dataclasses.replace(hw, mm_flops_prefill=1e13, mm_flops_decode=1e13, decode_by_batch={})
    bounded = probe_shape(big, fast, JobShape(2048, 32, 64, 256))
    assert bounded is not None and max(layer_compute(big, fast, bounded)) <= layerprobe.MAX_CALL_S
    assert bounded.rows == 1 and bounded.prompt_len < 2048 and 1 < bounded.decode_rows < 256
    assert probe_shape(big, hw, JobShape(2048, 32)) is None  # too slow even at one row of 16 tokens
    assert ProbeShape(3, 100, 5, 8).bucket() == ProbeShape(4, 128, 8, 1).bucket() == "p4x128-d8@128"


# ---- cached, and combined with the recorded runs ----------------------------------------------------
def test_the_probe_runs_once_per_key_and_again_for_another_layer(cache: Path, probes: Probes) -> None:
    err = io.StringIO()
    hw = _hw(cache, err=err)
    assert "timing one tiny-opt layer" in err.getvalue() and len(probes.shapes) == 1
    assert "compute probed on one tiny-opt layer (float32, prefill 2 x 16 tokens" in hw.source
    again = io.StringIO()
    assert _hw(cache, err=again).source == hw.source and again.getvalue() == ""  # cached
    assert len(probes.shapes) == 1
    _hw(cache, job=dataclasses.replace(JOB, prompt_len=15))  # another size in the same bucket
    assert len(probes.shapes) == 1
    _hw(cache, cfg=tiny_opt_config(hidden_size=96))  # another layer shape
    _hw(cache, cfg=tiny_opt_config(compute_dtype="bfloat16"))  # another compute dtype
    _hw(cache, job=JobShape(64, 4, 8, 8))  # another bucket
    assert len(probes.shapes) == 4
    entry = calcache.load(FP)
    assert entry is not None and len(entry.probes) == 4
    _hw(cache, cfg=dataclasses.replace(CFG, name="same-layer", num_hidden_layers=7))  # the same layer: cached
    assert len(probes.shapes) == 4


def test_the_probes_factor_seeds_the_compute_corrections(cache: Path, probes: Probes) -> None:
    entry = calcache.load(FP)
    assert entry is not None
    base = machine.base_spec(entry, cache)
    hw = _hw(cache)
    assert hw.mm_flops_prefill == pytest.approx(base.mm_flops_prefill / 3.0)
    assert hw.bmm_flops_prefill == pytest.approx(base.bmm_flops_prefill / 3.0)
    assert hw.mm_flops_decode == pytest.approx(base.mm_flops_decode / 2.0)
    assert hw.disk_to_host_bw == base.disk_to_host_bw  # not compute: untouched
    assert "prefill x3.00, decode x2.00" in hw.source
    # The plan without a model (or of another machine's spec) is as before: no probe.
    assert machine.hardware_for(None, cache).mm_flops_prefill == base.mm_flops_prefill


def test_a_probes_factor_is_bounded(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_probe, "time_layer", Probes((1000.0, 1e-3)))
    base = machine.base_spec(calcache.load(FP), cache)  # type: ignore[arg-type]
    hw = _hw(cache)
    assert hw.mm_flops_prefill == pytest.approx(base.mm_flops_prefill / calcache.MAX_CORRECTION)
    assert hw.mm_flops_decode == pytest.approx(base.mm_flops_decode * calcache.MAX_CORRECTION)


def _run(ratio: float, layer: str, dtype: str = "float32", cls: str = "prefill compute") -> dict[str, Any]:
    return {
        "layer": layer,
        "dtype": dtype,
        "phases": {"prefill": {"predicted_s": 1.0, "measured_s": ratio, "class": cls}},
    }


def test_runs_of_the_probed_layer_refine_its_factor_and_other_layers_runs_do_not(tmp_path: Path) -> None:
    entry = _entry(FP, tmp_path)
    probe = {
        "layer": "L",
        "dtype": "float32",
        "phases": {
            "prefill": {"predicted_s": 1.0, "measured_s": 3.0},
            "decode": {"predicted_s": 2.0, "measured_s": 4.0},
        },
    }
    assert entry.corrections(probe) == {
        "prefill compute": pytest.approx((3.0, 0)),
        "decode compute": pytest.approx((2.0, 0)),
    }
    # Three runs of the layer at 1.5: the median weighs 3/4 against the probe's 1/4 (in logs).
    entry.runs = [_run(1.5, "L")] * 3 + [
        _run(40.0, "other"),
        _run(40.0, "L", "bfloat16"),
        _run(2.0, "other", cls="disk"),
    ]
    factor, n = entry.corrections(probe)["prefill compute"]
    assert n == 3 and factor == pytest.approx(math.exp(math.log(3.0) / 4 + math.log(1.5) * 3 / 4))
    assert entry.corrections(probe)["disk"] == pytest.approx((math.sqrt(2.0), 1))  # every run's, as before
    assert entry.corrections(probe)["decode compute"] == pytest.approx((2.0, 0))
    # Without a probe every run counts, shrunk toward no change as before.
    assert entry.corrections()["prefill compute"][1] == 5
    big = {**probe, "phases": {"prefill": {"predicted_s": 1.0, "measured_s": 100.0}}}
    assert entry.corrections(big)["prefill compute"][0] < calcache.MAX_CORRECTION
    entry.runs = []
    assert entry.corrections(big)["prefill compute"] == pytest.approx((calcache.MAX_CORRECTION, 0))


def test_a_run_record_names_its_layer_and_the_source_says_what_refined_the_probe(cache: Path, probes: Probes) -> None:
    _hw(cache)
    entry = calcache.load(FP)
    assert entry is not None
    entry.runs = [_run(2.0, layerprobe.layer_key(CFG))]
    entry.save()
    assert "prefill compute x2.45 (the probe and 1 run of this layer)" in _hw(cache).source  # 3^(1/2) * 2^(1/2)
    assert len(probes.shapes) == 1


# ---- stale entries and failures -----------------------------------------------------------------------
def test_another_machines_probe_is_not_used(cache: Path, probes: Probes) -> None:
    other = {**FP, "cpu_flags": "avx avx2 avx512f"}
    monkey_entry = _entry(other, cache)
    shape = probe_shape(CFG, monkey_entry.spec, JOB)
    key = layerprobe.probe_key(CFG, shape, torch.get_num_threads())
    monkey_entry.probes[key] = {"shape": shape.to_dict(), "phases": {"prefill": {"measured_s": 9.0}}}
    monkey_entry.save()
    _hw(cache)
    assert len(probes.shapes) == 1  # measured here, not taken from the other machine's file
    entry = calcache.load(FP)
    assert entry is not None and list(entry.probes) == [key]
    assert entry.probes[key]["phases"]["prefill"]["measured_s"] != 9.0


@pytest.mark.parametrize("stale", ["older probe", "other threads", "unreadable", "taken on a busy machine"])
def test_a_stale_probe_is_taken_again(cache: Path, probes: Probes, stale: str) -> None:
    _hw(cache)
    entry = calcache.load(FP)
    assert entry is not None and len(entry.probes) == 1
    key, record = next(iter(entry.probes.items()))
    if stale == "older probe":
        entry.probes = {key.replace(f"v{layerprobe.PROBE_VERSION}", "v0"): record}
    elif stale == "other threads":
        entry.probes = {key.replace(f"t{torch.get_num_threads()}", "t999"): record}
    elif stale == "unreadable":
        entry.probes = {key: {**record, "phases": {"prefill": {"measured_s": "fast"}}}}
    else:
        entry.probes = {key: {**record, "load": 5.0, "cores": 2}}
    entry.save()
    _hw(cache)
    assert len(probes.shapes) == 2
    assert not calcache.busy(calcache.load(FP).probes[key])  # type: ignore[union-attr]


def test_a_busy_machine_keeps_a_busy_probe(cache: Path, probes: Probes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_probe, "machine_load", lambda: (5.0, 2))
    _hw(cache)
    _hw(cache)  # still busy: the probe it has is as good as one taken now
    assert len(probes.shapes) == 1


def test_a_failed_probe_leaves_the_plain_calibration(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def out_of_memory(cfg: OptConfig, shape: ProbeShape) -> LayerTimes:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(jobs_probe, "time_layer", out_of_memory)
    with caplog.at_level(logging.INFO, logger="flexrun"):
        hw = _hw(cache)
    assert hw == machine.hardware_for(None, cache) and "probed" not in hw.source
    warned = [r for r in caplog.records if r.name == jobs_probe.__name__ and r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "CUDA out of memory. Tried to allocate 2.00 GiB" in warned[0].getMessage()
    assert calcache.load(FP).probes == {}  # type: ignore[union-attr]


def test_a_layer_too_big_for_free_memory_is_not_probed(cache: Path, probes: Probes, monkeypatch) -> None:
    monkeypatch.setattr(jobs_probe, "_free_bytes", lambda: 1024)
    assert "probed" not in _hw(cache).source and probes.shapes == []


def test_presets_the_environment_and_mixtures_of_experts_are_not_probed(
    cache: Path, probes: Probes, monkeypatch
) -> None:
    assert machine_hardware("t4", cache, CFG, JOB) == PRESETS["t4"]
    moe = tiny_opt_config(
        arch="mixtral", num_experts=4, experts_per_token=2, gated_mlp=True, activation="silu", enable_bias=False
    )
    assert "probed" not in _hw(cache, cfg=moe).source
    monkeypatch.setenv(machine.ENV, "a100-80gb")
    assert _hw(cache) == PRESETS["a100-80gb"]
    assert probes.shapes == []


# ---- what `flexrun plan` says -------------------------------------------------------------------------
def test_plan_names_the_probe_in_its_hardware_line(cache: Path, probes: Probes) -> None:
    r = run("plan", "-m", "opt-125m", "--prompt-len", "32", "--gen-len", "8", "--host-mem", "4GiB")
    assert r.exit_code == 0, r.output
    line = next(x for x in r.stdout.splitlines() if x.startswith("hardware:"))
    assert "compute probed on one opt-125m layer" in line and "prefill x3.00, decode x2.00" in line
    assert len(probes.shapes) == 1
