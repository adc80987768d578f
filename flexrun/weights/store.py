"""flexrun's tensor store: ``index.json`` plus one raw, page-padded file per tensor.

Each tensor file can be read with one aligned read (O_DIRECT) straight into a preallocated buffer. The
index records name, dtype, shape, byte size and a CRC32 per tensor, and the model config. A compressed
tensor (version 2) also records its encoding (``int4``/``int8``) and group size; its file holds the
canonical compressed parts (``quant.formats``) and its dtype and shape stay the uncompressed weight's.
Version-1 stores (nothing compressed) still load. A store is written into a temporary directory and
renamed into place when complete, so a crash never leaves a store that looks finished. Each tensor's CRC
is checked on its first read; ``verified.json`` records the size, times and inode of the files that passed,
and a later open takes a file whose stat is unchanged as checked (it still reads it, but does not hash it
again at every load); a file written, replaced or renamed since is checked again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexrun import diskio
from flexrun.config import OptConfig
from flexrun.errors import CheckpointError, ConfigError
from flexrun.quant.formats import QuantSpec, QuantWeight, decode, encode, quantize, spec_of

log = logging.getLogger(__name__)

FORMAT = "flexrun-store"
VERIFIED = "verified.json"  # {file: [size, mtime_ns, ctime_ns, inode]} of the tensor files whose CRC was checked
VERSION = 2
_READABLE = (1, 2)
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class TensorMeta:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    crc32: int
    encoding: str = ""  # "int4" or "int8" for a compressed weight
    group_size: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def spec(self) -> QuantSpec | None:
        """How the tensor is compressed, or None."""
        return QuantSpec(self.encoding, self.group_size) if self.encoding else None

    def to_index(self) -> dict[str, Any]:
        entry = {"file": self.file, "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes}
        entry["crc32"] = self.crc32
        if self.encoding:
            entry |= {"encoding": self.encoding, "group_size": self.group_size}
        return entry

    @property
    def padded_nbytes(self) -> int:
        return diskio.padded(self.nbytes)


def _crc(buf: torch.Tensor) -> int:
    return zlib.crc32(memoryview(buf.numpy()).cast("B"))  # type: ignore[arg-type]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _replaceable(path: Path) -> bool:
    """A directory that may be replaced by a new store: an empty one, or a finished flexrun store."""
    if not path.is_dir():
        return False
    index = path / "index.json"
    if not index.is_file():
        return not any(path.iterdir())
    try:
        return json.loads(index.read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


class StoreWriter:
    """Writes tensors one at a time; ``finish()`` writes the index and moves the store into place."""

    def __init__(self, path: str | Path, config: OptConfig, extra: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.config = config
        self.extra = extra or {}
        if self.path.exists() and not _replaceable(self.path):
            raise CheckpointError(
                f"{self.path} exists and is not a flexrun tensor store; choose another --out (it is never overwritten)"
            )
        self.tmp = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            self.tmp.mkdir(parents=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create tensor store under {self.path.parent}: {exc.strerror}") from None
        self.tensors: dict[str, TensorMeta] = {}
        self.dtype = TORCH_DTYPES[config.dtype]

    def add(self, name: str, tensor: torch.Tensor, compress: QuantSpec | None = None) -> None:
        """Cast ``tensor`` to the store's dtype (or, with ``compress``, compress it from the value in the
        store's dtype) and write it (fsync'd) as ``name``."""
        value = tensor.to(self.dtype)
        if compress:
            self.add_compressed(name, quantize(value, compress))
        else:
            self._write(name, _as_bytes(value), tuple(tensor.shape), None)

    def add_compressed(self, name: str, weight: QuantWeight) -> None:
        """Write an already compressed matrix (fsync'd) as ``name``."""
        spec = spec_of(weight)
        self._write(name, encode(weight, spec), weight.shape, spec)

    def _write(self, name: str, data: torch.Tensor, shape: tuple[int, ...], compress: QuantSpec | None) -> None:
        file = f"{name}.bin"
        try:
            diskio.write_padded(self.tmp / file, memoryview(data.numpy()))  # type: ignore[arg-type]
        except OSError as exc:
            raise CheckpointError(f"cannot write {self.tmp / file}: {exc.strerror}") from None
        meta = TensorMeta(name, file, self.config.dtype, shape, data.numel(), _crc(data))
        if compress:
            meta = dataclasses.replace(meta, encoding=compress.kind, group_size=compress.group_size)
        self.tensors[name] = meta

    def finish(self) -> Path:
        index = {
            "format": FORMAT,
            "version": VERSION,
            "align": diskio.ALIGN,
            "config": self.config.to_dict(),
            **self.extra,
            "tensors": {m.name: m.to_index() for m in self.tensors.values()},
        }
        try:
            with open(self.tmp / "index.json", "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=1))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise CheckpointError(f"cannot write {self.tmp / 'index.json'}: {exc.strerror}") from None
        # An existing store is renamed aside, the new one renamed in, then the old one deleted; SIGINT and
        # SIGTERM wait for both renames, so an interrupt leaves the old store or the new one, whole.
        old = self.path.with_name(f"{self.path.name}.old-{os.getpid()}")
        blocked = {signal.SIGINT, signal.SIGTERM}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            replaced = self.path.exists()
            if replaced:
                os.rename(self.path, old)
            try:
                os.rename(self.tmp, self.path)
            except OSError:
                if replaced:
                    os.rename(old, self.path)
                raise
        except OSError as exc:
            raise CheckpointError(f"cannot move the new store into {self.path}: {exc.strerror}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if replaced:
            shutil.rmtree(old, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _config_of(index_file: Path, fields: dict[str, Any]) -> OptConfig:
    """The store's config; a field this flexrun does not know means a newer flexrun wrote the store."""
    known = {f.name for f in dataclasses.fields(OptConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(
            f"{index_file}: config field {unknown[0]!r} is unknown to this flexrun (a newer one wrote the store); "
            "upgrade flexrun or convert again"
        )
    return OptConfig(**fields)


def _meta_of(index_file: Path, name: str, m: Any) -> TensorMeta:
    """A tensor's entry, checked: its dtype known and its byte count the one its shape and encoding give."""
    try:
        meta = TensorMeta(
            name,
            str(m["file"]),
            m["dtype"],
            tuple(int(d) for d in m["shape"]),
            int(m["nbytes"]),
            m["crc32"],
            m.get("encoding", ""),
            int(m.get("group_size", 0)),
        )
        if Path(meta.file).name != meta.file or meta.file in ("", ".", ".."):
            raise CheckpointError(f"{index_file}: tensor {name} names a file outside the store ({meta.file!r})")
        if meta.dtype not in TORCH_DTYPES:
            raise CheckpointError(f"{index_file}: tensor {name} has unknown dtype {meta.dtype!r}; convert again")
        spec = meta.spec
        expected = spec.nbytes(meta.shape) if spec else math.prod(meta.shape) * meta.torch_dtype.itemsize
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{index_file}: tensor {name} has a corrupted entry ({exc}); convert again") from None
    except ConfigError as exc:
        raise CheckpointError(f"{index_file}: tensor {name}: {exc}; convert again") from None
    if expected != meta.nbytes:
        raise CheckpointError(
            f"{index_file}: tensor {name} has shape {list(meta.shape)} but {meta.nbytes} bytes "
            f"({expected} expected); convert again"
        )
    return meta


class TensorStore:
    """A read-only view of a finished store. Reads are O_DIRECT where the filesystem allows it."""

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.exists():
            raise CheckpointError(f"{self.path} is not a flexrun tensor store (no index.json)")
        try:
            index = json.loads(index_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise CheckpointError(
                f"{index_file}: corrupted index ({reason}); delete the store and convert again"
            ) from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise CheckpointError(f"{index_file}: not a version-{VERSION} flexrun store; convert again")
        version = index.get("version")
        if isinstance(version, int) and version > VERSION:
            raise CheckpointError(
                f"{index_file}: store version {version} was written by a newer flexrun (this one reads up to "
                f"{VERSION}); upgrade flexrun or convert again"
            )
        if version not in _READABLE:
            raise CheckpointError(f"{index_file}: not a version-{VERSION} flexrun store; convert again")
        if not isinstance(index.get("config"), dict) or not isinstance(index.get("tensors"), dict):
            raise CheckpointError(f"{index_file}: corrupted index (no config or tensors); convert again")
        self.index = index
        self.config = _config_of(index_file, index["config"])
        self.tensors = {name: _meta_of(index_file, name, m) for name, m in index["tensors"].items()}
        self.verify = verify
        self._verified: set[str] = set()
        self._stamps = _read_stamps(self.path / VERIFIED) if verify else {}
        self._new_stamps = False
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.direct: bool | None = None

    def meta(self, name: str) -> TensorMeta:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the store; convert again") from None

    def tokenizer_dir(self) -> Path | None:
        tok = self.path / "tokenizer"
        return tok if tok.is_dir() else None

    def compressed(self) -> dict[str, QuantSpec]:
        """The compressed tensors' specs by name."""
        return {n: m.spec for n, m in self.tensors.items() if m.spec is not None}

    @property
    def weight_compression(self) -> str:
        """How the store's weights are compressed: "" (not at all), "int8" or "int4"."""
        return next(iter(sorted({spec.kind for spec in self.compressed().values()})), "")

    def read(self, name: str, buf: torch.Tensor | None = None) -> torch.Tensor | QuantWeight:
        """Tensor ``name`` read into ``buf`` (as for ``read_raw``) and decoded: a typed view of the buffer, or
        a compressed weight whose parts are views of it."""
        return self.decode(name, self.read_raw(name, buf))

    def decode(self, name: str, raw: torch.Tensor) -> torch.Tensor | QuantWeight:
        """The tensor whose file's bytes ``raw`` holds (a uint8 buffer on any device), as views of it."""
        meta = self.meta(name)
        spec = meta.spec
        if spec is not None:
            return decode(raw, spec, meta.shape)
        return raw[: meta.nbytes].view(meta.torch_dtype).view(meta.shape)

    def count_read(self, nbytes: int) -> None:
        """Count ``nbytes`` read from the store's files by a reader of parts of them (rows of a table)."""
        with self._lock:
            self.bytes_read += nbytes

    def read_raw(self, name: str, buf: torch.Tensor | None = None) -> torch.Tensor:
        """The bytes of tensor ``name`` read into ``buf`` (a page-aligned uint8 buffer from
        ``diskio.aligned_empty`` of at least its padded size) or into a new buffer, checksum verified."""
        meta = self.meta(name)
        if buf is None:
            buf = diskio.aligned_empty(meta.nbytes)
        elif buf.numel() < meta.padded_nbytes:
            raise ValueError(f"buffer of {buf.numel()} bytes is too small for {name} ({meta.padded_nbytes})")
        file = self.path / meta.file
        try:
            fd, direct = diskio.open_for_read(file)
        except FileNotFoundError:
            raise CheckpointError(f"{file} is missing; the store is incomplete, convert again") from None
        try:
            got = diskio.read_into(fd, buf, 0, meta.padded_nbytes)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]  # any rewrite, rename or swap changes it
        self.direct = direct if self.direct is None else self.direct and direct
        if got < meta.nbytes:
            raise CheckpointError(f"{file} is truncated ({got} of {meta.nbytes} bytes); convert again")
        data = buf[: meta.nbytes]
        with self._lock:
            self.bytes_read += got
            check = self.verify and name not in self._verified
        if check:
            trusted = self._stamps.get(meta.file) == stamp  # checked before, and the file unchanged since
            if not trusted and _crc(data) != meta.crc32:
                raise CheckpointError(f"{file}: checksum mismatch, the tensor file is corrupted; convert again")
            with self._lock:
                self._verified.add(name)
                if not trusted:
                    self._stamps[meta.file] = stamp
                    self._new_stamps = True
        return data

    def remember_verified(self) -> None:
        """Record the files checked so far (``verified.json``), so the next open does not hash them again; a
        store that cannot be written to only costs that time."""
        with self._lock:
            if not self._new_stamps:
                return
            stamps, self._new_stamps = dict(self._stamps), False
        tmp = self.path / f"{VERIFIED}.{os.getpid()}.{threading.get_ident()}"
        try:
            tmp.write_text(json.dumps(stamps))
            os.replace(tmp, self.path / VERIFIED)
        except OSError as exc:
            log.debug("cannot record the verified tensors in %s: %s", self.path, exc.strerror)
            tmp.unlink(missing_ok=True)

    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self.tensors.values())

    def numel(self, name: str) -> int:
        return math.prod(self.meta(name).shape)


def _read_stamps(path: Path) -> dict[str, list[int]]:
    """``verified.json``'s stamps; none when it is missing or unreadable (every file is then checked)."""
    try:
        stamps = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(stamps, dict):
        return {}
    return {f: v for f, v in stamps.items() if isinstance(v, list) and len(v) == 4}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]
