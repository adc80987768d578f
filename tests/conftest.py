"""Shared fixtures; GPU tests skip cleanly without CUDA."""

from __future__ import annotations

import os

# One compute thread per process: the tests' tiny models gain nothing from two, and on a loaded 2-core
# machine two threads per process thrash (decode steps 40x slower measured). Set before torch loads, so
# the subprocesses that tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
