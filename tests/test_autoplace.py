"""``--placement auto``: the planner's placement must be one the engine accepts under the same budgets."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexrun.errors import BudgetError, PlacementError
from flexrun.jobs.autoplace import build_engine, choose_placement
from flexrun.jobs.options import EngineOptions, ModelOptions, PlacementRequest
from flexrun.runtime.engine import Engine
from flexrun.runtime.tiers import Budgets
from flexrun.weights.convert import write_dummy_store
from flexrun.weights.store import TensorStore
from tests.hf_reference import tiny_opt_config


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> TensorStore:
    cfg = tiny_opt_config(name="t")
    return TensorStore(write_dummy_store(cfg, tmp_path_factory.mktemp("auto") / "store", progress=False))


def test_planned_placement_is_replanned_until_the_engine_accepts_it(store: TensorStore, tmp_path: Path) -> None:
    # At 385 KiB the planner's linear model (staging buffers prorated by share, tensors unpadded) picks a
    # weight split whose whole double-buffered arena does not fit; the engine's exact accounting refuses it.
    budgets = Budgets(host=385 * 1024)
    opts = EngineOptions(ModelOptions("t"), PlacementRequest(mode="auto"), budgets, offload_dir=str(tmp_path))
    first = choose_placement(store.config, opts.placement, budgets, 8, 8, 4, opts.offload_dir).placement
    with pytest.raises(BudgetError):
        Engine(store, first, 16, budgets=budgets, offload_dir=tmp_path)
    engine, line = build_engine(store, store.config, opts, 8, 8, 4)
    with engine:
        assert engine.ledger.total("host") <= budgets.host
        assert line is not None and line.startswith("plan (")  # only the plan that runs is reported


def test_when_nothing_fits_the_error_is_the_runtimes(store: TensorStore, tmp_path: Path) -> None:
    # At 320 KiB the planner finds a placement, the engine refuses it, and so it does every one planned again.
    opts = EngineOptions(ModelOptions("t"), PlacementRequest(mode="auto"), Budgets(host=320 * 1024), str(tmp_path))
    with pytest.raises(BudgetError, match=r"the host tier needs .* but its budget is 320.0 KiB"):
        build_engine(store, store.config, opts, 8, 8, 4)


def test_a_plan_made_before_the_process_grew_is_made_again(
    store: TensorStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A job plans before its store opens; converting the store (a GGUF file's reader, transformers' modules)
    # can grow the process, so the host budget at the engine's start is smaller than the one planned with.
    before = Budgets(host=4 << 20)
    planned = choose_placement(store.config, PlacementRequest(mode="auto"), before, 8, 8, 4, str(tmp_path))
    assert planned.host_budget is not None and planned.host_budget >= 3 << 20
    after = Budgets(host=400 * 1024)
    with pytest.raises(BudgetError):
        Engine(store, planned.placement, 16, budgets=after, offload_dir=tmp_path)
    opts = EngineOptions(ModelOptions("t"), PlacementRequest(mode="auto"), after, offload_dir=str(tmp_path))
    with caplog.at_level("INFO", logger="flexrun.jobs.autoplace"):
        engine, line = build_engine(store, store.config, opts, 8, 8, 4, planned=planned)
    # Planned again for what the process may hold now, before any engine is refused for the old plan.
    assert "the host budget fell from" in caplog.records[0].getMessage()
    with engine:
        assert engine.ledger.total("host") <= 400 * 1024
        assert engine.placement != planned.placement and line is not None and line != planned.line
    # Grown past what any placement needs: refused in one line that says a rerun starts with the old budget.
    gone = EngineOptions(ModelOptions("t"), PlacementRequest(mode="auto"), Budgets(host=8 * 1024), str(tmp_path))
    with pytest.raises(PlacementError, match=r"fell from .* running the same command again"):
        build_engine(store, store.config, gone, 8, 8, 4, planned=planned)
