"""Shared fixtures; GPU tests skip cleanly without CUDA."""

from __future__ import annotations

import os

# One compute thread per process: the tests' tiny models gain nothing from two, and on a loaded 2-core
# machine two threads per process thrash (decode steps 40x slower measured). Set before torch loads, so
# the subprocesses that tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The planner plans with the `cpu` preset in tests, not with this machine's calibration (measured on first use
# and corrected by recorded runs): a test's placement must not depend on the machine or on earlier runs.
# tests/test_calibration_cache.py removes it to test the calibration itself.
os.environ.setdefault("FLEXRUN_HARDWARE", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a CUDA device Triton kernels run under Triton's interpreter, on CPU tensors
# (tests/test_triton_kernels.py). Triton decides when it decorates a function, its own standard library's
# included, so the variable is set before anything imports triton (torch and flexrun do not on their own).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import JOB_VOCAB  # noqa: E402
from tests.hf_reference import OptCheckpoint, save_tiny_opt  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def job_ckpt(tmp_path_factory: pytest.TempPathFactory) -> OptCheckpoint:
    """A tiny OPT checkpoint with a trained byte-level BPE tokenizer, and its HF model and tokenizer."""
    return save_tiny_opt(tmp_path_factory.mktemp("jobs") / "ckpt", seed=5, tokenizer=True, vocab_size=JOB_VOCAB)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store directory for the module's conversions (each checkpoint converted once)."""
    return tmp_path_factory.mktemp("stores")
