"""Tensor parallelism over torch.distributed: which part of each tensor a rank holds (``shard``), the group and
its collectives (``group``), and starting local ranks (``launch``)."""

from flexrun.parallel.group import SINGLE, RankLost, TensorParallel, current, init_from_env, launched
from flexrun.parallel.shard import (
    SLICE_FIX,
    Shard,
    check_split,
    rank_store,
    slice_bytes,
    sliced_at_load,
    split_of,
    write_shard,
    write_shards,
)

__all__ = [
    "SINGLE",
    "SLICE_FIX",
    "RankLost",
    "Shard",
    "TensorParallel",
    "check_split",
    "current",
    "init_from_env",
    "launched",
    "rank_store",
    "slice_bytes",
    "sliced_at_load",
    "split_of",
    "write_shard",
    "write_shards",
]
