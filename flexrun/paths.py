"""Where flexrun keeps its cache (converted tensor stores, calibration results)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$FLEXRUN_CACHE_DIR``, else ``$XDG_CACHE_HOME/flexrun``, else ``~/.cache/flexrun``."""
    env = os.environ.get("FLEXRUN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flexrun"


def offload_root(offload_dir: str | Path | None = None) -> Path:
    """Where disk-resident KV cache and activations go: ``offload_dir``, else the cache dir's ``offload``."""
    return Path(offload_dir).expanduser() if offload_dir else cache_dir() / "offload"
