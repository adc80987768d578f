"""A job over tensor-parallel ranks: rank 0 runs the job as one process would (reads the input, plans, writes
the output, handles signals) and hands each engine call to the other ranks, which only compute their shards.

``tensor_parallel`` wraps a job function. With one process it is the job itself. With several (``--tp N`` or
torchrun), rank 0 runs the job; ``build_engine`` tells the others the engine it built (``announce``), then each
``Engine.generate`` on rank 0 hands its work over (``Engine.follow`` on the others), and the job's end is
broadcast so the others return. A rank other than 0 ignores SIGINT and SIGTERM (rank 0 decides when to stop,
between blocks, for all) and ends with ``RankDone``: nothing to print, exit 0; a lost rank 0 ends it quietly.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flexrun.errors import FlexrunError
from flexrun.jobs.options import EngineOptions
from flexrun.parallel import RankLost, TensorParallel, current, init_from_env
from flexrun.paths import offload_root
from flexrun.placement import Placement
from flexrun.runtime.encoder import Encoder
from flexrun.runtime.engine import Engine

R = TypeVar("R")


class RankDone(FlexrunError):
    """A rank other than 0 finished following rank 0 (or lost it): nothing to say, rank 0 said it."""

    def __init__(self, exit_code: int = 0) -> None:
        super().__init__("")
        self.exit_code = exit_code


@dataclass(frozen=True)
class Setup:
    """What the other ranks need to build the engine rank 0 built."""

    opts: EngineOptions
    placement: Placement
    max_len: int
    compute_dtype: str
    encoder: bool = False  # an ``Encoder`` (embed), else an ``Engine``


def announce(engine: Engine | Encoder, opts: EngineOptions) -> None:
    """On rank 0, once its engine is built: the others build the same one, then all wait for each other."""
    tp = engine.tp
    if tp.world > 1:
        encoder = isinstance(engine, Encoder)
        tp.broadcast(Setup(opts, engine.placement, engine.max_len, engine.cfg.run_dtype, encoder))
        tp.barrier()


def _follow(tp: TensorParallel, own: EngineOptions) -> None:
    """Build the engine rank 0 announces, within this rank's own budgets (``own``'s: its machine's part), and
    compute its shard of each of rank 0's engine calls."""
    setup = tp.broadcast()
    if setup is None:  # rank 0 had nothing to run
        return
    store = setup.opts.model.open_store("embed" if setup.encoder else "generate", progress=False)
    engine = (Encoder if setup.encoder else Engine)(
        store,
        setup.placement,
        setup.max_len,
        budgets=own.budgets,
        offload_dir=setup.opts.offload_dir,
        compute_dtype=setup.compute_dtype,
        tp=tp,
    )
    with engine:
        tp.barrier()
        engine.follow()  # until the job's end


def tensor_parallel(job: Callable[..., R]) -> Callable[..., R]:
    """``job(opts, ...)`` run over the ranks ``opts.tp`` (or torchrun's WORLD_SIZE) names."""

    @functools.wraps(job)
    def run(opts: EngineOptions, *args: Any, **kwargs: Any) -> R:
        tp = init_from_env(opts.tp if opts.tp > 1 else None)
        if tp.world == 1:
            return job(opts, *args, **kwargs)
        try:
            opts = shared_budgets(tp, opts)
            if tp.rank == 0:
                result = job(opts, *args, **kwargs)
                tp.broadcast(None)  # no more work
                return result
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            try:
                _follow(tp, opts)
            except RankLost:
                raise RankDone(1) from None  # rank 0 (or another) is gone; rank 0 or the launcher says why
            raise RankDone()
        finally:
            tp.close()

    return run


def shared_budgets(tp: TensorParallel, opts: EngineOptions) -> EngineOptions:
    """``opts`` with this rank's part of its machine's memory and disk, which its ``tp.local_world`` ranks
    share: every rank reads what is free at once (between two barriers), before any of them allocates."""
    tp.barrier()
    budgets = opts.budgets.shared(tp.local_world, offload_root(opts.offload_dir))
    tp.barrier()
    return dataclasses.replace(opts, budgets=budgets)


def world() -> int:
    """How many tensor-parallel ranks this job runs on."""
    return current().world
