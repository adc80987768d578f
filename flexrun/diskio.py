"""Aligned disk I/O: page-aligned buffers and O_DIRECT reads that bypass the page cache.

Used by the runtime's disk tier and by ``flexrun calibrate``. Files written for O_DIRECT reading are
padded to ``ALIGN`` bytes. Where the filesystem refuses O_DIRECT (tmpfs, some network filesystems) the
reads fall back to buffered I/O and one log line says so: figures measured there may be flattered by
the page cache.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_warned_dirs: set[str] = set()


def padded(nbytes: int) -> int:
    """``nbytes`` rounded up to the alignment unit."""
    return -(-nbytes // ALIGN) * ALIGN


def aligned_empty(nbytes: int, pin: bool = False) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of ``padded(nbytes)`` bytes whose data starts on a page boundary."""
    size = padded(max(nbytes, 1))
    raw = torch.empty(size + ALIGN, dtype=torch.uint8, pin_memory=pin)
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift : shift + size]


def open_for_read(path: str | Path, direct: bool = True) -> tuple[int, bool]:
    """Open ``path`` read-only, with O_DIRECT when asked and supported. Returns (fd, is_direct)."""
    path = str(path)
    if direct and _O_DIRECT:
        try:
            return os.open(path, os.O_RDONLY | _O_DIRECT), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            parent = os.path.dirname(path)
            if parent not in _warned_dirs:
                _warned_dirs.add(parent)
                log.warning("O_DIRECT not supported under %s; reading through the page cache", parent)
    return os.open(path, os.O_RDONLY), False


def read_into(fd: int, buf: torch.Tensor, offset: int = 0, nbytes: int | None = None) -> int:
    """Read ``nbytes`` (default: all of ``buf``) at file ``offset`` into the uint8 tensor ``buf``.

    With O_DIRECT, ``buf`` must be page-aligned (``aligned_empty``) and ``offset``/``nbytes`` multiples of
    ``ALIGN``. Returns the bytes read (short only at end of file).
    """
    view = memoryview(buf.numpy()).cast("B")  # type: ignore[arg-type]
    want = len(view) if nbytes is None else nbytes
    done = 0
    while done < want:
        n = os.preadv(fd, [view[done:want]], offset + done)
        if n == 0:
            break
        done += n
    return done


def write_padded(path: str | Path, data: memoryview | bytes) -> None:
    """Write ``data`` to ``path`` zero-padded to the alignment unit, and fsync it."""
    pad = padded(len(data)) - len(data)
    with open(path, "wb") as f:
        f.write(data)
        if pad:
            f.write(b"\0" * pad)
        f.flush()
        os.fsync(f.fileno())
