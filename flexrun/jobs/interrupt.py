"""Stopping a long job cleanly on SIGINT (Ctrl-C) or SIGTERM.

The first signal asks the job to stop after the block in flight has been generated and written; a second
one abandons that block at once (KeyboardInterrupt), except while its records are being written, which
is never cut short: the abandon then happens right after the write.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Installed as the handler of SIGINT and SIGTERM for the duration of a job (``with stop.installed():``)."""

    def __init__(self, notify: Callable[[str], None] | None = None) -> None:
        self.notify = notify
        self.signum: int | None = None
        self._writing = False
        self._abandon = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + (self.signum or signal.SIGINT)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            if self.notify is not None:
                name = signal.Signals(signum).name
                self.notify(f"{name}: stopping after the current block (send it again to abandon the block)")
            return
        if self._writing:
            self._abandon = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals are delivered to the main thread only; nothing to install
            return
        previous: dict[int, Any] = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """A section a second signal does not cut short."""
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
        if self._abandon:
            raise KeyboardInterrupt
