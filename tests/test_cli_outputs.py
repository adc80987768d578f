"""Every output path of ``flexrun generate``, through a real ``python -m flexrun`` process: one job per
``--output`` file (a second one started with it is refused, naming the first), ``-`` as stdout, pipes, FIFOs
and devices written straight through, a full device ending the run in one line, and a reader that closes
the pipe early ending it quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import run
from tests.hf_reference import OptCheckpoint

ROOT = Path(__file__).resolve().parents[1]
N = 12


@pytest.fixture(scope="module")
def job(job_ckpt: OptCheckpoint, stores: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The common arguments of a 12-prompt job (6 blocks of 2), its store converted once up front."""
    tmp = tmp_path_factory.mktemp("outputs")
    inp = tmp / "in.jsonl"
    inp.write_text(
        "".join(json.dumps({"id": k, "prompt": f"prompt number {k} " * (1 + k % 3)}) + "\n" for k in range(N))
    )
    args = ["generate", "-m", str(job_ckpt.path), "--store-dir", str(stores), "--offload-dir", str(tmp / "off")]
    args += ["-i", str(inp), "--placement", "manual", "--gpu-batch-size", "2", "--max-new-tokens", "8", "-q"]
    r = run(*args, "-o", str(tmp / "warm.jsonl"))  # converts the checkpoint, so the processes below only run
    assert r.exit_code == 0, r.output
    return args


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "flexrun", *args]


def _ids(text: str) -> list[int]:
    return sorted(json.loads(line)["id"] for line in text.splitlines())


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_two_jobs_on_one_output_one_is_refused_naming_the_other(job: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    procs = [
        subprocess.Popen(
            _cmd(*job, "-o", str(out)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 1], [(p.returncode, err) for p, _, err in results]
    (winner,) = [p for p, _, _ in results if p.returncode == 0]
    (_, _, refusal) = next(r for r in results if r[0].returncode == 1)
    _no_traceback(refusal)
    assert refusal.strip().splitlines() == [
        f"Error: {out} is being written by process {winner.pid} (another flexrun job); wait for it to finish "
        "or choose another --output"
    ]
    assert _ids(out.read_text()) == list(range(N))  # each record once
    assert not out.with_name(out.name + ".lock").exists()  # released at the end


def test_output_dash_is_stdout(job: list[str], tmp_path: Path) -> None:
    p = subprocess.run(_cmd(*job, "-o", "-"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert _ids(p.stdout) == list(range(N))
    assert list(tmp_path.iterdir()) == []  # no file named "-", no job file


def test_dev_null_is_written_straight_through_without_a_job_file(job: list[str]) -> None:
    p = subprocess.run(_cmd(*job, "-o", "/dev/null"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    notice = "/dev/null is a pipe or device: records are written straight through, without a job file or resume"
    assert p.stderr.count(notice) == 1, p.stderr
    assert not Path("/dev/null.job.json").exists() and not Path("/dev/null.lock").exists()


def test_dev_stdout_into_a_pipe(job: list[str]) -> None:
    p = subprocess.run(_cmd(*job, "-o", "/dev/stdout"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert _ids(p.stdout) == list(range(N))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_device_ends_the_run_in_one_line(job: list[str]) -> None:
    p = subprocess.run(_cmd(*job, "-o", "/dev/full"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    _no_traceback(p.stderr)
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: cannot write /dev/full: No space left on device; the 0 records written before are complete"
    ]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_on_a_full_device_ends_the_run_in_one_line(job: list[str]) -> None:
    with open("/dev/full", "w") as full:
        p = subprocess.run(_cmd(*job), cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert p.returncode == 1
    _no_traceback(p.stderr)
    assert p.stderr.strip().splitlines() == [
        "Error: cannot write stdout: No space left on device; the 0 records written before are complete"
    ]


def test_a_fifo_is_written_straight_through(job: list[str], tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[str] = []

    def read() -> None:
        with open(fifo) as f:
            got.append(f.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    p = subprocess.run(_cmd(*job, "-o", str(fifo)), cwd=ROOT, capture_output=True, text=True, timeout=300)
    reader.join(timeout=60)
    assert p.returncode == 0, p.stderr
    assert _ids(got[0]) == list(range(N))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["fifo"]  # no job file, no lock file


@pytest.mark.parametrize("stream", [False, True], ids=["jsonl", "stream"])
def test_a_reader_closing_the_pipe_ends_the_run_quietly(job: list[str], stream: bool) -> None:
    """``flexrun generate ... | head -1``: exit 0 and nothing on stderr about a broken pipe."""
    args = [*job, "--stream"] if stream else job
    p = subprocess.Popen(_cmd(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.read(5)
    p.stdout.close()  # as `head -c 5` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    _no_traceback(err)
    assert "Broken pipe" not in err and "Error" not in err, err


def test_resume_reads_the_output_in_bounded_memory(tmp_path: Path) -> None:
    """Resuming scans the existing output a line at a time and keeps only each record's key: the peak is a
    fraction of the file (it used to hold the whole file and every record parsed, several times its size)."""
    import tracemalloc

    from flexrun.jobs.results import scan

    out = tmp_path / "big.jsonl"
    ids = list(range(1000, 1200))
    with open(out, "w") as f:
        for k in range(2000):
            f.write(json.dumps({"id": k, "input_ids": ids, "output_ids": ids, "text": "x" * 300}) + "\n")
    tracemalloc.start()
    try:
        existing = scan(out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(existing.records) == 2000 and existing.good_bytes == out.stat().st_size
    assert peak < out.stat().st_size / 8, (peak, out.stat().st_size)


@pytest.fixture(scope="module")
def embed_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``flexrun embed`` of a tiny BERT: 40 texts, one per block, every token's state (long rows)."""
    from tests.hf_encoders import tiny_bert_tokenizer, tiny_encoder

    tmp = tmp_path_factory.mktemp("embed-outputs")
    tiny_encoder("bert", seed=7).save_pretrained(tmp / "ckpt")
    tiny_bert_tokenizer(tmp / "vocab").save_pretrained(tmp / "ckpt")
    args = ["embed", "-m", str(tmp / "ckpt"), "--store-dir", str(tmp / "stores"), "--all-tokens"]
    args += ["--gpu-batch-size", "1"]
    for k in range(40):
        args += ["-t", f"text number {k} " * 8]
    return args


def test_embed_into_a_pipe_closed_early_ends_quietly(embed_args: list[str]) -> None:
    """``flexrun embed ... | head -c 5``: exit 0, no "Broken pipe" error."""
    p = subprocess.Popen(_cmd(*embed_args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.read(5)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    _no_traceback(err)
    assert "Broken pipe" not in err and "Error" not in err, err


def test_embed_output_dash_and_devices(embed_args: list[str], tmp_path: Path) -> None:
    p = subprocess.run(_cmd(*embed_args, "-o", "-"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 40 and list(tmp_path.iterdir()) == []
    p = subprocess.run(_cmd(*embed_args, "-o", "/dev/null"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("/dev/null is a pipe or device: rows are written straight through") == 1, p.stderr
    assert Path("/dev/null").is_char_device()  # written through, never replaced by a file
    p = subprocess.run(_cmd(*embed_args, "-o", "/dev/full"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    _no_traceback(p.stderr)
    assert [line for line in p.stderr.splitlines() if line.startswith("Error:")] == [
        "Error: cannot write /dev/full: No space left on device; the rows written before are complete"
    ]
