"""The encoder runner: one bidirectional pass over the layer stack per block, for BERT-style models.

The same block schedule as generation's prefill, without a KV cache: for each group (input embeddings,
each layer, pooler) the weights are loaded once, from whichever tier holds them, and reused by every
micro-batch of the block while the next group loads on the I/O threads. Each layer's keys and values go to
one scratch buffer that the next layer overwrites. Sequences are right-padded (positions count from the
first token, as in Hugging Face) and padding keys are masked out of every query's attention.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from flexrun.errors import InputError
from flexrun.kernels.positions import bidirectional_mask
from flexrun.runtime.activations import ActivationStore
from flexrun.runtime.kvformat import PlainKV
from flexrun.runtime.layer import FusedLayer, LayerSpec, LayerWeights
from flexrun.runtime.stack import StackRunner, token_problem
from flexrun.runtime.stats import RunStats
from flexrun.runtime.tiers import Ledger

log = logging.getLogger(__name__)

#: How a sequence's token states become one vector; "none" keeps every token's state.
POOLINGS = ("pooler", "cls", "mean", "none")


class Encoder(StackRunner):
    """Encodes token sequences with a placement over device / host / disk. Use as a context manager."""

    workdir_prefix = "enc-"

    def _plan(self, ledger: Ledger) -> None:
        cfg, pl = self.cfg, self.placement
        gbs = pl.gpu_batch_size
        # Keys and values live one layer long, in the compute dtype: one scratch slot the next layer overwrites.
        world = self.tp.world  # a tensor-parallel rank computes its own heads
        self._scratch_kv = PlainKV(self.dtype, cfg.n_kv_head // world, cfg.head_dim)
        self._kv_elems = self.max_len * self._scratch_kv.row_elems(gbs)
        ledger.add("device", "k/v scratch", 2 * self.max_len * self._scratch_kv.row_bytes(gbs))
        self.acts = ActivationStore(
            cfg,
            pl.activations,
            self.device,
            self.pool,
            ledger,
            self.workdir,
            gbs * self.max_len,
            pl.num_gpu_batches,
            self.mover,
        )
        spec = LayerSpec.from_config(cfg)
        spec = dataclasses.replace(spec, n_head=spec.n_head // world, n_kv_head=spec.n_kv_head // world)
        self.layer = FusedLayer(spec, self.kernels, self._scratch_kv, self.tp.reduce)

    def _allocate(self) -> None:
        self._kv = torch.empty(2, self._kv_elems, dtype=self.dtype, device=self.device)

    # ---- compute of the non-layer groups ---------------------------------------------------------
    def _embed(self, w: dict[str, torch.Tensor], ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids, valid: (b, s) right-padded; padding holds ``fill_token_id``, which may differ from the pad id."""
        cfg = self.cfg
        b, s = ids.shape
        if cfg.positions_skip_pad:
            # As HF: a real token equal to the pad id takes the padding position too.
            real = ((ids != cfg.pad_token_id) & valid).long()
            positions = real.cumsum(1) * real - 1  # (b, s); pads read the row just before position 0
        else:
            positions = torch.arange(s, device=ids.device).expand(b, s)
        x = self.tp.embed(ids, w["embed_tokens"], cfg.vocab_size).to(self.dtype)  # (b, s, h)
        x = x + F.embedding(positions + cfg.position_offset, w["embed_positions"]).to(self.dtype)
        if "embed_token_types" in w:
            x = x + w["embed_token_types"][0].to(self.dtype)  # every token in segment 0, like HF without token_type_ids
        if "embed_ln_w" in w:
            x = self.kernels.norms[cfg.norm](x, w["embed_ln_w"], w.get("embed_ln_b"), cfg.layer_norm_eps)
        return x

    def _pool(self, w: dict[str, torch.Tensor], x: torch.Tensor, valid: torch.Tensor, pooling: str) -> torch.Tensor:
        """x: (b, s, h), valid: (b, s). Returns (b, h) float32, or (b, s, h) for "none"."""
        if pooling == "pooler":
            return torch.tanh(self.kernels.linear(x[:, 0], w["pooler_w"], w["pooler_b"])).float()
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
        n_layers = self.cfg.num_hidden_layers
        out: list[torch.Tensor] = []
        for group, w in self.walk():
            if group.kind == "input":
                for j, mb in enumerate(sizes):
                    self.acts.put(0, j, self._embed(w, mb.to(self.device), valids[j]))
                continue
            if group.kind == "output":
                out = [self._pool(w, self.acts.take(j), valids[j], pooling).cpu() for j in range(len(sizes))]
                continue
            lw = LayerWeights.from_slots({slot: w[name] for name, slot in group.slots})
            for j, mb in enumerate(sizes):
                b = mb.shape[0]
                k, v = (self._scratch_kv.slot(buf, s, b) for buf in self._kv)  # (s, b, kv_dim) each
                x = self.layer(lw, self.acts.take(j), self.layer.cached_core(k, v, 0, masks[j]))  # (b, s, h)
                self.acts.put(min(group.layer + 1, n_layers - 1), j, x)
        return out

    def _check(self, seqs: list[list[int]], pooling: str) -> None:
        if pooling not in POOLINGS:
            raise InputError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        if pooling == "pooler" and not self.cfg.pooler:
            raise InputError(f"{self.cfg.name} has no pooler layer; use cls or mean pooling")
        for n, seq in enumerate(seqs):
            problem = token_problem(seq, self.cfg.vocab_size)
            if problem:
                raise InputError(f"sequence {n}: {problem}")
            if len(seq) > self.max_len:
                raise InputError(f"sequence {n} has {len(seq)} tokens, over the {self.max_len} this run was sized for")

    def encode_blocks(
        self,
        seqs: list[list[int]],
        pooling: str,
        on_block: Callable[[list[int], list[torch.Tensor]], None],
        sort_window: int | None = None,
    ) -> RunStats:
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
        if self.tp.world > 1 and self.tp.rank == 0:  # the other tensor-parallel ranks encode the same (``follow``)
            self.tp.broadcast((seqs, pooling, sort_window))
        stats, read_before = self._start_stats(len(seqs))
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
            ids = torch.full((len(members), s), self.cfg.fill_token_id, dtype=torch.long)
            valid = torch.zeros((len(members), s), dtype=torch.bool)
            for r, n in enumerate(members):
                ids[r, : len(seqs[n])] = torch.tensor(seqs[n])
                valid[r, : len(seqs[n])] = True
            pooled = torch.cat(self._block(ids, valid, pooling))  # (n, h), or (n, s, h) for "none"
            # Each member's (h,), or the (len, h) of its real tokens.
            outputs = [pooled[r, : len(seqs[n])] for r, n in enumerate(members)] if pooling == "none" else [*pooled]
            stats.blocks += 1
            stats.prompt_tokens += ids.numel()
            handed = time.perf_counter()
            on_block(members, outputs)
            callback_seconds += time.perf_counter() - handed
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats.prefill_s = time.perf_counter() - start_time - callback_seconds
        stats.input_tokens = sum(len(seq) for seq in seqs)
        return self._finish_stats(stats, read_before)

    def follow(self) -> None:
        """On a tensor-parallel rank other than 0: encode what rank 0's ``encode_blocks`` calls hand out (the
        results are rank 0's to write), until rank 0 broadcasts None."""
        while (work := self.tp.broadcast()) is not None:
            seqs, pooling, sort_window = work
            self.encode_blocks(seqs, pooling, lambda members, outputs: None, sort_window)

    def encode(self, seqs: list[list[int]], pooling: str = "pooler") -> tuple[list[torch.Tensor], RunStats]:
        """Every sequence's result (see ``encode_blocks``) in input order, all held in memory, and the stats.
        For small jobs; a large one should stream with ``encode_blocks``."""
        results: list[torch.Tensor] = [torch.empty(0)] * len(seqs)

        def keep(members: list[int], outputs: list[torch.Tensor]) -> None:
            for n, out in zip(members, outputs, strict=True):
                results[n] = out.clone()  # its own storage, not a view into the block's

        stats = self.encode_blocks(seqs, pooling, keep)
        return results, stats
