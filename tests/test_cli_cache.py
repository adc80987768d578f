"""``flexrun cache``: the stores jobs converted, listed with model, source, dtype, compression, size and last
use; removed by name or model (never one being written), pruned by age, by total size, and of leftovers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from flexrun.weights.filelock import FileLock
from tests.helpers import run
from tests.hf_reference import OptCheckpoint


@pytest.fixture
def cache(job_ckpt: OptCheckpoint, tmp_path: Path) -> Path:
    """A store cache holding the job checkpoint uncompressed and as int8, the int8 one used an hour later."""
    root = tmp_path / "stores"
    base = ["generate", "-m", str(job_ckpt.path), "--store-dir", str(root), "-q", "--max-new-tokens", "1"]
    for kind in ("none", "int8"):
        r = run(*base, "--compress-weight", kind, "--placement", "manual", "-i", "-", input='{"input_ids": [4]}\n')
        assert r.exit_code == 0, r.output
    old = time.time() - 7200
    for store in root.iterdir():
        if store.is_dir():
            os.utime(store / ".last-used", (old, old + (3600 if "int8" in store.name else 0)))
    return root


def _ls(root: Path) -> list[dict]:
    r = run("cache", "ls", "--store-dir", str(root), "--json")
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_ls_names_each_store_and_its_size(job_ckpt: OptCheckpoint, cache: Path) -> None:
    stores = _ls(cache)
    assert [s["compression"] for s in stores] == ["", "int8"]  # least recently used first
    for s in stores:
        assert s["model"] == job_ckpt.path.name and s["dtype"] == "float32" and s["complete"]
        assert s["source"] == str(job_ckpt.path.resolve())
        on_disk = sum(f.stat().st_size for f in Path(s["path"]).rglob("*") if f.is_file())
        assert s["size_bytes"] == on_disk > 0
    r = run("cache", "ls", "--store-dir", str(cache))
    header, *rows = r.stdout.splitlines()
    assert header.split() == ["NAME", "MODEL", "DTYPE", "COMPRESSION", "SIZE", "LAST", "USED", "SOURCE"]
    assert [row.split()[0] for row in rows] == [s["name"] for s in stores]
    assert "2h ago" in rows[0] and "1h ago" in rows[1]
    assert r.stderr.startswith("2 stores, ") and str(cache) in r.stderr
    # A job that opens a store makes it the most recently used.
    base = ["generate", "-m", str(job_ckpt.path), "--store-dir", str(cache), "-q", "--max-new-tokens", "1"]
    assert run(*base, "--compress-weight", "none", "--placement", "manual", "hi").exit_code == 0
    assert [s["compression"] for s in _ls(cache)] == ["int8", ""]


def test_rm_by_name_or_model(job_ckpt: OptCheckpoint, cache: Path) -> None:
    first, second = _ls(cache)
    r = run("cache", "rm", "--store-dir", str(cache), first["name"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"removed {first['name']} (") and not Path(first["path"]).exists()
    r = run("cache", "rm", "--store-dir", str(cache), "no-such-model")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.strip() == (
        f"Error: no cached store is named 'no-such-model' (models in the cache: {job_ckpt.path.name}); see "
        "`flexrun cache ls`"
    )
    assert run("cache", "rm", "--store-dir", str(cache), job_ckpt.path.name).exit_code == 0
    assert _ls(cache) == [] and not Path(second["path"]).exists()


def test_a_store_being_written_is_not_removed(cache: Path) -> None:
    store = _ls(cache)[0]
    lock = FileLock(cache / (store["name"] + ".lock"))
    assert lock.acquire(wait=False)
    try:
        r = run("cache", "rm", "--store-dir", str(cache), store["name"])
    finally:
        lock.release()
    assert r.exit_code == 1 and f"Error: {store['name']} is being written by process {os.getpid()}" in r.stderr
    assert Path(store["path"]).exists()


def test_prune_by_age_size_and_leftovers(cache: Path) -> None:
    lru, mru = _ls(cache)
    leftover = cache / (mru["name"] + ".partial")
    leftover.mkdir()
    (leftover / "x.bin").write_bytes(b"x" * 100)
    r = run("cache", "prune", "--store-dir", str(cache), "--older-than", "90m", "--dry-run")
    assert r.exit_code == 0, r.output
    assert sorted(line.split()[2] for line in r.stdout.splitlines()) == sorted([leftover.name, lru["name"]])
    assert leftover.exists() and Path(lru["path"]).exists()  # a dry run removes nothing
    r = run("cache", "prune", "--store-dir", str(cache), "--max-size", str(mru["size_bytes"]))
    assert r.exit_code == 0, r.output
    assert [s["name"] for s in _ls(cache)] == [mru["name"]] and not leftover.exists()
    r = run("cache", "prune", "--store-dir", str(cache), "--older-than", "soon")
    assert r.exit_code == 2 and "give a number and a unit, e.g. 30d" in r.stderr
