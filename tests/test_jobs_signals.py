"""A generate job stopped by SIGINT, SIGTERM (in this process) and SIGKILL (a real ``python -m flexrun``
process) at random points, then resumed: the final output equals an uninterrupted run's, record for record and byte for byte."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flexrun.jobs.interrupt import StopRequest
from tests.helpers import run
from tests.hf_reference import save_tiny_opt

ROOT = Path(__file__).resolve().parents[1]


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _stop_at(args: list[str], out: Path, lines: int, sig: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Start the job, send ``sig`` once ``out`` holds ``lines`` complete records, and wait for the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flexrun", *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and _complete_lines(out) < lines and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the job ended before it could be stopped at {lines} records: {proc.stderr.read()}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


def _signal_self_at(out: Path, lines: int, sig: int) -> threading.Thread:
    """A thread that sends ``sig`` to this process once ``out`` holds ``lines`` complete records; the job
    runs in the main thread, where Python handles signals. Nothing is sent unless the job's handler is in
    place (a signal after the job would hit pytest)."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while _complete_lines(out) < lines and time.monotonic() < deadline:
            time.sleep(0.002)
        if isinstance(getattr(signal.getsignal(sig), "__self__", None), StopRequest):
            os.kill(os.getpid(), sig)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_stopped_and_killed_jobs_resume_to_the_uninterrupted_output(tmp_path: Path) -> None:
    save_tiny_opt(tmp_path / "ckpt", seed=11)
    n = 32
    rows = [{"id": k, "input_ids": [4 + (k * 13 + j) % 200 for j in range(3 + k % 5)]} for k in range(n)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["generate", "-m", str(tmp_path / "ckpt"), "--store-dir", str(tmp_path / "stores"), "-i", str(inp)]
    common += ["--placement", "manual", "--gpu-batch-size", "2", "--max-new-tokens", "6", "--temperature", "0.8"]
    common += ["--seed", "3", "-q", "--offload-dir", str(tmp_path / "off")]
    # The uninterrupted run (it also converts the checkpoint once for the others).
    ref = tmp_path / "ref.jsonl"
    r = run(*common, "-o", str(ref))
    assert r.exit_code == 0, r.output
    assert _complete_lines(ref) == n
    expected = ref.read_text().splitlines(keepends=True)

    out = tmp_path / "out.jsonl"
    args = [*common, "-o", str(out)]
    # Where the signals land is drawn from a seed, so a failure reproduces (FLEXRUN_TEST_SEED picks another).
    seed = int(os.environ.get("FLEXRUN_TEST_SEED", "1234"))
    rng = random.Random(seed)
    why = f"(stop points from FLEXRUN_TEST_SEED={seed})"
    # Ctrl-C: the block in flight is finished and written, then the job stops with 130 and says how to resume.
    at = rng.randrange(1, 8)
    _signal_self_at(out, at, signal.SIGINT)
    r = run(*args)
    assert r.exit_code == 130, f"{why} {r.output}"
    assert "interrupted by SIGINT, after the block in flight" in r.output, f"{why} {r.output}"
    assert "run the same command again" in r.output, f"{why} {r.output}"
    done = _complete_lines(out)
    assert at <= done < n and done % 2 == 0, f"{why} SIGINT at {at} records left {done}"
    assert out.read_text() == "".join(expected[:done]), why
    # SIGTERM: the same, exit 143.
    at = done + rng.randrange(1, 8)
    _signal_self_at(out, at, signal.SIGTERM)
    r = run(*args)
    assert r.exit_code == 143 and "interrupted by SIGTERM" in r.output, f"{why} {r.output}"
    done = _complete_lines(out)
    assert at <= done < n, f"{why} SIGTERM at {at} records left {done}"
    assert out.read_text() == "".join(expected[:done]), why
    # SIGKILL of a real process at a random moment: no clean-up at all, possibly a partial last line.
    env = {**os.environ, "FLEXRUN_CACHE_DIR": str(tmp_path / "cache")}
    p = _stop_at(args, out, done + rng.randrange(1, 8), signal.SIGKILL, env)
    assert p.returncode == -signal.SIGKILL, f"{why} {p.stderr}"
    assert _complete_lines(out) < n, f"{why} the kill came too late to test anything"
    # Resume to the end: exactly the uninterrupted run's records, in the same order.
    r = run(*args)
    assert r.exit_code == 0, f"{why} {r.output}"
    assert out.read_text() == ref.read_text(), why


def test_a_second_signal_abandons_the_block_but_never_a_write() -> None:
    notes: list[str] = []
    stop = StopRequest(notify=notes.append)
    with stop.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.exit_code == 143 and "stopping after the current block" in notes[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs in this thread at the next bytecode
        written = []
        with pytest.raises(KeyboardInterrupt), stop.writing():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            written.append("the whole block")  # a signal during the write waits for it to finish
        assert written == ["the whole block"]
    # A bound method is a new object at each access: compare by equality (same function, same instance).
    assert signal.getsignal(signal.SIGTERM) != stop._handle
