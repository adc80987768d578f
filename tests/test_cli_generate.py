"""generate / convert / bench through the CLI, including each bad input's exit code and message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import run
from tests.hf_reference import hf_tokens, save_tiny_opt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    ckpt = save_tiny_opt(tmp_path_factory.mktemp("cli") / "ckpt", seed=3)
    return ckpt.path, ckpt.model


def test_generate_jsonl_matches_hf(ckpt, tmp_path: Path) -> None:
    path, model = ckpt
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "input_ids": [5, 6, 7]}) + "\n\n" + json.dumps({"input_ids": [9, 10]}) + "\n")
    out = tmp_path / "out.jsonl"
    args = [
        "generate",
        "-m",
        str(path),
        "--store-dir",
        str(tmp_path / "stores"),
        "--input",
        str(inp),
        "--output",
        str(out),
    ]
    # Uncompressed: the planner would compress weights read from disk, and HF's tokens are the plain model's.
    args += ["--compress-weight", "none", "--compress-cache", "none"]
    result = run(
        *args, "--max-new-tokens", "4", "--weights", "disk=100", "--offload-dir", str(tmp_path / "off"), "--verbose"
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", 3]
    for r in rows:
        expected = hf_tokens(model, r["input_ids"], 4)
        assert r["output_ids"] == expected[: len(r["output_ids"])] and len(r["output_ids"]) >= 1
    assert "total throughput" in result.output


def test_bench_json(ckpt, tmp_path: Path) -> None:
    path, _ = ckpt
    result = run(
        "bench",
        "-m",
        str(path),
        "--store-dir",
        str(tmp_path),
        "--prompt-len",
        "8",
        "--gen-len",
        "3",
        "--json",
        "--gpu-batch-size",
        "2",
        "--num-gpu-batches",
        "2",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["sequences"] == 4 and data["generated_tokens"] == 12 and data["total_tok_s"] > 0
    # The first token comes once the first (here the only) block's prefill has run, before any decode step.
    assert data["prefill_s"] <= data["first_token_s"] <= data["prefill_s"] + data["decode_s"]
    roof = data["roofline"]
    assert roof["bound_s"] > 0 and roof["measured_s"] == pytest.approx(data["decode_s"] / data["decode_steps"])
    assert roof["measured_over_bound"] == pytest.approx(roof["measured_s"] / roof["bound_s"])


def test_bench_roofline_counts_the_disk_bytes_of_each_step(ckpt, tmp_path: Path) -> None:
    # Weights all on disk: every pass over the stack (the prefill and each decode step) reads them all.
    path, _ = ckpt
    args = ["bench", "-m", str(path), "--store-dir", str(tmp_path), "--prompt-len", "8", "--gen-len", "3"]
    args += ["--placement", "manual", "--weights", "disk=100", "--offload-dir", str(tmp_path / "off")]
    data = json.loads(run(*args, "--json").stdout)
    roof = data["roofline"]
    assert roof["disk_bytes_per_step"] >= data["model_bytes"]
    assert roof["bound_s"] >= roof["disk_bound_s"] > 0
    # The rate achieved in decode: a step's disk bytes over its measured time.
    assert roof["disk_read_bw"] == pytest.approx(roof["disk_bytes_per_step"] / roof["measured_s"])
    result = run(*args)
    assert result.exit_code == 0 and "roofline (" in result.output and "x the bound" in result.output
    assert "/s in decode (calibrated: " in result.output


def test_auto_placement_plans_what_is_not_given(ckpt, tmp_path: Path) -> None:
    path, model = ckpt
    base = ["generate", "-m", str(path), "--store-dir", str(tmp_path), "--max-new-tokens", "3"]
    prompts = ["--input", "-", "--compress-weight", "none", "--compress-cache", "none"]  # HF's tokens: uncompressed
    records = "".join(json.dumps({"input_ids": [5 + n, 6, 7]}) + "\n" for n in range(5))
    # Nothing else given: the planner chooses everything, prints the plan, and the tokens still match HF.
    result = run(*base, *prompts, input=records)
    assert result.exit_code == 0, result.output
    assert "plan (" in result.stderr and "predicted" in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    with torch.no_grad():
        ref = model.generate(torch.tensor([r["input_ids"] for r in rows]), max_new_tokens=3, do_sample=False)
    assert [r["output_ids"] for r in rows] == ref[:, 3:].tolist()
    # What is given is held: weights on disk and micro-batches of 2; the block never exceeds the job.
    result = run(*base, *prompts, "--weights", "disk=100", "--gpu-batch-size", "2", "--verbose", input=records)
    assert result.exit_code == 0, result.output
    assert "placement: weights disk=100 |" in result.stderr and "| batch 2 x" in result.stderr
    assert "time to first token: " in result.stderr
    assert [json.loads(line)["output_ids"] for line in result.stdout.splitlines()] == ref[:, 3:].tolist()


def test_plan_and_calibrate_are_flexrun_commands() -> None:
    result = run("plan", "-m", "opt-30b", "--hardware", "t4", "--compress", "off", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["placement"]["gpu_batch_size"] >= 1
    assert run("calibrate", "--help").exit_code == 0
    assert run("plan", "-m", "opt-30b", "--hardware", "nope").exit_code == 2


def test_convert_writes_a_store(ckpt, tmp_path: Path) -> None:
    path, _ = ckpt
    result = run("convert", "-m", str(path), "--out", str(tmp_path / "s"), "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["config"]["dtype"] == "bfloat16" and "layers.0.qkv_w" in index["tensors"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"input_ids": [1, 2]}\n{"input_ids": [3,\n', "in.jsonl:2: malformed JSON"),
        ('{"text": "hi"}\n', 'in.jsonl:1: record has neither "prompt" nor "input_ids"'),
        ('{"input_ids": [1, 99999]}\n', "outside the vocabulary"),
        ('{"input_ids": ' + json.dumps(list(range(3, 70))) + "}\n", "exceeds the model's 64 positions"),
        ('{"prompt": "hello"}\n', "has no tokenizer"),
        ("\n", "no prompts"),
    ],
)
def test_bad_input_is_one_line_exit_1(ckpt, tmp_path: Path, content: str, message: str) -> None:
    path, _ = ckpt
    inp = tmp_path / "in.jsonl"
    inp.write_text(content)
    result = run("generate", "-m", str(path), "--store-dir", str(tmp_path / "stores"), "--input", str(inp))
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--weights", "host=50"],
        ["--weights", "ram=100"],
        ["--host-mem", "lots"],
        ["--gpu-batch-size", "0"],
        ["--top-p", "2"],
    ],
)
def test_bad_option_values_exit_2(ckpt, args: list[str]) -> None:
    path, _ = ckpt
    result = run("generate", "-m", str(path), "-p", "x", *args)
    assert result.exit_code == 2, result.output


def test_unwritable_offload_dir_and_budget_errors(ckpt, tmp_path: Path) -> None:
    path, _ = ckpt
    blocker = tmp_path / "file"
    blocker.write_text("")
    base = ["generate", "-m", str(path), "--store-dir", str(tmp_path / "stores"), "--input", "-"]
    result = run(*base, "--offload-dir", str(blocker / "sub"), input='{"input_ids": [4, 5]}\n')
    assert result.exit_code == 1 and "offload dir" in result.output
    result = run(*base, "--placement", "manual", "--host-mem", "1KiB", input='{"input_ids": [4, 5]}\n')
    assert result.exit_code == 1 and "host tier needs" in result.output and "short by" in result.output
    # The planner says the same before anything is allocated, with the budget that would do.
    result = run(*base, "--host-mem", "1KiB", input='{"input_ids": [4, 5]}\n')
    assert result.exit_code == 1 and "host tier is short by" in result.output and "--host-mem" in result.output


def test_offline_hub_name_suggests_alternatives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run("generate", "-m", "facebook/opt-125m", "--store-dir", str(tmp_path), "-p", "hi")
    assert result.exit_code == 1
    assert "--dummy-weights" in result.output and "Traceback" not in result.output


def test_stop_strings_need_a_tokenizer(ckpt, tmp_path: Path) -> None:
    path, _ = ckpt
    args = ["generate", "-m", str(path), "--store-dir", str(tmp_path), "-i", "-", "--stop", "x"]
    result = run(*args, input='{"input_ids": [4, 5]}\n')
    assert result.exit_code == 1 and "--stop needs a tokenizer" in result.output
    # With --output: the job failed before it began, so no empty output file is left behind; one that was
    # there before is kept as it was.
    out = tmp_path / "out.jsonl"
    result = run(*args, "-o", str(out), input='{"input_ids": [4, 5]}\n')
    assert result.exit_code == 1 and not out.exists()
    out.write_text("")
    assert run(*args, "-o", str(out), input='{"input_ids": [4, 5]}\n').exit_code == 1 and out.exists()


def test_convert_never_overwrites_what_is_not_a_store(ckpt, tmp_path: Path) -> None:
    path, _ = ckpt
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("data")
    result = run("convert", "-m", str(path), "--out", str(keep))
    assert result.exit_code == 1 and "not a flexrun tensor store" in result.output
    assert (keep / "notes.txt").read_text() == "data"
    # Converting onto the checkpoint itself is the same refusal; an old store is replaced.
    assert run("convert", "-m", str(path), "--out", str(path)).exit_code == 1 and (path / "config.json").exists()
    assert run("convert", "-m", str(path), "--out", str(tmp_path / "s")).exit_code == 0
    assert run("convert", "-m", str(path), "--out", str(tmp_path / "s")).exit_code == 0
