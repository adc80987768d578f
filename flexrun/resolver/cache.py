"""The store cache as a person manages it (``flexrun cache``): what is there, how big, when last used;
removing stores by name, by age or down to a total size.

Each converted store is a directory under the cache's ``stores`` directory; a job that opens one touches
its ``.last-used`` file. Leftovers of an interrupted conversion (``NAME.partial``) or replacement
(``NAME.old-PID``) are listed as incomplete. A store is removed under its lock, so one being converted is
never removed from under its writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from flexrun.errors import InputError
from flexrun.paths import cache_dir
from flexrun.weights.filelock import FileLock

#: Touched whenever a job opens the store.
LAST_USED = ".last-used"


@dataclass(frozen=True)
class CachedStore:
    """One directory of the store cache."""

    path: Path
    model: str  # the config's name ("?" when the index cannot be read)
    source: str  # the checkpoint it was converted from, "dummy", ...
    dtype: str
    compression: str  # "int4 g32", "int8", or "" (uncompressed)
    size: int  # bytes on disk
    last_used: float  # seconds since the epoch
    complete: bool  # False: a conversion's or replacement's leftover

    @property
    def name(self) -> str:
        return self.path.name

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "path": str(self.path),
            "model": self.model,
            "source": self.source,
            "dtype": self.dtype,
            "compression": self.compression,
            "size_bytes": self.size,
            "last_used": self.last_used,
            "complete": self.complete,
        }


def stores_root(store_dir: str | Path | None = None) -> Path:
    """Where converted stores are cached: ``store_dir`` (``--store-dir``), else the cache dir's ``stores``."""
    return Path(store_dir).expanduser() if store_dir else cache_dir() / "stores"


def touch(store: Path) -> None:
    """Record that a job used ``store`` now (quietly nothing where the store is read-only)."""
    with contextlib.suppress(OSError):
        (store / LAST_USED).touch()


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _describe(path: Path) -> CachedStore:
    complete = not path.name.endswith(".partial") and ".old-" not in path.name
    model, source, dtype, compression = "?", "?", "?", ""
    try:
        index = json.loads((path / "index.json").read_text(encoding="utf-8"))
        config = index.get("config", {})
        model, dtype = str(config.get("name", "?")), str(config.get("dtype", "?"))
        source = str(index.get("source", "?"))
        kinds = {
            f"{m['encoding']} g{m['group_size']}" if m.get("group_size") else str(m["encoding"])
            for m in index.get("tensors", {}).values()
            if isinstance(m, dict) and m.get("encoding")
        }
        compression = ", ".join(sorted(kinds))
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        complete = False
    marker = path / LAST_USED
    used = marker if marker.exists() else path / "index.json" if (path / "index.json").exists() else path
    return CachedStore(path, model, source, dtype, compression, _size(path), used.stat().st_mtime, complete)


def list_stores(root: Path) -> list[CachedStore]:
    """The stores under ``root``, least recently used first."""
    if not root.is_dir():
        return []
    found = [_describe(p) for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda s: s.last_used)


def match(stores: list[CachedStore], name: str) -> list[CachedStore]:
    """The stores ``name`` means: a store's directory name, else every store of a model by that name."""
    exact = [s for s in stores if s.name == name]
    if exact:
        return exact
    by_model = [s for s in stores if s.model.lower() == name.lower() or s.model.lower() == name.lower().split("/")[-1]]
    if not by_model:
        names = ", ".join(sorted({s.model for s in stores})) or "none"
        raise InputError(f"no cached store is named {name!r} (models in the cache: {names}); see `flexrun cache ls`")
    return by_model


def remove(store: CachedStore) -> None:
    """Delete ``store`` under its lock; one being converted now is refused, naming the process."""
    base = store.path.name.removesuffix(".partial").split(".old-")[0]
    lock = FileLock(store.path.with_name(base + ".lock"))
    if not lock.acquire(wait=False):
        raise InputError(f"{store.name} is being written by {lock.holder()}; wait for it to finish")
    try:
        shutil.rmtree(store.path)
    except OSError as exc:
        raise InputError(f"cannot remove {store.path}: {exc.strerror}") from None
    finally:
        lock.release()
    with contextlib.suppress(OSError):
        lock.path.unlink()


def to_prune(stores: list[CachedStore], older_than: float | None, max_total: int | None) -> list[CachedStore]:
    """What ``prune`` removes: leftovers of interrupted conversions, stores unused for ``older_than`` seconds,
    then the least recently used until the rest total at most ``max_total`` bytes."""
    now = time.time()
    gone = [s for s in stores if not s.complete or (older_than is not None and now - s.last_used > older_than)]
    if max_total is not None:
        kept = [s for s in stores if s not in gone]  # least recently used first
        total = sum(s.size for s in kept)
        for s in kept:
            if total <= max_total:
                break
            gone.append(s)
            total -= s.size
    return gone
