"""What the engine and the encoder share: setting up a run over the layer stack, and walking it.

Setting up plans every buffer on a ledger (working memory, the runner's own cache or scratch, the
activations, the weights on their tiers), checks the ledger against the tier budgets, and only then
allocates. Walking goes group by group (input embeddings, each layer, output head): a group's weights
are loaded once and handed to the caller, who reuses them for every micro-batch of the block, while
the next group's weights load on the I/O threads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch

from flexrun.errors import BudgetError, InputError, PlacementError
from flexrun.kernels import select_kernels
from flexrun.layout import Group, stack_layout
from flexrun.parallel import SINGLE, SLICE_FIX, TensorParallel, rank_store, slice_bytes, sliced_at_load
from flexrun.paths import offload_root
from flexrun.placement import Placement
from flexrun.precision import with_compute_dtype
from flexrun.runtime.iopool import IOPool
from flexrun.runtime.kvformat import kv_format
from flexrun.runtime.malloc import release_large_frees
from flexrun.runtime.stats import RunStats, current_rss, device_peak, peak_rss, reset_device_peak, reset_peak_rss
from flexrun.runtime.tiers import RUNTIME_RSS, Budgets, Ledger, compute_device, make_workdir, release_workdir
from flexrun.runtime.transfer import Mover
from flexrun.runtime.weights import WeightManager
from flexrun.units import format_bytes
from flexrun.weights.store import TORCH_DTYPES, TensorStore

log = logging.getLogger(__name__)

R = TypeVar("R", bound="StackRunner")


def check_supported(placement: Placement, device: torch.device, store: TensorStore) -> None:
    """Refuse placement options this runtime does not carry out, rather than ignore them: weights compressed
    otherwise than the store holds them (compression happens when a store is converted)."""
    kinds = {spec.kind for spec in store.compressed().values()}
    held = ", ".join(sorted(kinds)) or "uncompressed"
    if len(kinds) > 1 or store.weight_compression != placement.compress_weight:
        want = placement.compress_weight or "uncompressed"
        raise PlacementError(
            f"the placement asks for {want} weights but the store {store.path} holds {held} ones; convert the "
            f"checkpoint with the same --compress-weight (generate and bench do so themselves)"
        )


def token_problem(ids: list[int], vocab_size: int) -> str | None:
    """What makes ``ids`` unfit to run (no tokens, or one outside the vocabulary), or None."""
    if not ids:
        return "empty prompt"
    bad = next((t for t in ids if t < 0 or t >= vocab_size), None)
    if bad is not None:
        return f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})"
    return None


class StackRunner:
    """A run over the layer stack with a placement over device / host / disk; a context manager (it owns
    temporary files). Subclasses plan and allocate their own buffers and compute the groups."""

    #: Prefix of the run's temporary directory under the offload root.
    workdir_prefix = "run-"
    #: The input group's tables the runner looks rows up in (``weights.lookup``): read by rows from disk.
    gathered: tuple[str, ...] = ()

    def __init__(
        self,
        store: TensorStore,
        placement: Placement,
        max_seq_len: int,
        budgets: Budgets | None = None,
        offload_dir: str | Path | None = None,
        device: torch.device | None = None,
        compute_dtype: str | None = None,
        tp: TensorParallel = SINGLE,
    ) -> None:
        """``compute_dtype``: what hidden states are computed in; "auto" or None for ``resolve_compute_dtype``'s
        choice (float32 for a 16-bit model on a CPU without 16-bit matmul hardware). ``tp``: this rank's place in
        a tensor-parallel group; a whole model's store is then sliced to the rank's part in the run's workdir."""
        self.store = store
        self.tp = tp
        release_large_frees()
        self.base_rss = current_rss()
        self.device = device or compute_device()
        self.cfg = cfg = with_compute_dtype(store.config, compute_dtype, self.device)
        self.placement = placement
        check_supported(placement, self.device, store)
        if cfg.position == "learned" and max_seq_len > cfg.max_seq_len:
            raise InputError(f"{max_seq_len} tokens exceed the model's {cfg.max_seq_len} positions")
        self.max_len = max_seq_len
        self.dtype = TORCH_DTYPES[cfg.run_dtype]
        self.layout = stack_layout(cfg)
        self.kernels = select_kernels(self.device)
        self.host_kernels = select_kernels(torch.device("cpu"))  # host-side attention's
        kv_heads = cfg.n_kv_head // tp.world  # a rank caches its own heads only
        self.kv_format = kv_format(TORCH_DTYPES[cfg.dtype], kv_heads, cfg.head_dim, placement.compress_cache)
        root = offload_root(offload_dir)
        self.workdir = make_workdir(root, self.workdir_prefix)
        self.pool = IOPool(placement.overlap)
        self.mover = Mover(self.device, placement.overlap)
        ledger = Ledger()
        try:
            # Budgets first: a rank's slice of a whole store, written below, takes the offload dir's disk too.
            self.budgets, self.budget_sources = (budgets or Budgets()).described(root, self.device.type == "cuda")
            sliced = slice_bytes(store, tp.shard) if sliced_at_load(store, tp.shard) else 0
            if sliced > self.budgets["disk"]:  # refused before a byte is written
                raise BudgetError(
                    f"this rank's slice of the store {store.path} ({format_bytes(sliced)}), written at load into "
                    f"the offload dir, exceeds the disk budget {format_bytes(self.budgets['disk'])} "
                    f"({self.budget_sources['disk']}); {SLICE_FIX.format(world=tp.world)}",
                    "disk",
                    sliced,
                    self.budgets["disk"],
                )
            self.store = store = rank_store(store, tp.shard, self.workdir)
            cpu = self.device.type == "cpu"
            ledger.add("device", "working memory", cfg.working_bytes(placement.gpu_batch_size, self.max_len, cpu))
            self._plan(ledger)
            self.weights = WeightManager(
                store,
                placement.weights,
                self.device,
                self.pool,
                ledger,
                self.kernels,
                self.mover,
                gathered=self.gathered if tp.world == 1 else (),  # a rank's vocabulary slice is read whole
            )
            if cpu:
                ledger.fold_device_into_host()
            if sliced:  # the weights placed on disk are read from the slice; the rest of it is on disk too
                rest = sliced - ledger.items["disk"].get("weights", 0)
                ledger.add("disk", "the rest of this rank's slice of the store", max(rest, 0))
            ledger.check(self.budgets, offload_dir=root, sources=self.budget_sources)
            self._allocate()
            self.weights.load()
        except BaseException:
            self.close()
            raise
        self.ledger = ledger
        self._carried: Future[Any] | None = None
        # The vectors (norms, biases) of each group, computed in the compute dtype; matrices stay as stored.
        self._vectors = [frozenset(n for n in g.names if len(self.layout.shapes[n]) == 1) for g in self.layout.groups]
        log.info("placement: %s", placement.describe())

    # ---- what subclasses add ------------------------------------------------------------------------
    def _plan(self, ledger: Ledger) -> None:
        """Set up the runner's own parts (cache, scratch, activations, layers), recording their buffers on the
        ledger; allocate nothing yet."""

    def _allocate(self) -> None:
        """Allocate what ``_plan`` recorded, once the budgets are known to hold it."""

    def _bytes_read(self) -> int:
        """Bytes read from disk so far (weights, and whatever else the runner reads)."""
        return int(self.store.bytes_read)

    # ---- lifecycle -----------------------------------------------------------------------------------
    def close(self) -> None:
        self.pool.shutdown()
        self.mover.close()
        release_workdir(self.workdir)

    def __enter__(self: R) -> R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the walk ------------------------------------------------------------------------------------
    def walk(self, carry: bool = False) -> Iterator[tuple[Group, dict[str, Any]]]:
        """Every group of the stack in order with its weights by store name, the next group's load started
        before this one is handed out. With ``carry`` the last group starts loading the input group for the
        next walk (a decode step's embeddings load while the step before it computes its head)."""
        weights, groups = self.weights, self.layout.walked  # experts load as they are routed to
        fut = self._carried if self._carried is not None else weights.prefetch(0)
        self._carried = None
        for n, group in enumerate(groups):
            loaded = weights.wait(fut)
            if n + 1 < len(groups):
                fut = weights.prefetch(groups[n + 1].index)
            elif carry:
                self._carried = weights.prefetch(0)
            vectors = self._vectors[group.index]
            yield group, {n: t.to(self.dtype) if n in vectors else t for n, t in loaded.items()}

    def settle(self) -> None:
        """Wait for a load carried over to a walk that will not come."""
        if self._carried is not None:
            self._carried.result()
            self._carried = None

    # ---- measurement ---------------------------------------------------------------------------------
    def _start_stats(self, sequences: int) -> tuple[RunStats, int]:
        """Fresh stats for a run of ``sequences``, and the disk bytes read before it."""
        reset_peak_rss()
        reset_device_peak(self.device)
        stats = RunStats(sequences=sequences, planned=self.ledger.items, budgets=self.budgets)
        stats.budget_sources = self.budget_sources
        stats.planned_peak = self.base_rss + RUNTIME_RSS + self.ledger.total("host")
        return stats, self._bytes_read()

    def _finish_stats(self, stats: RunStats, read_before: int) -> RunStats:
        stats.disk_bytes_read = self._bytes_read() - read_before
        stats.peak_rss = peak_rss()
        stats.peak_device = device_peak(self.device)
        stats.base_rss = self.base_rss
        stats.direct_io = self.store.direct
        return stats
