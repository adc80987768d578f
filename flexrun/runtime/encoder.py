"""The encoder runner: one bidirectional pass over the layer stack per block, for BERT-style models.

The same block schedule as generation's prefill, without a KV cache: for each group (input embeddings,
each layer, pooler) the weights are loaded once, from whichever tier holds them, and reused by every
micro-batch of the block while the next group loads on the I/O threads. Each layer's keys and values go to
one scratch buffer that the next layer overwrites. Sequences are right-padded (positions count from the
first token, as in Hugging Face) and padding keys are masked out of every query's attention.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from flexrun.errors import InputError
from flexrun.kernels import reference as K
from flexrun.paths import offload_root
from flexrun.placement import Placement
from flexrun.runtime.activations import ActivationStore
from flexrun.runtime.iopool import IOPool
from flexrun.runtime.layer import FusedLayer, LayerSpec, LayerWeights
from flexrun.runtime.malloc import release_large_frees
from flexrun.runtime.precision import vectors_in, with_compute_dtype
from flexrun.runtime.stats import peak_rss, reset_peak_rss
from flexrun.runtime.tiers import Budgets, Ledger, compute_device, make_workdir
from flexrun.runtime.weights import WeightManager
from flexrun.weights.store import TORCH_DTYPES, TensorStore

log = logging.getLogger(__name__)

#: How a sequence's token states become one vector; "none" keeps every token's state.
POOLINGS = ("pooler", "cls", "mean", "none")


@dataclass
class EncodeStats:
    """What one ``encode`` measured."""

    sequences: int = 0
    blocks: int = 0
    tokens: int = 0  # real tokens
    padded_tokens: int = 0  # tokens computed, padding included
    seconds: float = 0.0
    disk_bytes_read: int = 0
    peak_rss: int = 0
    planned: dict[str, dict[str, int]] = field(default_factory=dict)
    direct_io: bool | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def bidirectional_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """valid: bool (b, s). Returns an additive (b, 1, s, s) mask letting every query see every real key."""
    b, s = valid.shape
    mask = torch.zeros(b, 1, s, s, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~valid.view(b, 1, 1, s), torch.finfo(dtype).min)


class Encoder:
    """Encodes token sequences with a placement over device / host / disk. Use as a context manager."""

    def __init__(
        self,
        store: TensorStore,
        placement: Placement,
        max_seq_len: int,
        budgets: Budgets | None = None,
        offload_dir: str | Path | None = None,
        device: torch.device | None = None,
        compute_dtype: str | None = None,
    ) -> None:
        """``compute_dtype``: as for ``Engine``."""
        self.store = store
        release_large_frees()
        self.device = device or compute_device()
        self.cfg = cfg = with_compute_dtype(store.config, compute_dtype, self.device)
        self.placement = placement
        if max_seq_len > cfg.max_seq_len:
            raise InputError(f"{max_seq_len} tokens exceed the model's {cfg.max_seq_len} positions")
        self.max_len = max_seq_len
        self.dtype = TORCH_DTYPES[cfg.run_dtype]
        root = offload_root(offload_dir)
        self.workdir = make_workdir(root, "enc-")
        self.pool = IOPool(placement.overlap)
        gbs, ngb = placement.gpu_batch_size, placement.num_gpu_batches
        ledger = Ledger()
        try:
            kv_elems = max_seq_len * gbs * cfg.kv_dim
            ledger.add("device", "k/v scratch", 2 * kv_elems * cfg.run_dtype_bytes)
            act = gbs * max_seq_len * (6 * cfg.hidden_size + 2 * cfg.ffn_embed_dim) * cfg.run_dtype_bytes
            ledger.add("device", "working memory", act + gbs * cfg.n_head * max_seq_len * max_seq_len * 4)
            self.acts = ActivationStore(
                cfg, placement.activations, self.device, self.pool, ledger, self.workdir, gbs * max_seq_len, ngb
            )
            self.weights = WeightManager(store, placement.weights, self.device, self.pool, ledger)
            if self.device.type == "cpu":
                ledger.fold_device_into_host()
            self.budgets = (budgets or Budgets()).resolved(root, self.device.type == "cuda")
            ledger.check(self.budgets)
            self.weights.load()
            self._kv = torch.empty(2, kv_elems, dtype=self.dtype, device=self.device)
        except BaseException:
            self.close()
            raise
        self.ledger = ledger
        self.layer = FusedLayer(LayerSpec.from_config(cfg))
        self.slots = [[(name, name.rsplit(".", 1)[-1]) for name in group] for group in self.weights.groups]
        log.info("placement: %s", placement.describe())

    def close(self) -> None:
        self.pool.shutdown()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- compute of the non-layer groups ---------------------------------------------------------
    def _embed(self, w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, s = ids.shape
        if cfg.positions_skip_pad:
            real = (ids != cfg.pad_token_id).long()
            positions = real.cumsum(1) * real - 1  # (b, s); pads read the row just before position 0
        else:
            positions = torch.arange(s, device=ids.device).expand(b, s)
        x = F.embedding(ids, w["embed_tokens"]).to(self.dtype)  # (b, s, h)
        x = x + F.embedding(positions + cfg.position_offset, w["embed_positions"]).to(self.dtype)
        if "embed_token_types" in w:
            x = x + w["embed_token_types"][0].to(self.dtype)  # every token in segment 0, like HF without token_type_ids
        if "embed_ln_w" in w:
            x = K.NORMS[cfg.norm](x, w["embed_ln_w"], w.get("embed_ln_b"), cfg.layer_norm_eps)
        return x

    @staticmethod
    def _pool(w: dict[str, torch.Tensor], x: torch.Tensor, valid: torch.Tensor, pooling: str) -> torch.Tensor:
        """x: (b, s, h), valid: (b, s). Returns (b, h) float32, or (b, s, h) for "none"."""
        if pooling == "pooler":
            return torch.tanh(K.linear(x[:, 0], w["pooler_w"], w["pooler_b"])).float()
        if pooling == "cls":
            return x[:, 0].float()
        if pooling == "mean":
            keep = valid.unsqueeze(-1).to(torch.float32)  # (b, s, 1)
            return (x.float() * keep).sum(1) / keep.sum(1)
        return x.float()

    # ---- the block schedule ------------------------------------------------------------------------
    def _block(self, ids: torch.Tensor, valid: torch.Tensor, pooling: str) -> list[torch.Tensor]:
        """ids, valid: (n, s) right-padded. Returns the block's pooled outputs per micro-batch."""
        s = ids.shape[1]
        sizes = ids.split(self.placement.gpu_batch_size)
        valids = [v.to(self.device) for v in valid.split(self.placement.gpu_batch_size)]
        masks = [bidirectional_mask(v, self.dtype) for v in valids]
        n_groups, n_layers = len(self.slots), self.cfg.num_hidden_layers
        weights = self.weights
        fut = weights.prefetch(0)
        out: list[torch.Tensor] = []
        for g in range(n_groups):
            w = vectors_in(weights.wait(fut), self.dtype)
            if g + 1 < n_groups:
                fut = weights.prefetch(g + 1)
            if g == 0:
                for j, mb in enumerate(sizes):
                    self.acts.put(0, j, self._embed(w, mb.to(self.device)))
                continue
            if g == n_groups - 1:
                out = [self._pool(w, self.acts.take(j), valids[j], pooling).cpu() for j in range(len(sizes))]
                continue
            lw = LayerWeights.from_slots({slot: w[name] for name, slot in self.slots[g]})
            for j, mb in enumerate(sizes):
                b = mb.shape[0]
                k = self._kv[0, : s * b * self.cfg.kv_dim].view(s, b, self.cfg.kv_dim)
                v = self._kv[1, : s * b * self.cfg.kv_dim].view(s, b, self.cfg.kv_dim)
                x = self.layer(lw, self.acts.take(j), self.layer.cached_core(k, v, 0, masks[j]))  # (b, s, h)
                self.acts.put(min(g, n_layers - 1), j, x)
        return out

    def _check(self, seqs: list[list[int]], pooling: str) -> None:
        if pooling not in POOLINGS:
            raise InputError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        if pooling == "pooler" and not self.cfg.pooler:
            raise InputError(f"{self.cfg.name} has no pooler layer; use cls or mean pooling")
        for n, seq in enumerate(seqs):
            if not seq:
                raise InputError(f"sequence {n} is empty")
            if min(seq) < 0 or max(seq) >= self.cfg.vocab_size:
                raise InputError(f"sequence {n} has token ids outside the vocabulary (0..{self.cfg.vocab_size - 1})")
            if len(seq) > self.max_len:
                raise InputError(f"sequence {n} has {len(seq)} tokens, over the {self.max_len} this run was sized for")

    def encode_blocks(
        self,
        seqs: list[list[int]],
        pooling: str,
        on_block: Callable[[list[int], list[torch.Tensor]], None],
        sort_window: int | None = None,
    ) -> EncodeStats:
        """Encode every sequence, one block (placement.block_size sequences) at a time, handing each block's
        results to ``on_block(members, outputs)`` as soon as the block is done, so nothing accumulates here.

        ``members`` are the block's input positions, ``outputs`` each member's float32 vector (h,) for
        "pooler" (tanh(dense) of the first token), "cls" (the first token's last hidden state) or "mean"
        (over its real tokens), or its last hidden state (len, h) for "none". Blocks hold sequences of
        similar length, to waste little padding: the longest first within each window of ``sort_window``
        consecutive input sequences (rounded up to whole blocks; None: the whole job), so a caller that
        writes results in input order holds at most one window of them. The time spent in ``on_block``
        is not counted in the stats' seconds.
        """
        self._check(seqs, pooling)
        stats = EncodeStats(sequences=len(seqs), planned=self.ledger.items)
        reset_peak_rss()
        read_before = self.store.bytes_read
        bs = self.placement.block_size
        window = len(seqs) if sort_window is None else -(-max(sort_window, 1) // bs) * bs
        window = max(window, 1)
        order = [
            n
            for w in range(0, len(seqs), window)
            for n in sorted(range(w, min(w + window, len(seqs))), key=lambda n: -len(seqs[n]))
        ]
        start_time = time.perf_counter()
        callback_seconds = 0.0
        for start in range(0, len(order), bs):
            members = order[start : start + bs]
            s = max(len(seqs[n]) for n in members)
            ids = torch.full((len(members), s), self.cfg.pad_token_id, dtype=torch.long)
            valid = torch.zeros((len(members), s), dtype=torch.bool)
            for r, n in enumerate(members):
                ids[r, : len(seqs[n])] = torch.tensor(seqs[n])
                valid[r, : len(seqs[n])] = True
            pooled = torch.cat(self._block(ids, valid, pooling))  # (n, h), or (n, s, h) for "none"
            # Each member's (h,), or the (len, h) of its real tokens.
            outputs = [pooled[r, : len(seqs[n])] for r, n in enumerate(members)] if pooling == "none" else [*pooled]
            stats.blocks += 1
            stats.padded_tokens += ids.numel()
            handed = time.perf_counter()
            on_block(members, outputs)
            callback_seconds += time.perf_counter() - handed
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats.seconds = time.perf_counter() - start_time - callback_seconds
        stats.tokens = sum(len(seq) for seq in seqs)
        stats.disk_bytes_read = self.store.bytes_read - read_before
        stats.peak_rss = peak_rss()
        stats.direct_io = self.store.direct
        return stats

    def encode(self, seqs: list[list[int]], pooling: str = "pooler") -> tuple[list[torch.Tensor], EncodeStats]:
        """Every sequence's result (see ``encode_blocks``) in input order, all held in memory, and the stats.
        For small jobs; a large one should stream with ``encode_blocks``."""
        results: list[torch.Tensor] = [torch.empty(0)] * len(seqs)

        def keep(members: list[int], outputs: list[torch.Tensor]) -> None:
            for n, out in zip(members, outputs, strict=True):
                results[n] = out.clone()  # its own storage, not a view into the block's

        stats = self.encode_blocks(seqs, pooling, keep)
        return results, stats
