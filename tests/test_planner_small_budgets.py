"""The planner on small host budgets (issue 25), with the `cpu` preset: an OPT-1.3B-shaped bfloat16 model
computed in float32 (2.5 GiB of weights) under 0.7-2 GiB. The block chosen is pinned per budget; each
expectation says why (no timing: what is pinned is the model's choice, the sweep measures the rest)."""

from __future__ import annotations

import dataclasses

import pytest

from flexrun.costmodel.equations import cost_terms
from flexrun.costmodel.hardware import PRESETS
from flexrun.costmodel.lp import solve_lp
from flexrun.costmodel.search import plan
from flexrun.resolver import resolve

MiB = 1 << 20
CFG = dataclasses.replace(resolve("opt-1.3b"), dtype="bfloat16", compute_dtype="float32")
NONE = ("", "")


def _hw(host: int):
    return PRESETS["cpu"].with_memory(host=host)


@pytest.mark.parametrize(("host", "shape"), [(700 * MiB, (4, 4)), (1024 * MiB, (8, 2)), (2048 * MiB, (16, 1))])
def test_sixteen_prompts_take_the_biggest_micro_batch_that_fits(host: int, shape: tuple[int, int]) -> None:
    """16 prompts of 128 + 32: the block of 16 in as few micro-batches as the budget holds. A prefill converts
    every bfloat16 weight to float32 once per micro-batch, so 16 x 1 runs fastest where it fits; twice the
    micro-batch does not fit at the smaller budgets (its prefill intermediates)."""
    hw = _hw(host)
    got = plan(CFG, hw, 128, 32, compress=NONE, max_block_size=16).placement
    assert (got.gpu_batch_size, got.num_gpu_batches) == shape
    gbs = shape[0] * 2
    if gbs <= 16:
        assert solve_lp(cost_terms(CFG, hw, gbs, 16 // gbs, 128, 32), hw) is None


def test_fewer_micro_batches_are_priced_and_no_longer_tie() -> None:
    """The same block in more micro-batches costs one weight conversion per micro-batch more in prefill (they
    used to tie, and the tie was pruned before the planner could prefer the fewer)."""
    hw = _hw(2048 * MiB)
    one = cost_terms(CFG, hw, 16, 1, 128, 32).prefill.compute.const
    many = cost_terms(CFG, hw, 1, 16, 128, 32).prefill.compute.const
    params = sum(s[0] * s[1] for s in CFG.layer_shapes().values() if len(s) == 2) + CFG.vocab_size * 2048 / 24
    assert many - one == pytest.approx(15 * params * (2 + 4) / hw.device_mem_bw)


def test_a_small_budget_keeps_the_head_resident_and_streams_the_layers() -> None:
    """At 700 MiB the tied head (196 MiB, read whole every step) stays in memory: the layers stream through a
    double buffer of one layer (96 MiB), not of the head."""
    hw = _hw(700 * MiB)
    chosen = plan(CFG, hw, 32, 32, compress=NONE, max_block_size=1)
    head = CFG.vocab_size * CFG.hidden_size * 2
    assert chosen.placement.weights.host * CFG.model_bytes() >= head
    layer = CFG.layer_bytes()
    # What a step reads: everything not resident, except the position table (read by rows).
    assert chosen.prediction.step_weight_reads < chosen.placement.weights.disk * CFG.model_bytes()
    assert chosen.prediction.peak["host"] < hw.host_mem * 0.8 + 1
    assert chosen.prediction.step_weight_reads > CFG.model_bytes() - head - 4 * layer


def test_two_short_prompts_are_one_block() -> None:
    """Two prompts with weights on disk: one block of 2 reads the weights half as often as two of 1."""
    chosen = plan(CFG, _hw(646 * MiB), 16, 4, compress=NONE, max_block_size=2).placement
    assert chosen.block_size == 2 and chosen.num_gpu_batches == 1
