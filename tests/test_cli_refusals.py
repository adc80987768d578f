"""What ``flexrun`` refuses up front, in one line and before any work: stores that would not fit their disk
(``bench --dummy-weights``, ``convert``, a first ``generate``), a disk tier over ``--disk-mem``, a damaged
safetensors file, a config.json that is no object, stdout on a full device; and ``plan --hardware`` on a
machine without that hardware, which plans the named machine's tiers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run
from tests.hf_reference import OptCheckpoint

ROOT = Path(__file__).resolve().parents[1]
# OPT-175B in float16: 325 GiB of weights (over 81 GiB as int4), more than the disk has free (else skipped).
OPT_175B = {
    "architectures": ["OPTForCausalLM"],
    "model_type": "opt",
    "hidden_size": 12288,
    "num_hidden_layers": 96,
    "num_attention_heads": 96,
    "ffn_dim": 49152,
    "vocab_size": 50272,
    "max_position_embeddings": 2048,
    "word_embed_proj_dim": 12288,
    "torch_dtype": "float16",
}
BIG = 325 << 30


def _one_line(r, exit_code: int = 1) -> str:
    assert r.exit_code == exit_code, r.output
    assert "Traceback" not in r.output
    (line,) = r.stderr.strip().splitlines()
    return line


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    if shutil.disk_usage(tmp_path).free >= BIG // 4:  # int4 weights take a little over a quarter
        pytest.skip("this disk has room for OPT-175B: the refusal cannot be seen here")
    return tmp_path


def test_dummy_weights_that_do_not_fit_the_disk_are_refused_before_writing(small_disk: Path) -> None:
    stores = small_disk / "stores"
    r = run("bench", "-m", "facebook/opt-175b", "--dummy-weights", "--store-dir", str(stores))
    line = _one_line(r)
    assert line.startswith(f"Error: writing opt-175b's dummy weights needs 325.2 GiB in {stores}, whose disk has ")
    assert "short by" in line and "--store-dir" in line
    assert not stores.exists() or not any(stores.iterdir())  # nothing written


def test_convert_that_does_not_fit_the_disk_is_refused_before_reading(small_disk: Path) -> None:
    ckpt = small_disk / "opt-175b"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(OPT_175B))  # no weight files: refused before they are missed
    out = small_disk / "store"
    line = _one_line(run("convert", "-m", str(ckpt), "-o", str(out)))
    assert line.startswith(f"Error: converting {ckpt} needs 325.2 GiB in {small_disk}, whose disk has ")
    assert "give --out on a disk with room" in line and not out.exists()
    # The store cache refuses the same way on a first generate.
    line = _one_line(run("generate", "-m", str(ckpt), "--store-dir", str(out), "-i", "-", input='{"input_ids": [4]}\n'))
    # (the planner may choose compressed weights, which need less)
    assert line.startswith(f"Error: converting {ckpt} needs ") and "short by" in line and "--store-dir" in line


def test_disk_tier_over_disk_mem_is_refused(job_ckpt: OptCheckpoint, stores: Path, tmp_path: Path) -> None:
    # The KV cache on disk goes to the offload dir, which --disk-mem bounds (weights on disk are read in
    # place from the store and take no room there).
    args = ["generate", "-m", str(job_ckpt.path), "--store-dir", str(stores), "--offload-dir", str(tmp_path / "o")]
    r = run(*args, "hi", "-q", "--placement", "manual", "--cache", "disk=100", "--disk-mem", "1KiB")
    line = _one_line(r)
    assert line.startswith("Error: placement does not fit: the disk tier needs ") and "raise --disk-mem" in line
    assert "weights on disk are read in place from their store" in " ".join(run("generate", "-h").stdout.split())


def test_damaged_checkpoint_files_are_one_line(job_ckpt: OptCheckpoint, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    shutil.copy(job_ckpt.path / "config.json", garbage / "config.json")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 1000)
    r = run("generate", "-m", str(garbage), "--store-dir", str(tmp_path / "s"), "-i", "-", input='{"input_ids": [4]}\n')
    assert _one_line(r).startswith(f"Error: {garbage / 'model.safetensors'}: not a readable safetensors file (")
    (garbage / "config.json").write_text("[1, 2]")
    r = run("generate", "-m", str(garbage), "hi")
    assert _one_line(r) == "Error: garbage: config.json is a JSON list, not an object"


def test_stdout_on_a_full_device_is_one_line(job_ckpt: OptCheckpoint, stores: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    args = ["generate", "-m", str(job_ckpt.path), "--store-dir", str(stores), "hi", "-q", "--max-new-tokens", "2"]
    with open("/dev/full", "w") as full:
        p = subprocess.run(
            [sys.executable, "-m", "flexrun", *args], cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        "Error: cannot write stdout: No space left on device; the 0 records written before are complete"
    )
    assert "Traceback" not in p.stderr


def test_plan_for_named_hardware_models_its_tiers_not_this_machines_ram() -> None:
    r = run("plan", "-m", "opt-1.3b", "--hardware", "t4", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    # The T4 machine's 15 GiB GPU, 204 GiB of RAM and 1.5 TiB of disk, whatever this machine has.
    assert data["budgets"] == {"device": 15 << 30, "host": 204 << 30, "disk": 1500 << 30}
    assert data["prediction"]["throughput_tok_s"] < 10_000  # not a CPU's RAM counted twice (1.77M tok/s)
