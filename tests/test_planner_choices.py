"""What the planner chooses besides the shares: weight and cache compression (a lossier kind only for a
predicted gain of ``COMPRESSION_GAIN``) and the compute dtype (the fastest the hardware's rates predict),
from the rule itself to the store a generate job opens and the job it records."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from flexrun import precision
from flexrun.costmodel import choice
from flexrun.costmodel.choice import COMPRESSION_GAIN, choose_compression, compute_dtype_candidates
from flexrun.costmodel.equations import FUSED_MAX_ROWS, compressed_fraction, cost_terms
from flexrun.costmodel.hardware import PRESETS, HardwareSpec
from flexrun.costmodel.search import plan
from flexrun.jobs.autoplace import compressible
from flexrun.kernels import quantized
from flexrun.resolver import resolve
from tests.helpers import run
from tests.hf_reference import save_tiny_opt, tiny_opt_config

GiB = 1 << 30
CPU = PRESETS["cpu"]


# ---- the rule ------------------------------------------------------------------------------------------
def test_a_lossier_compression_must_beat_every_less_lossy_one_by_the_gain() -> None:
    assert COMPRESSION_GAIN == 1.3
    off, w8, w4 = ("", ""), ("int8", ""), ("int4", "")
    assert choose_compression({off: 1.0, w8: 1.29, w4: 1.2}) == off  # 1.29x is not worth int8's loss
    assert choose_compression({off: 1.0, w8: 1.3, w4: 1.5}) == w8  # int4 is only 1.15x over int8
    assert choose_compression({off: 1.0, w8: 1.3, w4: 1.7}) == w4  # 1.31x over int8, 1.7x over none
    # int4 beats none by 1.35x but not int8 (1.2x): the less lossy of the two fitting options wins.
    assert choose_compression({off: 1.0, w8: 1.2, w4: 1.35}) == off
    # What does not fit does not count: int8 is taken however slow when nothing less lossy fits.
    assert choose_compression({off: None, w8: 0.5, w4: 0.6}) == w8
    assert choose_compression({off: None, w8: None, w4: None}) is None
    # Weights and cache: each compressed one must beat every option compressed less on both counts.
    speeds = {off: 1.0, ("", "int8"): 1.5, w8: 1.2, ("int8", "int8"): 1.8}
    assert choose_compression(speeds) == ("", "int8")  # int8 both: 1.2x over cache alone
    speeds[("int8", "int8")] = 2.0
    assert choose_compression(speeds) == ("int8", "int8")


def test_the_gain_is_one_named_constant(monkeypatch) -> None:
    speeds = {("", ""): 1.0, ("int8", ""): 1.2}
    assert choose_compression(speeds) == ("", "")
    monkeypatch.setattr(choice, "COMPRESSION_GAIN", 1.1)
    assert choose_compression(speeds) == ("int8", "")


# ---- the planner ---------------------------------------------------------------------------------------
def _slow_disk(host: int = 1 * GiB) -> HardwareSpec:
    """This VM's preset with a 200 MB/s disk and a 1 GiB host budget: OPT-1.3B streams its weights."""
    return dataclasses.replace(CPU, disk_to_host_bw=0.2e9).with_memory(host=host, disk=64 * GiB)


