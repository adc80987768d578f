"""``flexrun generate --tp 2`` as a user runs it: two local ranks (forked by the launcher, gloo on loopback) give
the records one process gives; a rank killed mid-job takes the job down in one line, and rerunning resumes to
the uninterrupted output; a --tp the heads cannot take is refused; the job file records tp.

The subprocess runs are few (each one imports torch): the engine-level matrix is in test_tp_engine.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flexrun.parallel import Shard, slice_bytes
from flexrun.weights.store import TensorStore
from tests.helpers import run
from tests.hf_decoders import tiny_decoder

N = 40  # prompts: 20 blocks of 2, so a rank can be killed mid-job


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    """A tiny LLaMA (4 query heads over 2 KV heads), mixed-length input_ids prompts, the one-process records."""
    d = tmp_path_factory.mktemp("tpcli")
    tiny_decoder("llama", seed=5, num_attention_heads=4, num_key_value_heads=2).save_pretrained(d / "ckpt")
    rows = [{"id": k, "input_ids": [4 + (k * 13 + j) % 200 for j in range(2 + k % 7)]} for k in range(N)]
    (d / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["generate", "-m", str(d / "ckpt"), "--store-dir", str(d / "stores"), "-i", str(d / "in.jsonl")]
    common += ["--placement", "manual", "--gpu-batch-size", "2", "--max-new-tokens", "12", "-q"]
    common += ["--weights", "host=50,disk=50", "--offload-dir", str(d / "off")]
    r = run(*common, "-o", str(d / "ref.jsonl"))  # one process (and the store converted once for the others)
    assert r.exit_code == 0, r.output
    return d, common, (d / "ref.jsonl").read_text()


def _flexrun(args: list[str], **kw: object) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return subprocess.Popen(
        [sys.executable, "-m", "flexrun", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _records(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_rank_killed_mid_job_then_resumed(job: tuple[Path, list[str], str]) -> None:
    d, common, expected = job
    out = d / "out.jsonl"
    args = [*common, "--tp", "2", "-o", str(out)]
    proc = _flexrun(args)
    deadline = time.monotonic() + 120
    while _records(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    ranks = sorted(psutil.Process(proc.pid).children(), key=lambda p: p.pid)
    assert len(ranks) == 2, "the launcher starts one process per rank"
    ranks[1].kill()
    killed = time.monotonic()
    _, err = proc.communicate(timeout=60)
    # Rank 0's next collective fails on the closed connection: one line, well within the launcher's grace.
    assert proc.returncode == 1, err
    assert time.monotonic() - killed < 30
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: rank 0 of 2: "), err
    assert "run the same command again to resume" in lines[0]
    done = _records(out)
    assert 2 <= done < N and out.read_text() == "".join(expected.splitlines(keepends=True)[:done])

    proc = _flexrun(args)  # resumes on two ranks
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    # Greedy tokens identical to one process, for every left-padded block, resumed or not.
    assert out.read_text() == expected
    assert json.loads((d / "out.jsonl.job.json").read_text())["job"]["tp"] == 2

    r = run(*common, "-o", str(out))  # another number of ranks is another job
    assert r.exit_code == 1 and "--tp 2 there, 1 here" in r.output, r.output


def test_tp_the_heads_cannot_take_is_refused(job: tuple[Path, list[str], str]) -> None:
    d, common, _ = job
    r = run(*common, "--tp", "3", "-o", str(d / "three.jsonl"))
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        "Error: ckpt has 4 attention heads, which 3 ranks cannot split evenly; use a --tp dividing 4"
    ), r.output


def test_each_local_rank_takes_its_part_of_the_budgets(job: tuple[Path, list[str], str]) -> None:
    """Two ranks on one machine share --host-mem and --disk-mem: each plans, checks and reports half; rank 0's
    slice of the whole store, written at load, is on its disk ledger."""
    d, common, expected = job
    out = d / "parts.jsonl"
    proc = _flexrun([*common, "--tp", "2", "--host-mem", "1GiB", "--disk-mem", "2GiB", "--json", "-o", str(out)])
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert out.read_text() == expected
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["budget_bytes"]["host"] == 512 << 20 and summary["budget_bytes"]["disk"] == 1 << 30
    assert summary["budget_sources"]["host"] == "1/2 of --host-mem 1.0 GiB, one of 2 local ranks' part"
    (index,) = (d / "stores").glob("*/index.json")
    # Half the weights on disk (read from the slice) and the rest of the slice: the slice, whole.
    assert summary["planned_bytes"]["disk"] == slice_bytes(TensorStore(index.parent), Shard(0, 2))

    proc = _flexrun([*common, "--tp", "2", "--weights", "host=100", "--disk-mem", "100KiB", "-o", str(d / "no.jsonl")])
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err
    (line,) = err.strip().splitlines()
    assert "with this rank's slice of the store" in line and "(1/2 of --disk-mem 100.0 KiB, one of 2 local" in line
    assert "`flexrun convert --tp 2`" in line


@pytest.mark.slow
def test_two_machines_through_torchrun(job: tuple[Path, list[str], str], request: pytest.FixtureRequest) -> None:
    """Two torchrun invocations (--nnodes 2, one rank each, a c10d rendezvous on 127.0.0.1), as on two machines
    given the same command: the records one process gives."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("two torchrun agents take a while: run with -m slow")
    d, common, expected = job
    out = d / "torchrun.jsonl"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    torchrun += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "flexrun"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    procs = [
        subprocess.Popen([*torchrun, *common, "--json", "-o", str(out)], stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        errs.append(err)
    assert out.read_text() == expected
    # One rank a machine: each has its machine's budgets whole (never divided by the world's two ranks).
    (summary,) = [json.loads(line) for err in errs for line in err.splitlines() if line.startswith("{")]
    assert not any("local ranks" in source for source in summary["budget_sources"].values())
