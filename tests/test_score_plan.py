"""The planner for a scorer's pass (``gen_len`` 0, prefill only): no KV cache budgeted, since the scorer keeps
each layer's keys and values one layer long in a scratch of one micro-batch; its buffers counted instead."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from flexrun.costmodel.equations import cost_terms, scorer_bytes
from flexrun.costmodel.hardware import PRESETS
from flexrun.costmodel.prediction import predict
from flexrun.costmodel.search import plan
from flexrun.resolver import resolve
from flexrun.runtime.scorer import Scorer
from tests.helpers import place, save_and_convert
from tests.hf_reference import tiny_opt


def test_a_prefill_only_pass_budgets_no_cache() -> None:
    cfg = resolve("opt-1.3b")
    scoring = cost_terms(cfg, PRESETS["t4"], 8, 4, 512, 0)
    generating = cost_terms(cfg, PRESETS["t4"], 8, 4, 512, 1)
    for tier, mem in scoring.memory.items():
        assert not any(key[0] == "cache" and coef for key, coef in mem.coef.items()), tier
    assert any(key[0] == "cache" and coef for key, coef in generating.memory["host"].coef.items())
    assert scoring.decode_steps == generating.decode_steps == 0
    # The device holds the scorer's scratch (one micro-batch's K and V, the scored logits) instead of the block's.
    assert scorer_bytes(cfg, 8, 512) == 2 * 8 * 512 * cfg.kv_dim * cfg.run_dtype_bytes + 2 * 128 * cfg.vocab_size * 4


def test_without_the_cache_more_of_the_model_stays_in_memory() -> None:
    """OPT-1.3B on a T4 whose memory holds the weights but not them and a block of 8 x 4 sequences' cache
    (3 GiB) beside: the generate-shaped plan sends weights to disk, the scorer's keeps them all in memory."""
    cfg = resolve("opt-1.3b")
    hw = dataclasses.replace(PRESETS["t4"], device_mem=2 << 30, host_mem=int(cfg.model_bytes() * 1.3))
    shape: dict[str, Any] = {"gpu_batch_sizes": [8], "num_gpu_batches": 4, "compress": ("", "")}
    scoring = plan(cfg, hw, 512, 0, **shape)
    generating = plan(cfg, hw, 511, 1, **shape)
    assert scoring.placement.weights.get("disk") == 0 < generating.placement.weights.get("disk")
    assert scoring.prediction.throughput > 0


def test_the_scorers_ledger_is_what_the_planner_predicts(tmp_path: Path) -> None:
    """On a CPU (the device is the host): the planned peak is the scorer's ledger within 5%; the generate-shaped
    plan's is the block's cache over it (less the scorer's own buffers)."""
    _, model = tiny_opt(seed=1)
    store = save_and_convert(model, tmp_path)
    placement = place(b=4, n=2)
    with Scorer(store, placement, max_seq_len=32, offload_dir=tmp_path / "off") as scorer:
        ledger = scorer.ledger.total("host")
        cfg = scorer.cfg
    predicted = predict(cfg, PRESETS["cpu"], placement, 32, 0).peak["host"]
    assert abs(predicted - ledger) <= 0.05 * ledger, (predicted, ledger)
    with_cache = predict(cfg, PRESETS["cpu"], placement, 31, 1).peak["host"]
    assert with_cache - predicted >= cfg.cache_bytes(8, 32) - scorer_bytes(cfg, 4, 32)