def test_weights_streamed_from_a_slow_disk_are_compressed_and_the_plan_says_why() -> None:
    result = plan(resolve("opt-1.3b"), _slow_disk(), 32, 128, max_block_size=8)
    pl, weighed = result.placement, result.weighed
    # Decode reads a share of the weights from disk every step: int8 halves those bytes, and int4 (repacked
    # for the fused op as read) beats int8 by more than the gain again. (Its resident codes are held once, in
    # the fused op's layout, so 1 GiB holds ~90% of its weights: a tenth streams.)
    assert pl.compress_weight == "int4" and pl.weights.disk > 0.05
    assert weighed["int8/none"] >= COMPRESSION_GAIN * weighed["none/none"]
    assert weighed["int4/none"] >= COMPRESSION_GAIN * weighed["int8/none"]
    assert (
        result.reasons[0].startswith("int4 weights: predicted ")
        and "x over int8 (bound by decode: disk->h" in (result.reasons[0])
    )
    # With the weights that small, decode waits on the cache read from disk: int8 halves it, by more than the
    # gain over what is chosen (int4 cache by less again).
    assert pl.compress_cache == "int8" and weighed["int4/int8"] >= COMPRESSION_GAIN * weighed["int4/none"]
    assert weighed["int4/int4"] < COMPRESSION_GAIN * weighed["int4/int8"]
    # Where int4 read from disk is dequantized every step instead (no repack into the fused op's layout), as
    # slowly as it was before the repack existed (benchmarks/README.md: ~0.125e9 values/s), int8 is chosen
    # (with 640 MiB of RAM, where most of int4's weights would be read from disk too).
    int4 = {"dequant": 0.125e9, "fused_mm_flops": 40e9}
    no_repack = dataclasses.replace(_slow_disk(640 << 20), quant_rates={**CPU.quant_rates, "int4": int4})
    result = plan(resolve("opt-1.3b"), no_repack, 32, 128, max_block_size=8)
    assert result.placement.compress_weight == "int8" and result.weighed["int4/none"] < result.weighed["int8/none"]
    assert result.reasons[0].startswith("int8 weights: predicted ") and "over uncompressed" in result.reasons[0]


def test_everything_in_memory_with_a_small_gain_stays_uncompressed() -> None:
    # A long prompt and few new tokens: prefill's matmuls dominate, and compression only adds dequantization.
    result = plan(resolve("opt-1.3b"), CPU.with_memory(host=20 * GiB), 512, 8, max_block_size=8)
    pl = result.placement
    assert not (pl.compress_weight or pl.compress_cache) and pl.weights.host == 1
    assert all(v is not None for v in result.weighed.values())  # everything fits: none was forced
    assert max(result.weighed.values()) < COMPRESSION_GAIN * result.weighed["none/none"]
    assert result.reasons[0].startswith("uncompressed weights: predicted int8 ")
    assert result.reasons[1].startswith("uncompressed cache: predicted int8 ")


def test_pinned_compression_is_held_and_not_explained() -> None:
    cfg, hw = resolve("opt-1.3b"), _slow_disk()
    result = plan(cfg, hw, 32, 128, max_block_size=8, compress=("", None))
    assert result.placement.compress_weight == ""
    assert len(result.reasons) == 1 and result.reasons[0].endswith("(compression needs 1.3x)")
    assert set(result.weighed) == {"none/none", "none/int8", "none/int4"}
    held = plan(cfg, hw, 32, 128, max_block_size=8, compress=("int4", "int8"))
    assert (held.placement.compress_weight, held.placement.compress_cache) == ("int4", "int8")
    assert held.reasons == ()
    # A kind the model cannot be converted to is not offered.
    only = plan(cfg, hw, 32, 128, max_block_size=8, compress=(("", "int4"), ""))
    assert set(only.weighed) == {"none/none", "int4/none"}


def test_compressed_weights_are_priced_as_the_cpu_kernels_run_them() -> None:
    assert FUSED_MAX_ROWS == quantized.FUSED_MAX_ROWS  # the cost model's copy of the kernel's switch
    cfg = resolve("opt-1.3b")
    int4 = cost_terms(cfg, CPU, 8, 1, 32, 16, "int4")
    # Decode: a resident int4 weight runs the fused op; one read from disk is repacked for it first.
    assert int4.decode.compute.coef[("weights", "disk")] > 2 * int4.decode.compute.coef[("weights", "host")]
    assert not int4.prefill.compute.coef  # prefill's 256 rows dequantize it, wherever it is
    dense = cost_terms(cfg, CPU, 8, 1, 32, 16).prefill.compute.const
    assert int4.prefill.compute.const > dense
    int8 = cost_terms(cfg, CPU, 8, 1, 32, 16, "int8").decode.compute
    assert not int8.coef  # per-row int8 goes to the fused op from either tier
    # A resident int4 weight's codes are held once, in the fused op's layout, with its bfloat16 scale and zero
    # beside the canonical scales: 4 bytes a group of 64 more.
    packed = int4.memory["host"].coef[("weights", "host")] - cfg.model_bytes() * compressed_fraction(2, "int4")
    matrices = sum(math.prod(shape) for shape in cfg.layer_shapes().values() if len(shape) == 2)
    assert packed == pytest.approx(matrices * cfg.num_hidden_layers * 4 / 64)
    # A GPU spec has no such figures: dequantization is priced as passes over memory, wherever the weight is.
    assert not cost_terms(cfg, PRESETS["t4"], 8, 1, 32, 16, "int4").decode.compute.coef


