"""Measured peak memory stays within what the engine planned for the host tier, plus a stated margin.

Each run is a fresh process, so that memory freed by an earlier run (which the allocator keeps) cannot
hide growth. The model is big enough (100 MiB of float32 weights) that holding its weights in RAM would
blow the margin: the all-host run shows the check can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexrun.config import OptConfig
from flexrun.weights.convert import write_dummy_store

MiB = 1 << 20
# Beyond the planned bytes: torch's per-op temporaries (the attention scores and MLP intermediates of one
# micro-batch, which the working-memory estimate covers only in part), the sampler's logits, allocator
# slack and thread stacks of the I/O pool.
MARGIN = 16 * MiB

_RUN = """
import json, sys
from flexrun.placement import Placement, Shares
from flexrun.runtime.engine import Engine
from flexrun.runtime.sampling import SamplingParams
from flexrun.runtime.stats import current_rss
from flexrun.runtime.tiers import Budgets
from flexrun.weights.store import TensorStore

store = TensorStore(sys.argv[1])
weights, budget = sys.argv[2], int(sys.argv[3])
before = current_rss()
pl = Placement(Shares.parse(weights), gpu_batch_size=4, num_gpu_batches=2)
with Engine(store, pl, 64, budgets=Budgets(host=budget), offload_dir=sys.argv[4]) as engine:
    _, stats, _ = engine.generate([[5] * 32] * 8, SamplingParams(max_new_tokens=16, stop_at_eos=False))
    print(json.dumps({"planned": engine.ledger.total("host"), "growth": stats.peak_rss - before}))
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = OptConfig(
        name="mid",
        num_hidden_layers=8,
        hidden_size=512,
        n_head=8,
        ffn_embed_dim=2048,
        vocab_size=2000,
        max_seq_len=128,
        dtype="float32",
    )
    return write_dummy_store(cfg, tmp_path_factory.mktemp("mem") / "store", progress=False)


def _run(store: Path, weights: str, budget: int, offload: Path) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _RUN, str(store), weights, str(budget), str(offload)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_within_the_host_budget(store: Path, tmp_path: Path) -> None:
    budget = 64 * MiB  # weights on disk need ~49 MiB on the host: the streaming arenas, cache, activations
    disk = _run(store, "disk=100", budget, tmp_path)
    assert disk["planned"] <= budget
    assert disk["growth"] <= disk["planned"] + MARGIN, disk
    # The same check fails when the 100 MiB of weights are held in RAM.
    host = _run(store, "host=100", 1 << 30, tmp_path)
    assert host["growth"] > disk["planned"] + MARGIN, host
