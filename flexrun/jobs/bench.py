"""The ``bench`` job: one block of synthetic prompts through the engine, like FlexGen's benchmark, and how
far its decode step is from the roofline of this placement."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import IO, Any

import torch

from flexrun.config import OptConfig
from flexrun.costmodel.layerprobe import JobShape
from flexrun.jobs.autoplace import build_engine, plan_job
from flexrun.jobs.calibration import job_hardware, record_run
from flexrun.jobs.options import EngineOptions
from flexrun.jobs.report import roofline
from flexrun.jobs.tp import tensor_parallel
from flexrun.placement import Placement
from flexrun.runtime.sampling import SamplingParams
from flexrun.runtime.stats import RunStats
from flexrun.runtime.tiers import compute_device


@dataclass(frozen=True)
class BenchResult:
    cfg: OptConfig  # as run: its compute dtype resolved
    placement: Placement
    stats: RunStats
    roofline: dict[str, Any]
    plan_line: str | None  # the planner's line, when it chose the placement


@tensor_parallel
def run_bench(opts: EngineOptions, prompt_len: int, gen_len: int, stderr: IO[str] | None = None) -> BenchResult:
    """Generate ``gen_len`` tokens after random ``prompt_len``-token prompts for one block (seeded, so
    every run times the same work), never stopping early at an EOS. The plan goes to ``stderr`` first."""
    # Planned before the store opens: each weight compression the planner may choose is a store of its own.
    settled = plan_job(opts, opts.model.source("generate"), prompt_len, gen_len)
    store = settled.opts.model.open_store("generate")
    cfg = settled.opts.model.run_config(store, compute_device())
    engine, plan_line = build_engine(store, cfg, settled.opts, prompt_len, gen_len, planned=settled.planned)
    if plan_line:
        print(plan_line, file=stderr or sys.stderr, flush=True)
    with engine:
        gen = torch.Generator().manual_seed(0)
        n = engine.placement.block_size
        prompts = torch.randint(4, cfg.vocab_size, (n, prompt_len), generator=gen).tolist()
        _, stats, _ = engine.generate(prompts, SamplingParams(max_new_tokens=gen_len, stop_at_eos=False))
    # As the planner stands before this run corrects it, its compute probed on this model at this shape.
    pl = engine.placement
    hw = job_hardware(settled.opts, engine.cfg, JobShape(prompt_len, gen_len, pl.gpu_batch_size, pl.block_size, n))
    roof = roofline(engine.cfg, engine.placement, stats, hw, prompt_len, gen_len)
    record_run(settled.opts, engine.cfg, engine.placement, stats, prompt_len, gen_len)
    return BenchResult(engine.cfg, engine.placement, stats, roof, plan_line)