# ---- the compute dtype ---------------------------------------------------------------------------------
def test_the_compute_dtype_is_the_fastest_the_rates_predict() -> None:
    cfg = resolve("opt-1.3b")  # float16
    hw = CPU.with_memory(host=20 * GiB)
    # This VM: float32 (precision's rule without 16-bit hardware) is ~5x bfloat16's rate; float16 unpriced.
    assert compute_dtype_candidates("float16", "float32", hw) == ["float32", "bfloat16"]
    base = dataclasses.replace(cfg, compute_dtype="float32")
    result = plan(base, hw, 128, 32, max_block_size=8, compute_dtypes=["float32", "bfloat16"])
    assert (
        result.compute_dtype == "float32"
        and result.reasons[-1] == "compute float32 (bfloat16 not predicted 1.1x faster)"
    )
    # A CPU whose bfloat16 matmuls run 4x float32's (AMX, say): bfloat16 wins, and the plan says by how much.
    f32 = dict(hw.rates_by_dtype["float32"])
    amx = dataclasses.replace(
        hw,
        mm_flops_prefill=4 * f32["mm_flops_prefill"],
        mm_flops_decode=4 * f32["mm_flops_decode"],
        decode_by_batch={"float32": hw.decode_by_batch["float32"]},
    )
    result = plan(base, amx, 128, 32, max_block_size=8, compute_dtypes=["float32", "bfloat16"])
    assert result.compute_dtype == "bfloat16" and result.reasons[-1].startswith("compute bfloat16: predicted ")
    assert result.reasons[-1].endswith("x over float32")
    # Without rates for the rule's dtype the rule stands: nothing to weigh it against.
    assert compute_dtype_candidates("float16", "float16", hw) == ["float16"]
    assert compute_dtype_candidates("float32", "float32", hw) == ["float32"]  # no bfloat16 for a float32 store


def test_plan_prints_the_choices_and_their_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The spec's CPU is taken to be this one: make it the AVX2 VM the spec was measured on (no native 16-bit
    # matmuls), so the float16 model's rule is float32 and bfloat16 is weighed against it on any machine.
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    spec = _slow_disk().save(tmp_path / "slow.json")
    args = ["plan", "-m", "opt-1.3b", "--hardware", str(spec), "--prompt-len", "32", "--gen-len", "128"]
    result = run(*args, "--max-block-size", "8", "--host-mem", "1GiB")
    assert result.exit_code == 0, result.output
    assert "choices:    int4 weights: predicted " in result.output
    assert "compute float32 (bfloat16 not predicted 1.1x faster)" in result.output
    assert result.output.rstrip().endswith("--compress-weight int4 --compress-cache int8")
    pinned = run(*args, "--max-block-size", "8", "--host-mem", "1GiB", "--compress-weight", "none", "--json")
    data = json.loads(pinned.output)
    assert data["placement"]["compress_weight"] == "" and data["compute_dtype"] == "float32"
    assert run(*args, "--compress-weight", "int2").exit_code == 2


# ---- the job: the chosen kind reaches the placement, the store and the job's record --------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_opt(tmp_path_factory.mktemp("choices") / "ckpt", seed=7).path


def test_only_compressions_the_model_converts_to_are_offered() -> None:
    assert compressible(tiny_opt_config()) == ("", "int8")  # K = 48 and 80: no int4 group divides them
    assert compressible(resolve("opt-1.3b")) == ("", "int8", "int4")
    wider = tiny_opt_config(hidden_size=64, n_head=4, ffn_embed_dim=128)
    assert compressible(wider) == ("", "int8", "int4")  # groups of 64 (the default) divide 64 and 128
    assert compressible(wider, 128) == ("",)  # --group-size 128 (int8 per group too) does not divide 64


