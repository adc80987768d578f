"""Keep glibc's malloc from holding freed tensor memory, so that peak RSS stays within the planned budget.

glibc serves a request above its mmap threshold with its own mapping, returned to the system on free, and
anything smaller from its heaps, which keep freed memory. The threshold is adaptive: each freed mapping
raises it to that size (up to 32 MiB), so after the first prefill the multi-MiB temporaries of every
later matmul land in the heaps and stay resident, over the plan (benchmarks/README.md has the figures).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

from flexrun.config import UPCAST_CHUNK_BYTES

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
# Requests of this size or more get their own mapping: the engine's larger buffers are allocated once,
# and the chunked matmul's scratch buffers are this size.
MMAP_THRESHOLD = UPCAST_CHUNK_BYTES
_done = False


def release_large_frees() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD`` for this process, once. Returns whether it is set.

    Does nothing where the C library is not glibc, or when the user set ``MALLOC_MMAP_THRESHOLD_``
    (glibc's own tunable, which then stands).
    """
    global _done
    if _done:
        return True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if _done:
        log.debug("malloc: mmap threshold fixed at %d bytes", MMAP_THRESHOLD)
    return _done
