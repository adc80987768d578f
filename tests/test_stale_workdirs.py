"""A run killed by the kernel (SIGKILL, the OOM killer) leaves its offload workdir behind, KV cache and
activation files included; the next run under the same offload dir removes it, and nothing else."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flexrun.runtime.tiers import WORKDIR_LOCK, make_workdir, release_workdir, sweep_stale_workdirs


def _killed_run(root: Path) -> Path:
    """A workdir whose process was killed while it held it (a child made it, wrote a file, and was SIGKILLed)."""
    code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from flexrun.runtime.tiers import make_workdir\n"
        "d = make_workdir(Path(sys.argv[1]), 'run-')\n"
        "(d / 'kv-0-0.bin').write_bytes(b'x' * 8192)\n"
        "print(d, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    path = Path(child.stdout.readline().strip())
    assert sweep_stale_workdirs(root) == 0 and path.exists()  # alive: its lock is held, the dir is kept
    child.send_signal(signal.SIGKILL)
    child.wait()
    return path


def test_a_killed_runs_workdir_is_removed_by_the_next_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stale = _killed_run(tmp_path)
    assert (stale / "kv-0-0.bin").exists()
    with caplog.at_level(logging.WARNING):
        mine = make_workdir(tmp_path, "run-")
    assert not stale.exists() and mine.exists()
    assert "removed 1 offload dir(s) that killed runs left" in caplog.text and "8.0 KiB" in caplog.text
    release_workdir(mine)
    assert not mine.exists()


def test_a_live_runs_workdir_and_foreign_dirs_are_kept(tmp_path: Path) -> None:
    live = tmp_path / "run-live"
    live.mkdir()
    (live / "act-0.bin").write_bytes(b"x" * 100)
    fd = os.open(live / WORKDIR_LOCK, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description holds it: as another process would
    mine_too = make_workdir(tmp_path, "run-")  # this process's own workdir is never swept by itself
    foreign = tmp_path / "run-mine"  # a user's directory without flexrun's lock file
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    try:
        assert sweep_stale_workdirs(tmp_path) == 0
        assert live.exists() and mine_too.exists() and (foreign / "notes.txt").exists()
    finally:
        os.close(fd)
        release_workdir(mine_too)
    assert sweep_stale_workdirs(tmp_path) == 100  # its holder let go (its run ended without removing it)
    assert not live.exists() and foreign.exists()
