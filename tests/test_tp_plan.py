"""The planner's tensor-parallel terms (``plan --tp N``): one rank's share of the weights, cache and work, plus the
all-reduces: 2 (N - 1) / N x rows x tokens x hidden bytes per row-parallel projection over the interconnect."""

from __future__ import annotations

import dataclasses
import json

import pytest

from flexrun.config import DTYPE_BYTES
from flexrun.costmodel.equations import all_reduce_seconds, cost_terms
from flexrun.costmodel.hardware import PRESETS
from flexrun.costmodel.prediction import placement_shares
from flexrun.placement import Placement, Shares
from flexrun.resolver import resolve
from tests.helpers import run

CFG = resolve("facebook/opt-1.3b")
HW = dataclasses.replace(PRESETS["cpu"], interconnect_bw=1e9, interconnect_latency=1e-4)


def test_all_reduce_seconds_by_hand() -> None:
    assert all_reduce_seconds(CFG, HW, 8, 1, 1) == 0.0  # one rank
    two = dataclasses.replace(HW, tp_ranks=2)
    # Two all-reduces per (sequential) layer, each moving the whole hidden state once for 2 ranks.
    hidden = 8 * 1 * CFG.hidden_size * CFG.run_dtype_bytes
    assert all_reduce_seconds(CFG, two, 8, 1, 1) == pytest.approx(2 * (1e-4 + hidden / 1e9))
    # Micro-batches of a prefill reduce one by one; four ranks move 2 x 3/4 of it.
    four = dataclasses.replace(HW, tp_ranks=4)
    assert all_reduce_seconds(CFG, four, 2, 16, 3) == pytest.approx(3 * 2 * (1e-4 + 1.5 * 2 * 16 * 4096 / 1e9))
    # A parallel-residual layer reduces attention and MLP together: once.
    neox = dataclasses.replace(CFG, parallel_attn=True)
    assert all_reduce_seconds(neox, two, 8, 1, 1) == pytest.approx(1e-4 + hidden / 1e9)


def test_a_rank_holds_half_and_pays_the_all_reduces() -> None:
    pl = Placement(Shares.parse("host=100"), Shares.parse("host=100"), Shares.parse("host=100"), 4, 2)
    shares = placement_shares(pl, HW.device_is_host)
    one = cost_terms(CFG, HW, 4, 2, 64, 8)
    two = cost_terms(CFG, dataclasses.replace(HW, tp_ranks=2), 4, 2, 64, 8)
    acts = 8 * 72 * CFG.hidden_size * CFG.run_dtype_bytes  # replicated: every rank holds the hidden state
    # Weights and cache halve; activations and working memory stay whole.
    held = [t.memory["host"].value(shares) for t in (one, two)]
    assert held[1] == pytest.approx((held[0] + acts + _working(one, shares)) / 2, rel=0.01)
    # Decode compute: half the matmuls and attention, plus two all-reduces per layer of the block's rows.
    d = [t.decode.compute.value(shares) for t in (one, two)]
    reduce = all_reduce_seconds(CFG, dataclasses.replace(HW, tp_ranks=2), 8, 1, 1)
    assert d[1] == pytest.approx(d[0] / 2 + reduce, rel=0.01)


def _working(terms, shares) -> float:  # type: ignore[no-untyped-def]
    """What a rank holds whole besides the activations: the working memory, the memory term's constant."""
    return terms.memory["host"].const


def test_plan_tp_prints_per_rank_bytes_and_the_all_reduce_share() -> None:
    args = ["plan", "--model", "facebook/opt-1.3b", "--hardware", "cpu", "--host-mem", "8GiB", "--json"]
    # A short search, compression pinned: the test is about the figures, not the choices.
    args += ["--max-block-size", "4", "--compress-weight", "none", "--compress-cache", "none"]
    args += ["--prompt-len", "64", "--gen-len", "8"]
    one = json.loads(run(*args).stdout)
    r = run(*args, "--tp", "2", "--interconnect-bw", "1.25GB")
    assert r.exit_code == 0, r.output
    two = json.loads(r.stdout)
    assert two["total_bytes"]["weights"] == one["total_bytes"]["weights"] // 2
    tp = two["tensor_parallel"]
    assert tp["ranks"] == 2 and tp["interconnect_bw"] == 1.25e9 and 0 < tp["share"] < 1
    # Two reductions a layer, each of the hidden state in the dtype computed in (float32 on the cpu preset).
    assert tp["bytes_per_layer"] == 2 * 2 * CFG.hidden_size * DTYPE_BYTES[two["compute_dtype"]]
    r = run(*args, "--tp", "3")
    assert r.exit_code == 1 and "32 attention heads, which 3 ranks cannot split evenly" in r.stderr
