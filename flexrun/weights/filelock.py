"""One writer per file: an advisory lock (``flock``) on a small lock file beside what is written, holding the
pid of the process that holds it, so a second writer can be refused (or made to wait) naming the first.

The lock file is removed on release; a process that locked a file someone else has just removed sees that
the path no longer names its file and locks again, so two writers never both hold "the" lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from flexrun.errors import InputError


class FileLock:
    """An exclusive lock on ``path`` (created if missing); ``holder()`` names whoever holds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, wait: bool) -> bool:
        """Take the lock; without ``wait``, False when another process holds it. An unwritable place is an
        InputError."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise InputError(f"cannot create the lock file {self.path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and removed by its holder between our open and our lock: try again
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return True

    def holder(self) -> str:
        """The process that holds the lock, as words for a message."""
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"process {pid}" if pid.isdigit() else "another process"

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
