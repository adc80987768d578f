"""Which rows and columns of each stored tensor a tensor-parallel rank holds (Megatron-style), and a rank's store.

The store holds every layer in the fused layer's canonical layout (QKV as [Q | K | V], BLOOM's and GPT-NeoX's
per-head interleaving already undone by their policies), so one rule slices every family:

- ``qkv_w`` / ``qkv_b``: the rank's query heads from the Q block and its key/value heads from the K and V
  blocks (grouped-query attention splits the KV heads); each block's slice is rows, contiguous.
- ``out_w`` and ``fc2_w``: row-parallel (the columns of an [out, in] weight); their partial products are
  summed across ranks (one all-reduce each, one per parallel-residual layer) and their biases, replicated,
  added once after the sum.
- ``fc1_w`` / ``gate_w`` and their biases: column-parallel (rows of the [out, in] weight).
- ``embed_tokens``, ``lm_head`` and ``lm_head_b``: vocab-parallel (rows; a tied head shares the shard).
- everything else (norms, positions, projections in and out of the stack) is replicated.

A rank's store is a real tensor store (same names, smaller shapes) whose index names the split; it is
written once, at load time from a store converted without a split, or by ``flexrun convert --tp N``.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from flexrun import diskio
from flexrun.config import OptConfig
from flexrun.errors import CheckpointError, ConfigError
from flexrun.quant.formats import Int4Weight, Int8Weight, QuantWeight, take_rows
from flexrun.weights.store import StoreWriter, TensorStore

log = logging.getLogger(__name__)

#: What to do when a rank's slice of a whole store does not fit the offload dir's disk budget.
SLICE_FIX = (
    "convert the model once with `flexrun convert --tp {world}` (each rank then reads its own store, nothing is "
    "written at load) or raise --disk-mem"
)
#: The index key a rank's store records its split under.
INDEX_KEY = "tensor_parallel"

Weight = torch.Tensor | QuantWeight
# The fused layer's slots this module knows how to split (or replicate).
_LAYER_SLOTS = frozenset(
    ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "qkv_w", "qkv_b", "out_w", "out_b")
    + ("fc1_w", "fc1_b", "gate_w", "gate_b", "fc2_w", "fc2_b")
)
# (start, stop) ranges along one dimension, concatenated in order.
Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` tensor-parallel ranks."""

    rank: int = 0
    world: int = 1

    def part(self, n: int) -> tuple[int, int]:
        """This rank's (start, stop) of ``n`` items split evenly (the caller checked divisibility)."""
        size = n // self.world
        return self.rank * size, (self.rank + 1) * size

    def vocab(self, n: int) -> tuple[int, int]:
        """This rank's (start, stop) of a vocabulary of ``n``: the first ``n % world`` ranks take one more."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)


def check_split(cfg: OptConfig, world: int) -> None:
    """Refuse a split the model's heads or MLP width cannot take evenly, naming the sizes."""
    if world < 1:
        raise ConfigError(f"--tp must be at least 1, got {world}")
    if world == 1:
        return
    for what, n in (
        ("attention heads", cfg.n_head),
        ("key/value heads", cfg.n_kv_head),
        ("MLP width", cfg.ffn_embed_dim),
    ):
        if n % world:
            raise ConfigError(
                f"{cfg.name} has {n} {what}, which {world} ranks cannot split evenly; use a --tp dividing {n}"
            )
    unknown = sorted(set(cfg.layer_shapes()) - _LAYER_SLOTS)
    if unknown:
        named = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise ConfigError(f"{cfg.name}: tensor parallelism does not split {named}; run it with one process")
    if cfg.vocab_size < world:
        raise ConfigError(f"{cfg.name}'s vocabulary of {cfg.vocab_size} is smaller than {world} ranks")


def row_ranges(cfg: OptConfig, slot: str, shard: Shard) -> Ranges | None:
    """The rows of the [out, in] weight (or the vector) ``slot`` this rank holds; None when not split by rows."""
    d = cfg.head_dim
    if slot in ("qkv_w", "qkv_b"):
        q0, q1 = shard.part(cfg.n_head)
        k0, k1 = shard.part(cfg.n_kv_head)
        q, kv = cfg.n_head * d, cfg.n_kv_head * d
        return ((q0 * d, q1 * d), (q + k0 * d, q + k1 * d), (q + kv + k0 * d, q + kv + k1 * d))
    if slot in ("fc1_w", "fc1_b", "gate_w", "gate_b"):
        return (shard.part(cfg.ffn_embed_dim),)
    if slot in ("embed_tokens", "lm_head", "lm_head_b"):
        return (shard.vocab(cfg.vocab_size),)
    return None


def col_range(cfg: OptConfig, slot: str, shard: Shard) -> tuple[int, int] | None:
    """The columns of the [out, in] weight ``slot`` this rank holds; None when not split by columns."""
    if slot == "out_w":
        h0, h1 = shard.part(cfg.n_head)
        return h0 * cfg.head_dim, h1 * cfg.head_dim
    if slot == "fc2_w":
        return shard.part(cfg.ffn_embed_dim)
    return None


def take(cfg: OptConfig, name: str, w: Weight, shard: Shard) -> Weight:
    """Tensor ``name`` (store name, e.g. ``layers.3.qkv_w``) cut to this rank's part."""
    if shard.world == 1:
        return w
    slot = name.rsplit(".", 1)[-1]
    rows = row_ranges(cfg, slot, shard)
    if rows is not None:
        if isinstance(w, torch.Tensor):
            return torch.cat([w[a:b] for a, b in rows])
        index = torch.cat([torch.arange(a, b) for a, b in rows])
        return take_rows(w, index)
    cols = col_range(cfg, slot, shard)
    if cols is not None:
        return w[:, cols[0] : cols[1]] if isinstance(w, torch.Tensor) else _take_cols(name, w, *cols)
    return w


