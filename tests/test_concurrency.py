"""One writer per store: two first-time runs of one checkpoint convert it once (the second waits, then uses
the finished store); ``flexrun convert`` onto an existing store refuses without ``--overwrite`` or says it is
already done; replacing a store is atomic (the old store or the new one, whole)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexrun.weights import store as store_module
from flexrun.weights.filelock import FileLock
from flexrun.weights.store import StoreWriter, TensorStore
from tests.helpers import run
from tests.hf_reference import OptCheckpoint

ROOT = Path(__file__).resolve().parents[1]


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flexrun", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_first_time_runs_convert_the_checkpoint_once(job_ckpt: OptCheckpoint, tmp_path: Path) -> None:
    stores = tmp_path / "stores"
    procs = []
    for k in range(2):
        args = ["generate", "-m", str(job_ckpt.path), "--store-dir", str(stores), "-p", f"hello {k}", "-q"]
        args += ["--max-new-tokens", "4", "--placement", "manual", "--offload-dir", str(tmp_path / f"off{k}")]
        args += ["-o", str(tmp_path / f"out{k}.jsonl")]
        procs.append(_start(*args))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "Traceback" not in err and "incomplete" not in err, err
        assert err.count("waiting for process") <= 1, err  # said once, by the one that waited
    assert [d.name for d in stores.iterdir()] == [d.name for d in stores.iterdir() if (d / "index.json").is_file()]
    assert len(list(stores.iterdir())) == 1  # one store: no .partial, no .lock, no second copy
    for k in range(2):
        assert len((tmp_path / f"out{k}.jsonl").read_text().splitlines()) == 1


def test_two_converts_onto_one_store_convert_it_once(job_ckpt: OptCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "store"
    procs = [_start("convert", "-m", str(job_ckpt.path), "-o", str(out)) for _ in range(2)]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        errs.append(err)
    assert sum("already converted" in e for e in errs) <= 1, errs
    TensorStore(out)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["store"]


@pytest.fixture
def converted(job_ckpt: OptCheckpoint, tmp_path: Path) -> Path:
    out = tmp_path / "store"
    r = run("convert", "-m", str(job_ckpt.path), "-o", str(out))
    assert r.exit_code == 0, r.output
    return out


def test_convert_onto_the_same_conversion_is_nothing_to_do(job_ckpt: OptCheckpoint, converted: Path) -> None:
    before = (converted / "index.json").stat().st_mtime_ns
    r = run("convert", "-m", str(job_ckpt.path), "-o", str(converted))
    assert r.exit_code == 0, r.output
    assert "is already converted from" in r.stderr and "nothing to do" in r.stderr
    assert (converted / "index.json").stat().st_mtime_ns == before


def test_convert_onto_another_store_needs_overwrite(job_ckpt: OptCheckpoint, converted: Path) -> None:
    r = run("convert", "-m", str(job_ckpt.path), "-o", str(converted), "--dtype", "float16")
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [
        f"Error: {converted} already holds a tensor store (float32, converted from {job_ckpt.path.resolve()}); "
        "add --overwrite to replace it, or choose another --out"
    ]
    assert TensorStore(converted).config.dtype == "float32"
    r = run("convert", "-m", str(job_ckpt.path), "-o", str(converted), "--dtype", "float16", "--overwrite")
    assert r.exit_code == 0, r.output
    assert TensorStore(converted).config.dtype == "float16"
    assert sorted(x.name for x in converted.parent.iterdir()) == ["store"]  # the old one deleted, nothing aside


def test_a_replace_that_fails_midway_keeps_the_old_store(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new store cannot be renamed in (an interrupt or an error at that point): the old one is back."""
    old_index = (converted / "index.json").read_text()
    writer = StoreWriter(converted, TensorStore(converted).config)
    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        if Path(src) == writer.tmp:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(store_module.os, "rename", rename)
    with pytest.raises(Exception, match="cannot move the new store into"):
        writer.finish()
    writer.abort()
    assert (converted / "index.json").read_text() == old_index
    assert json.loads(old_index)["format"] == "flexrun-store"
    assert sorted(x.name for x in converted.parent.iterdir()) == ["store"]


def test_a_second_writer_waits_saying_so_once_then_uses_the_store(job_ckpt: OptCheckpoint, tmp_path: Path) -> None:
    """This process holds the store's lock (as a converting run would); ``convert`` waits, says so on stderr
    once, naming this process, and goes on when the lock is released."""
    out = tmp_path / "store"
    lock = FileLock(tmp_path / "store.lock")
    assert lock.acquire(wait=False)
    p = _start("convert", "-m", str(job_ckpt.path), "-o", str(out))
    assert p.stderr is not None
    line = p.stderr.readline()
    assert f"waiting for process {os.getpid()}, which is writing the tensor store {out}" in line, line
    assert p.poll() is None  # still waiting
    lock.release()
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "waiting" not in err
    TensorStore(out)
