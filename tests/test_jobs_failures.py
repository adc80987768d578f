"""A generate job that cannot run or cannot finish loses nothing: bad input is one line and exit 1, a prompt
too long is refused unless --truncate left, a full disk or an unwritable output keeps the records written,
the offload dir without room is refused up front, an abandoned block leaves the finished ones, and the
output is never the input."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from flexrun.jobs.results import job_path
from tests.helpers import gen, lines, run, write_input
from tests.hf_reference import hf_tokens

# ---- bad inputs: one line, exit 1, nothing written is lost ----------------------------------------------
GOOD = '{"id": "a", "input_ids": [5, 6, 7]}\n'
DONE = '{"id": "a", "input_ids": [5, 6, 7], "output_ids": [8]}\n'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (GOOD + '{"input_ids": [3,\n', "in.jsonl:2: malformed JSON"),
        (GOOD + '{"text": "hi"}\n', 'in.jsonl:2: record has neither "prompt" nor "input_ids"'),
        (GOOD + '{"input_ids": [4, 300]}\n', "in.jsonl:2: token id 300 is outside the vocabulary (0..299)"),
        (GOOD + '{"input_ids": [4, -1]}\n', "in.jsonl:2: token id -1 is outside the vocabulary"),
        (GOOD + '{"input_ids": []}\n', "in.jsonl:2: empty prompt"),
        (GOOD + '{"input_ids": ' + json.dumps([5] * 60) + "}\n", "in.jsonl:2: prompt has 60 tokens"),
        (GOOD + '{"id": "a", "input_ids": [4]}\n', "in.jsonl:2: id 'a' repeats line 1"),
        ("\n\n", "no prompts"),
    ],
)
def test_bad_input_loses_nothing(job_ckpt, stores, tmp_path: Path, content: str, message: str) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text(content)
    out = tmp_path / "out.jsonl"
    out.write_text(DONE)
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out), "--max-new-tokens", "8")
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output, r.output
    assert len([line for line in r.output.splitlines() if line.startswith("Error")]) == 1
    assert out.read_text() == DONE


def test_truncate_left_keeps_the_end_of_a_long_prompt(job_ckpt, stores, tmp_path: Path) -> None:
    long = [4 + k % 150 for k in range(70)]
    r = gen(job_ckpt, stores, tmp_path, "-i", "-", "--max-new-tokens", "4", input=json.dumps({"input_ids": long}))
    assert r.exit_code == 1 and "exceeds the model's 64 positions (--truncate left keeps its last 60" in r.output
    r = gen(
        job_ckpt,
        stores,
        tmp_path,
        "-i",
        "-",
        "--max-new-tokens",
        "4",
        "--truncate",
        "left",
        input=json.dumps({"input_ids": long}),
    )
    assert r.exit_code == 0, r.output
    (row,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert row["input_ids"] == long[10:] and row["truncated"] == 10
    assert row["output_ids"] == hf_tokens(job_ckpt.model, long[10:], 4)[: len(row["output_ids"])]
    r = gen(job_ckpt, stores, tmp_path, "-p", "x", "--max-new-tokens", "64")
    assert r.exit_code == 1 and "--max-new-tokens 64 leaves no room for a prompt" in r.output


def _fail_on_output(monkeypatch: pytest.MonkeyPatch, name: str, err: int, after: int) -> None:
    """Make ``os.<name>`` fail with ``err`` for the results file (not the engine's files) after ``after`` calls."""
    real = getattr(os, name)
    calls = {"n": 0}

    def fake(fd_or_path, *args, **kwargs):
        target = fd_or_path if isinstance(fd_or_path, (str, Path)) else os.readlink(f"/proc/self/fd/{fd_or_path}")
        if str(target).endswith("out.jsonl"):
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(err, os.strerror(err))
        return real(fd_or_path, *args, **kwargs)

    monkeypatch.setattr(os, name, fake)


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to tell the results file's fd")
def test_full_disk_mid_job_keeps_the_finished_blocks_and_resumes(job_ckpt, stores, tmp_path, monkeypatch) -> None:
    inp = write_input(tmp_path / "in.jsonl", 6)
    ref = tmp_path / "ref.jsonl"
    assert gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(ref)).exit_code == 0
    out = tmp_path / "out.jsonl"
    with monkeypatch.context() as m:
        _fail_on_output(m, "fsync", errno.ENOSPC, after=1)  # the second block's fsync finds the disk full
        r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "cannot write" in r.output and "No space left on device" in r.output
    assert "keeps the 2 records written before" in r.output and "resume" in r.output
    assert out.read_text() == "".join(ref.read_text().splitlines(keepends=True)[:2])
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out))
    assert r.exit_code == 0 and out.read_text() == ref.read_text()


def test_read_only_output_is_refused_before_any_work(job_ckpt, stores, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(DONE)
    _fail_on_output(monkeypatch, "open", errno.EACCES, after=0)
    r = gen(job_ckpt, stores, tmp_path, "-i", "-", "-o", str(out), input=GOOD + '{"input_ids": [4]}\n')
    assert r.exit_code == 1 and "cannot write" in r.output and "Permission denied" in r.output, r.output
    assert out.read_text() == DONE


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through permissions")
def test_read_only_directory(job_ckpt, stores, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        r = gen(job_ckpt, stores, tmp_path, "-p", "hi", "-o", str(ro / "out.jsonl"))
    finally:
        ro.chmod(0o700)
    assert r.exit_code == 1 and "Permission denied" in r.output


def test_offload_dir_without_room_is_refused_up_front(job_ckpt, stores, tmp_path, monkeypatch) -> None:
    import shutil

    out = tmp_path / "out.jsonl"
    assert gen(job_ckpt, stores, tmp_path, "-i", "-", "-o", str(out), input=GOOD).exit_code == 0  # a job's first record
    done = out.read_text()
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    args = ["-i", "-", "-o", str(out), "--cache", "disk=100"]
    r = gen(job_ckpt, stores, tmp_path, *args, input=GOOD + '{"input_ids": [4]}\n')
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "the disk tier needs" in r.output and "has 4.0 KiB free" in r.output and "--offload-dir" in r.output
    assert out.read_text() == done
    # The planner (auto placement) refuses as clearly, naming the offload dir's free space.
    base = ["generate", "-m", str(job_ckpt.path), "--store-dir", str(stores), "--offload-dir", str(tmp_path / "off")]
    r = run(*base, *args, "-q", "--max-new-tokens", "4", input=GOOD + '{"input_ids": [4]}\n')
    assert r.exit_code == 1 and "disk tier is short" in r.output and "4.0 KiB free" in r.output, r.output
    assert out.read_text() == done


# ---- a block abandoned, an output that is the input -----------------------------------------------------
def test_an_abandoned_block_leaves_the_finished_ones(job_ckpt, stores, tmp_path, monkeypatch) -> None:
    from flexrun.runtime.engine import Engine

    inp = write_input(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out.jsonl"
    real, calls = Engine.generate, {"n": 0}

    def generate(self, *args, **kwargs):
        calls["n"] += 1
        assert job_path(out).exists(), "the job's description is written before its first record"
        if calls["n"] == 2:  # what a second Ctrl-C does in the middle of the second block
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", generate)
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out))
    assert r.exit_code == 130 and "abandoning the block in flight" in r.output, r.output
    assert f"{out} keeps the 2 records finished before; run the same command again to resume" in r.output
    assert len(lines(out)) == 2


def test_output_cannot_be_the_input(job_ckpt, stores, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 2)
    before = inp.read_text()
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(inp))
    assert r.exit_code == 1 and "is the input file" in r.output and inp.read_text() == before