def _take_cols(name: str, w: QuantWeight, start: int, stop: int) -> QuantWeight:
    """Columns [start, stop) of a compressed [N, K] weight: whole groups along K, so nothing is re-quantized (a
    weight with one scale per row, int8's default, keeps its scales: they hold for any of the row's columns)."""
    if isinstance(w, Int8Weight) and w.group_size == 0:
        return Int8Weight(w.q[:, start:stop], w.scale, 0)
    g = w.group_size
    if start % g or stop % g:
        raise ConfigError(
            f"{name}: the rank's columns {start}..{stop} cut the compression's groups of {g}; use a smaller "
            "--group-size or another --tp"
        )
    if isinstance(w, Int4Weight):
        return Int4Weight(
            w.q[:, start // 2 : stop // 2],
            w.scale[:, start // g : stop // g],
            w.low[:, start // g : stop // g],
            w.group_size,
        )
    assert isinstance(w, Int8Weight)
    return Int8Weight(w.q[:, start:stop], w.scale[:, start // g : stop // g], w.group_size)


def split_of(store: TensorStore) -> Shard | None:
    """The split a rank's store holds, or None for a whole model's store."""
    entry = store.index.get(INDEX_KEY)
    if not isinstance(entry, dict):
        return None
    try:
        return Shard(int(entry["rank"]), int(entry["world"]))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{store.path}: corrupted {INDEX_KEY} entry in index.json; convert again") from None


def write_shard(store: TensorStore, shard: Shard, out: str | Path) -> Path:
    """Write rank ``shard``'s store at ``out`` from a whole model's ``store``, tensor by tensor."""
    cfg = store.config
    check_split(cfg, shard.world)
    if split_of(store) is not None:
        raise CheckpointError(f"{store.path} holds one rank's part already; give the whole model's store")
    writer = StoreWriter(out, cfg, extra={INDEX_KEY: {"rank": shard.rank, "world": shard.world}})
    try:
        for name in store.tensors:
            part = take(cfg, name, store.read(name), shard)
            if isinstance(part, torch.Tensor):
                writer.add(name, part)
            else:
                writer.add_compressed(name, part)
        tokenizer = store.tokenizer_dir()
        if tokenizer is not None:
            shutil.copytree(tokenizer, writer.tmp / "tokenizer")
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def write_shards(store: TensorStore, world: int, out: str | Path) -> list[Path]:
    """``flexrun convert --tp N``: every rank's store, as ``out``/rank0 ... rank{N-1}."""
    return [write_shard(store, Shard(r, world), Path(out) / f"rank{r}") for r in range(world)]


def sliced_at_load(store: TensorStore, shard: Shard) -> bool:
    """Whether ``rank_store`` writes this rank's part of ``store`` at load time (a whole model's store, several
    ranks)."""
    return shard.world > 1 and split_of(store) is None


def slice_bytes(store: TensorStore, shard: Shard) -> int:
    """The disk bytes ``rank_store`` writes for this rank's part of a whole model's ``store``: each tensor's
    rows or columns the rank holds (a compressed weight's scales split with them), padded as the store pads
    its files, and the tokenizer."""
    cfg = store.config
    total = 0
    for name, meta in store.tensors.items():
        slot = name.rsplit(".", 1)[-1]
        part = 1.0
        rows, cols = row_ranges(cfg, slot, shard), col_range(cfg, slot, shard)
        if rows is not None and meta.shape:
            part = sum(b - a for a, b in rows) / meta.shape[0]
        elif cols is not None and len(meta.shape) == 2:
            part = (cols[1] - cols[0]) / meta.shape[1]
        total += diskio.padded(math.ceil(meta.nbytes * part))
    tokenizer = store.tokenizer_dir()
    if tokenizer is not None:
        total += sum(f.stat().st_size for f in tokenizer.rglob("*") if f.is_file())
    return total


def rank_store(store: TensorStore, shard: Shard, scratch: Path) -> TensorStore:
    """This rank's store: ``store`` itself when it holds this rank's part, its ``rankR`` sibling when it holds
    another rank's (``convert --tp``), ``store`` when there is one rank, else this rank's part of the whole
    store written under ``scratch`` (which the caller deletes after the run). Row slices are
    contiguous reads of the whole store; the column-parallel matrices are read whole once, here, so each
    step reads only this rank's bytes."""
    held = split_of(store)
    if held is not None:
        if held.world != shard.world:
            raise CheckpointError(
                f"{store.path} holds rank {held.rank} of a {held.world}-way split; run it with --tp {held.world}"
            )
        if held.rank == shard.rank:
            return store
        sibling = store.path.parent / f"rank{shard.rank}"  # ``convert --tp``'s layout: DIR/rank0, DIR/rank1, ...
        other = TensorStore(sibling) if (sibling / "index.json").is_file() else None
        if other is None or split_of(other) != shard:
            raise CheckpointError(
                f"rank {shard.rank} of {shard.world} needs its store at {sibling} (beside {store.path}); "
                f"`flexrun convert --tp {shard.world}` writes one per rank"
            )
        return other
    if shard.world == 1:
        return store
    out = scratch / f"tp{shard.world}-rank{shard.rank}"
    log.info("slicing %s for rank %d of %d into %s", store.path, shard.rank, shard.world, out)
    write_shard(store, shard, out)
    return TensorStore(out)