def test_generate_opens_the_store_of_the_compression_the_planner_chose(tiny: Path, tmp_path: Path) -> None:
    # A 1 MB/s disk under weights held there: every decode step reads them, so int8 (a quarter of float32's
    # bytes) is worth its loss; the tiny model's shapes allow no int4 group.
    slow = dataclasses.replace(CPU, disk_to_host_bw=1e6).save(tmp_path / "slow.json")
    stores, out = tmp_path / "stores", tmp_path / "out.jsonl"
    base = ["generate", "-m", str(tiny), "--store-dir", str(stores), "--offload-dir", str(tmp_path / "off")]
    base += ["--weights", "disk=100", "--max-new-tokens", "3", "--json", "-i", "-", "-o", str(out)]
    records = "".join(json.dumps({"id": n, "input_ids": [5 + n, 6, 7]}) + "\n" for n in range(3))
    result = run(*base, "--hardware", str(slow), input=records)
    assert result.exit_code == 0, result.output
    assert "int8 weights: predicted " in result.stderr
    summary = json.loads(result.stderr.strip().splitlines()[-1])
    assert summary["placement"]["compress_weight"] == "int8"
    assert [p.name for p in stores.iterdir() if "int8" in p.name]  # converted once, compressed
    job = json.loads((tmp_path / "out.jsonl.job.json").read_text())["job"]
    assert job["compress_weight"] == "int8"
    # Resumed on a machine whose planner would not compress (a fast disk, no fused int8 kernel to gain
    # from), the job keeps its int8 weights rather than mixing records of two models.
    out.write_text(out.read_text().splitlines(keepends=True)[0])
    fast = dataclasses.replace(CPU, disk_to_host_bw=1e12, quant_rates={}).save(tmp_path / "fast.json")
    fresh = run(*base[:-2], "--hardware", str(fast), input=records)  # to stdout: a job of its own
    assert json.loads(fresh.stderr.strip().splitlines()[-1])["placement"]["compress_weight"] == ""
    result = run(*base, "--hardware", str(fast), input=records)
    assert result.exit_code == 0, result.output
    assert "resuming: 1 of 3 records" in result.stderr
    assert json.loads(result.stderr.strip().splitlines()[-1])["placement"]["compress_weight"] == "int8"
    assert len(out.read_text().splitlines()) == 3
    # Pinned: none is none, whatever the planner would gain.
    result = run(*base, "--hardware", str(slow), "--compress-weight", "none", "--overwrite", input=records)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stderr.strip().splitlines()[-1])["placement"]["compress_weight"] == ""
    assert "int8 weights" not in result.stderr
    # A resume that pins another compression than the records' is refused, naming it.
    result = run(*base, "--hardware", str(slow), "--compress-weight", "int8", input=records)
    assert result.exit_code == 1 and "--compress-weight none there, int8 here" in result.output


def test_manual_placement_leaves_compression_off(tiny: Path, tmp_path: Path) -> None:
    slow = dataclasses.replace(CPU, disk_to_host_bw=1e6).save(tmp_path / "slow.json")
    args = ["bench", "-m", str(tiny), "--store-dir", str(tmp_path / "s"), "--offload-dir", str(tmp_path / "off")]
    args += ["--hardware", str(slow), "--prompt-len", "4", "--gen-len", "2", "--json"]
    manual = json.loads(run(*args, "--placement", "manual", "--weights", "disk=100").stdout)
    assert manual["placement"]["compress_weight"] == "" and manual["placement"]["compress_cache"] == ""
    auto = json.loads(run(*args, "--weights", "disk=100").stdout)
    assert auto["placement"]["compress_weight"] == "int8"


def test_a_store_given_directly_runs_with_the_compression_it_holds(tmp_path: Path) -> None:
    # int4 in groups of 32 (not int4's default 64): under auto, the store is what it is.
    ckpt = save_tiny_opt(tmp_path / "ckpt", seed=8, hidden_size=64, n_head=4, ffn_embed_dim=128).path
    store = tmp_path / "int4g32"
    converted = run("convert", "-m", str(ckpt), "-o", str(store), "--compress-weight", "int4", "--group-size", "32")
    assert converted.exit_code == 0, converted.output
    args = ["bench", "-m", str(store), "--offload-dir", str(tmp_path / "off"), "--prompt-len", "4", "--gen-len", "2"]
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["placement"]["compress_weight"] == "int4"
    assert "int4 weights:" not in result.stderr  # nothing was chosen: the store holds them
    # Pinned to another compression, it is refused before anything else.
    result = run(*args, "--compress-weight", "none")
    assert result.exit_code == 1 and "holds int4 g32 weights, not uncompressed" in result.output
