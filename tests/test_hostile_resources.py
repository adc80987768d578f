"""Resource faults in the middle of a generate job: the offload dir fills up while the KV cache or the
activations are written to it, the offload dir is removed, a weight file cannot be read. Each stops the job
after the last finished block with one line (exit 1, no traceback), the output holding exactly the records
of the finished blocks, and the same command run again resumes and gives the uninterrupted job's records.

The faults are injected from the second block on (the job runs blocks of 2 of its 6 prompts), by making the
system calls that reach the failing files raise the error the kernel would.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flexrun import diskio
from flexrun.runtime.engine import Engine
from tests.helpers import gen, write_input
from tests.test_hostile_inputs import one_line_error

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/fd").exists(), reason="needs /proc to tell a file descriptor's path"
)


def _path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _from_second_block(monkeypatch: pytest.MonkeyPatch, before: Callable[[Engine], None] | None = None) -> dict:
    """Arm ``state["armed"]`` when the job's second block starts (after running ``before(engine)``)."""
    state: dict[str, Any] = {"armed": False, "calls": 0}
    real = Engine.generate

    def generate(self: Engine, *args: Any, **kwargs: Any) -> Any:
        state["calls"] += 1
        if state["calls"] == 2:
            state["armed"] = True
            if before is not None:
                before(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", generate)
    return state


def _job(job_ckpt, stores, tmp_path: Path, *placement: str) -> tuple[list[str], Path, str]:
    """The job's arguments, its output path, and the records an uninterrupted run writes."""
    inp = write_input(tmp_path / "in.jsonl", 6)
    ref = tmp_path / "ref.jsonl"
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(ref), *placement)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out.jsonl"
    return ["-i", str(inp), "-o", str(out), *placement], out, ref.read_text()


def _first_block(records: str) -> str:
    return "".join(records.splitlines(keepends=True)[:2])


def _check_resumes(job_ckpt, stores, tmp_path: Path, args: list[str], out: Path, expected: str) -> None:
    r = gen(job_ckpt, stores, tmp_path, *args)
    assert r.exit_code == 0, r.output
    assert out.read_text() == expected


def test_offload_dir_full_while_the_kv_cache_is_written(job_ckpt, stores, tmp_path, monkeypatch) -> None:
    args, out, expected = _job(job_ckpt, stores, tmp_path, "--cache", "disk=100")
    real = os.pwrite
    with monkeypatch.context() as m:
        state = _from_second_block(m)

        def pwrite(fd: int, data: Any, offset: int) -> int:
            if state["armed"] and "/off/" in _path_of(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data, offset)

        m.setattr(os, "pwrite", pwrite)
        r = gen(job_ckpt, stores, tmp_path, *args)
    one_line_error(r, "offload dir: No space left on device")
    assert "keeps the 2 records finished before" in r.stderr and "run the same command again to resume" in r.stderr
    assert out.read_text() == _first_block(expected)
    _check_resumes(job_ckpt, stores, tmp_path, args, out, expected)


def test_offload_dir_full_while_activations_are_written(job_ckpt, stores, tmp_path, monkeypatch) -> None:
    import builtins

    args, out, expected = _job(job_ckpt, stores, tmp_path, "--activations", "disk=100")
    real = builtins.open
    with monkeypatch.context() as m:
        state = _from_second_block(m)

        def open_(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
            if state["armed"] and "w" in mode and Path(str(file)).name.startswith("act-"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
            return real(file, mode, *a, **kw)

        m.setattr(builtins, "open", open_)
        r = gen(job_ckpt, stores, tmp_path, *args)
    one_line_error(r, "offload dir: No space left on device")
    assert out.read_text() == _first_block(expected)
    _check_resumes(job_ckpt, stores, tmp_path, args, out, expected)


def test_offload_dir_removed_mid_job(job_ckpt, stores, tmp_path, monkeypatch) -> None:
    args, out, expected = _job(job_ckpt, stores, tmp_path, "--cache", "disk=100", "--activations", "disk=100")
    with monkeypatch.context() as m:
        _from_second_block(m, before=lambda engine: shutil.rmtree(engine.workdir))
        r = gen(job_ckpt, stores, tmp_path, *args)
    one_line_error(r, "offload dir: No such file or directory")
    assert out.read_text() == _first_block(expected)
    _check_resumes(job_ckpt, stores, tmp_path, args, out, expected)


def test_a_weight_file_read_error_names_the_file(job_ckpt, stores, tmp_path, monkeypatch) -> None:
    """A failing disk under the tensor store: the weight file is named (the offload dir is not at fault)."""
    args, out, expected = _job(job_ckpt, stores, tmp_path, "--weights", "disk=100")
    real = diskio.read_into
    with monkeypatch.context() as m:
        state = _from_second_block(m)

        def read_into(fd: int, buf: Any, offset: int, nbytes: int) -> int:
            if state["armed"] and _path_of(fd).endswith("layers.1.fc1_w.bin"):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(fd, buf, offset, nbytes)

        m.setattr(diskio, "read_into", read_into)
        r = gen(job_ckpt, stores, tmp_path, *args)
    one_line_error(r, "layers.1.fc1_w.bin: Input/output error")
    assert "cannot read " in r.stderr and "offload dir" not in r.stderr
    assert "records finished before, run the same command again to resume" in r.stderr
    assert out.read_text() == _first_block(expected)
    _check_resumes(job_ckpt, stores, tmp_path, args, out, expected)
