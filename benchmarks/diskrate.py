"""The disk's read rate now, as the engine reads: O_DIRECT into a page-aligned buffer, REQUEST bytes a call,
through FILE from its start (the page cache dropped by the caller). Prints GiB/s.

    python benchmarks/diskrate.py FILE [MAX_BYTES]

A virtual disk's rate moves between runs (0.9-1.9 GiB/s seen on one machine in a day), so a benchmark that
relates a step to its bytes measures the rate beside it rather than quoting the calibration.
"""

from __future__ import annotations

import os
import sys
import time

from flexrun import diskio

REQUEST = 16 << 20  # about one streamed weight matrix of a 1B model


def main() -> None:
    path = sys.argv[1]
    size = os.path.getsize(path) // diskio.ALIGN * diskio.ALIGN
    if len(sys.argv) > 2:
        size = min(size, int(sys.argv[2]) // diskio.ALIGN * diskio.ALIGN)
    buf = diskio.aligned_empty(REQUEST)
    fd, direct = diskio.open_for_read(path)
    start, done = time.perf_counter(), 0
    try:
        while done < size:
            n = min(REQUEST, size - done)
            done += diskio.read_into(fd, buf, done, diskio.padded(n))
    finally:
        os.close(fd)
    rate = done / (time.perf_counter() - start) / 2**30
    print(f"{rate:.2f}" if direct else f"{rate:.2f} (buffered: O_DIRECT unsupported)")


if __name__ == "__main__":
    main()
