"""I/O threads that overlap disk reads and writes with compute; a synchronous stand-in for --no-overlap."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class IOPool:
    """Runs I/O tasks on a few threads (overlap on) or immediately in the caller (overlap off).

    Both modes run the same tasks in the same order, so they produce identical results.
    """

    # Enough for a group's weight load, a layer's KV cache reads (``layout.kv_stage_depth``) and the writes
    # behind them to be in flight together: the threads wait in system calls, not on the interpreter.
    THREADS = 8

    def __init__(self, overlap: bool, threads: int = THREADS) -> None:
        self.overlap = overlap
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="flexrun-io") if overlap else None

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        fut: Future[T] = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:
            fut.set_exception(exc)
        return fut

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def done(value: T) -> Future[T]:
    """A future that already holds ``value``."""
    fut: Future[T] = Future()
    fut.set_result(value)
    return fut
