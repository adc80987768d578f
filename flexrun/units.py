"""Human byte sizes: parse ``8GiB`` / ``500MB`` / ``1.5G`` and print ``324.2 GiB``."""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional unit (B, KB/KiB, MB/MiB, GB/GiB, TB/TiB; K/M/G/T = binary).

    Raises ValueError with the accepted forms when ``text`` is not a size.
    """
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 8GiB, 1.5TB or a byte count)")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float, round_up: bool = False) -> str:
    """``n`` bytes in binary units with one decimal, e.g. ``324.2 GiB``; ``round_up`` never shows less than
    ``n`` (for a budget that must be enough)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{math.ceil(value) if round_up else int(value)} B"
            return f"{math.ceil(value * 10) / 10 if round_up else value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
