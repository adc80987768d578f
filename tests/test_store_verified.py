"""A cached store's CRCs are checked once: ``verified.json`` records the files that passed, a later open reads
them without hashing them again, and a file written, replaced or renamed since is checked again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flexrun.errors import CheckpointError
from flexrun.weights import store as store_module
from flexrun.weights.store import VERIFIED, TensorStore
from tests.helpers import save_and_convert
from tests.hf_reference import tiny_opt


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    _, model = tiny_opt(seed=4)
    return save_and_convert(model, tmp_path).path


def _read_all(path: Path) -> TensorStore:
    s = TensorStore(path)
    for name in s.tensors:
        s.read(name)
    return s


def _hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = store_module._crc
    monkeypatch.setattr(store_module, "_crc", lambda buf: calls.append(1) or real(buf))
    return calls


def test_a_verified_store_is_not_hashed_again(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _read_all(store).remember_verified()
    assert set(json.loads((store / VERIFIED).read_text())) == {m.file for m in TensorStore(store).tensors.values()}
    hashed = _hashed(monkeypatch)
    _read_all(store)
    assert not hashed  # every file unchanged since it was checked: read, not hashed
    assert not TensorStore(store, verify=False)._stamps  # and a store opened unverified never consults them


@pytest.mark.parametrize("how", ["rewritten", "renamed"])
def test_a_file_changed_since_it_was_verified_is_checked_again(
    store: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _read_all(store).remember_verified()
    a, b = store / "layers.0.fc1_w.bin", store / "layers.2.fc1_w.bin"  # the same size
    if how == "rewritten":
        da, db = a.read_bytes(), b.read_bytes()
        a.write_bytes(db)
        b.write_bytes(da)
    else:  # swapped by renames: each keeps its own size, times and data, under the other's name
        os.rename(a, store / "tmp.bin")
        os.rename(b, a)
        os.rename(store / "tmp.bin", b)
    hashed = _hashed(monkeypatch)
    with pytest.raises(CheckpointError, match="layers.0.fc1_w.bin: checksum mismatch"):
        _read_all(store)
    assert hashed


def test_an_unreadable_record_means_every_file_is_checked(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _read_all(store).remember_verified()
    (store / VERIFIED).write_text("[not json")
    hashed = _hashed(monkeypatch)
    _read_all(store)
    assert len(hashed) == len(TensorStore(store).tensors)
