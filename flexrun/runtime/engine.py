"""The offloading engine: the block schedule over (layer x micro-batch) for prefill and each decode step.

For each step the stack is walked group by group (``StackRunner.walk``: input embeddings, each layer,
output head). A group's weights are loaded once and reused by every micro-batch of the block, while the
next group's weights and the next micro-batch's KV cache load on I/O threads (``overlap``); with overlap
off the same loads run in line, in the same order, and give identical tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from flexrun.costmodel.equations import block_bytes
from flexrun.errors import InputError
from flexrun.kernels import positions as P
from flexrun.layout import GATHERED
from flexrun.runtime.activations import ActivationStore
from flexrun.runtime.kvcache import KV, KVCache
from flexrun.runtime.layer import AttentionCore, FusedLayer, LayerSpec, LayerWeights, Mlp, Rotary
from flexrun.runtime.moe import ExpertStream, MoeMlp
from flexrun.runtime.prefix import SharedBlock, SharedPrefill, plan_block
from flexrun.runtime.sampling import Sampler, SamplingParams
from flexrun.runtime.stack import StackRunner, token_problem
from flexrun.runtime.stats import RunStats, Timers
from flexrun.runtime.tiers import Ledger
from flexrun.runtime.weights import RowTable, lookup

log = logging.getLogger(__name__)

TokenCallback = Callable[[list[int], list[int]], None]


@dataclass
class _Block:
    """One block's inputs: left-padded ids and the validity of every position so far."""

    ids: torch.Tensor  # (n, s) prompt ids, left-padded
    valid: torch.Tensor  # (n, t) bool, grows by one column per decode step
    sizes: list[int]  # micro-batch sizes


class Engine(StackRunner):
    """Generates with a placement over device / host / disk. Use as a context manager (it owns temp files)."""

    gathered = GATHERED

    def _plan(self, ledger: Ledger) -> None:
        cfg, pl = self.cfg, self.placement
        gbs, ngb = pl.gpu_batch_size, pl.num_gpu_batches
        common = (self.device, self.pool, ledger, self.workdir)
        self.cache = KVCache(
            self.kv_format,
            cfg.num_hidden_layers,
            pl.cache,
            *common,
            max_len=self.max_len,
            max_batch=gbs,
            num_batches=ngb,
            windows=[cfg.attention_window(i) for i in range(cfg.num_hidden_layers)],
            mover=self.mover,
            host_attention=pl.cpu_cache_compute,
        )
        self.acts = ActivationStore(
            cfg, pl.activations, *common, max_tokens=gbs * self.max_len, num_batches=ngb, mover=self.mover
        )
        ledger.add("device", "block logits and rows", block_bytes(cfg, gbs * ngb))
        self.shared = SharedPrefill(self.kv_format, cfg, self.max_len, gbs, self.device, ledger)
        if pl.compress_cache:  # attention reads a micro-batch's K and V dequantized to float32
            ledger.add("device", "kv dequantized", 2 * 4 * gbs * self.max_len * cfg.kv_dim)
        # One layer per index: the attention scale and window may vary along the stack.
        self.layers = [
            FusedLayer(self._spec(i), self.kernels, self.kv_format, self.tp.reduce)
            for i in range(cfg.num_hidden_layers)
        ]
        self.windows = sorted({layer.spec.window for layer in self.layers})
        self.rope = P.Rope(cfg) if cfg.position == "rotary" else None

    def _spec(self, i: int) -> LayerSpec:
        """Layer ``i``'s spec; a tensor-parallel rank computes its own heads (its part of the MLP follows from
        its weights' shapes)."""
        spec, world = LayerSpec.from_config(self.cfg, i), self.tp.world
        return dataclasses.replace(spec, n_head=spec.n_head // world, n_kv_head=spec.n_kv_head // world)

    def _allocate(self) -> None:
        self.cache.allocate()
        # Mixture of experts: each layer's routed experts load after its router ran (runtime.moe).
        self.moe = MoeMlp(self.cfg, self.kernels, ExpertStream(self.weights, self.layout)) if self.cfg.moe else None

    def _mlp(self, layer: int, rows: torch.Tensor | None) -> Mlp | None:
        """Layer ``layer``'s mixture of experts over the real tokens ``rows`` (b, q) (None: all), or None."""
        return None if self.moe is None else self.moe.bind(layer, rows)

    def _bytes_read(self) -> int:
        return int(self.store.bytes_read + self.cache.bytes_read)

    # ---- compute of the non-layer groups ---------------------------------------------------------
    def _embed(self, w: dict[str, torch.Tensor], ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        table = w["embed_tokens"]
        if isinstance(table, RowTable):  # read by rows from disk (one rank only)
            x = table.lookup(ids).to(self.device, self.dtype)  # (b, q, word_embed_proj_dim)
        else:
            x = self.tp.embed(ids, table, self.cfg.vocab_size).to(self.dtype)  # (b, q, word_embed_proj_dim)
        if "embed_ln_w" in w:
            x = self.kernels.norms[self.cfg.norm](x, w["embed_ln_w"], w.get("embed_ln_b"), self.cfg.layer_norm_eps)
        if "project_in" in w:
            x = self.kernels.linear(x, w["project_in"], None)
        if "embed_positions" in w:
            # Padding (position -1) may fall before the table when there is no offset; it is never attended to.
            pos = (positions + self.cfg.position_offset).clamp(min=0)
            x = x + lookup(pos, w["embed_positions"]).to(self.dtype)
        return x

    def _head(self, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        x = x[:, -1]  # (b, h): only the last position's logits are needed
        if "final_ln_w" in w:
            x = self.kernels.norms[self.cfg.norm](x, w["final_ln_w"], w.get("final_ln_b"), self.cfg.layer_norm_eps)
        if "project_out" in w:
            x = self.kernels.linear(x, w["project_out"], None)
        head = w["lm_head"] if "lm_head" in w else w["embed_tokens"]
        return self.kernels.linear(x, head, w.get("lm_head_b")).float()  # (b, vocab): this rank's part of it

    def _attention_inputs(
        self, valid: torch.Tensor, positions: torch.Tensor, query_len: int
    ) -> tuple[dict[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """One micro-batch's masks by attention window, and the rotary angles of its new tokens.

        valid: (b, t) key validity; positions: (b, t) each key's position in its own sequence (counted
        from its first real token), so a left-padded prompt sees the positions it would see alone.
        """
        cfg = self.cfg
        masks = {win: P.additive_mask(valid, query_len, self.dtype, win) for win in self.windows}
        if cfg.position == "alibi":
            h0, h1 = self.tp.shard.part(cfg.n_head)  # a rank's heads keep their global slopes
            bias = P.alibi_bias(positions, cfg.n_head, self.dtype)[:, h0:h1]  # (b, nh, 1, t)
            masks = {win: m + bias for win, m in masks.items()}  # (b, nh, q, t)
        rotary = None
        if self.rope is not None:
            rotary = self.rope.cos_sin(positions[:, -query_len:], self.dtype)  # the new tokens' (b, q)
        return masks, rotary

    # ---- one step of the block schedule ----------------------------------------------------------
    def _step(self, block: _Block, ids: list[torch.Tensor], past: int) -> torch.Tensor:
        """``_step_in`` with autograd's bookkeeping off in every op (a quarter of a one-row step's small-op time);
        the logits come back as an ordinary tensor, which the caller may update in place."""
        with torch.inference_mode():
            logits = self._step_in(block, ids, past)
        return logits.clone()

    def _step_in(self, block: _Block, ids: list[torch.Tensor], past: int) -> torch.Tensor:
        """Run the whole stack for every micro-batch: ``ids[j]`` (b_j, q) new tokens after ``past`` cached.

        Prefill runs each layer once per micro-batch, its activations kept on their planned tiers. A decode
        step runs each layer once for the whole block, attending micro-batch by micro-batch over each one's
        cache: the block's hidden states are a few rows, and one matmul over all of them runs at a higher
        rate than one per micro-batch.
        """
        q = ids[0].shape[1]
        valid = block.valid.to(self.device)
        # Padding gets position -1 (only ever masked out); real tokens count from 0.
        all_positions = valid.long().cumsum(1) * valid - 1  # (n, t)
        positions = all_positions[:, past:]
        offsets = [sum(block.sizes[:j]) for j in range(len(block.sizes))]
        inputs = [
            self._attention_inputs(valid[o : o + b], all_positions[o : o + b], q)
            for o, b in zip(offsets, block.sizes, strict=True)
        ]
        n_layers, n_mb = self.cfg.num_hidden_layers, len(block.sizes)
        walk = _CacheWalk(self.cache, block.sizes, [layer.spec.window for layer in self.layers], past)
        merged = q == 1
        rotary = _cat_rotary([r for _, r in inputs]) if merged else None  # the block's, once a step
        x = torch.empty(0)  # the block's hidden states in decode
        logits = []
        # The next step's input group loads while this one computes its head.
        for group, w in self.walk(carry=True):
            if group.kind == "input":
                if merged:
                    x = self._embed(w, torch.cat(ids).to(self.device), positions)
                    continue
                for j, o in enumerate(offsets):
                    x = self._embed(w, ids[j].to(self.device), positions[o : o + block.sizes[j]])
                    self.acts.put(0, j, x)
                continue
            if group.kind == "output":
                logits = [self._head(w, x)] if merged else [self._head(w, self.acts.take(j)) for j in range(n_mb)]
                continue
            i = group.layer
            lw = LayerWeights.from_slots({slot: w[name] for name, slot in group.slots})
            layer = self.layers[i]
            if merged:
                x = layer(lw, x, self._block_core(i, layer, walk, offsets, inputs, past), rotary, self._mlp(i, None))
                continue
            for j in range(n_mb):
                (k, v), turn = walk.next()
                masks, rotary = inputs[j]
                core = self._cached_core(i, layer, (k, v), past, masks[layer.spec.window])
                rows = valid[offsets[j] : offsets[j] + block.sizes[j], past:]  # padding routes nowhere
                x = layer(lw, self.acts.take(j), core, rotary, self._mlp(i, rows))
                self.cache.store(i, j, (k, v), turn, past, past + q)
                self.acts.put(min(i + 1, n_layers - 1), j, x)
        return torch.cat(logits).cpu()

    def _block_core(
        self,
        i: int,
        layer: FusedLayer,
        walk: _CacheWalk,
        offsets: list[int],
        inputs: list[tuple[dict[int, torch.Tensor], Rotary | None]],
        past: int,
    ) -> AttentionCore:
        """Layer ``i``'s attention over the whole block: each micro-batch's rows against its own cache."""

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            outs = []
            for j, (o, b) in enumerate(zip(offsets, walk.sizes, strict=True)):
                kv, turn = walk.next()
                rows = slice(o, o + b)
                mask = inputs[j][0][layer.spec.window]
                outs.append(self._cached_core(i, layer, kv, past, mask)(q[rows], k[rows], v[rows]))
                self.cache.store(i, j, kv, turn, past, past + k.shape[1])
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        return core

    def _cached_core(self, i: int, layer: FusedLayer, kv: KV, past: int, mask: torch.Tensor) -> AttentionCore:
        """Layer ``i``'s core over one micro-batch's cache; with host-side attention, computed on the host by
        the host's kernel where the cache was fetched to the host (``KVCache.attends_on_host``)."""
        host = self.host_kernels if self.cache.attends_on_host(i, past) else None
        return layer.cached_core(*kv, past, mask, host)

    # ---- generation --------------------------------------------------------------------------------
    def _check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        for n, p in enumerate(prompts):
            problem = token_problem(p, self.cfg.vocab_size)
            if problem:
                raise InputError(f"prompt {n}: {problem}")
            if len(p) + max_new_tokens > self.max_len:
                raise InputError(
                    f"prompt {n} has {len(p)} tokens; with {max_new_tokens} new tokens that exceeds the "
                    f"{self.max_len} positions this run was sized for"
                )

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        seq_ids: list[int] | None = None,
        on_step: TokenCallback | None = None,
        stop_check: Callable[[int, list[int]], bool] | None = None,
        return_logits: bool = False,
        share_prefix: bool = True,
    ) -> tuple[list[list[int]], RunStats, list[torch.Tensor]]:
        """Generate for every prompt, one block (placement.block_size sequences) at a time.

        Returns the new tokens of each prompt (ending at EOS or a stop), the measured stats and, when asked,
        the logits of every step per block. ``seq_ids`` seed each sequence's sampler (default: index). With
        ``share_prefix`` the prompts of a block that share a prefix prefill it once (``runtime.prefix``). Under
        tensor parallelism rank 0 is called and hands the same work to the other ranks (``follow``).
        """
        self._check_prompts(prompts, params.max_new_tokens)
        if self.tp.world > 1 and self.tp.rank == 0:
            self.tp.broadcast((prompts, params, seq_ids, return_logits, share_prefix))
        stats, read_before = self._start_stats(len(prompts))
        comm_before = (self.tp.comm_s, self.tp.comm_calls)
        timers = Timers(self.device)
        block_size = self.placement.block_size
        # Similar lengths together waste less padding; results go back in input order.
        order = sorted(range(len(prompts)), key=lambda n: -len(prompts[n]))
        ids = list(range(len(prompts))) if seq_ids is None else seq_ids
        outputs: list[list[int]] = [[] for _ in prompts]
        all_logits: list[torch.Tensor] = []
        for start in range(0, len(order), block_size):
            members = order[start : start + block_size]
            shared = plan_block([prompts[n] for n in members], self.cfg, self.max_len) if share_prefix else None
            members = [members[k] for k in shared.order] if shared else members
            new, logits = self._generate_block(
                [prompts[n] for n in members],
                params,
                [ids[n] for n in members],
                timers,
                stats,
                on_step,
                stop_check,
                members,
                return_logits,
                shared,
            )
            if shared:  # each step's logits back in the block's order
                logits = [step[torch.tensor(shared.order).argsort()] for step in logits]
            for n, toks in zip(members, new, strict=True):
                outputs[n] = toks
            all_logits.extend(logits)
            stats.blocks += 1
        self.cache.flush()
        self.settle()  # the input group loaded for a step that did not come
        stats.prefill_s = timers.seconds["prefill"]
        stats.decode_s = timers.seconds["decode"]
        stats.decode_cpu_s = timers.cpu_seconds["decode"]
        stats.collective_s = self.tp.comm_s - comm_before[0]
        stats.collectives = self.tp.comm_calls - comm_before[1]
        return outputs, self._finish_stats(stats, read_before), all_logits

    def follow(self) -> None:
        """On a tensor-parallel rank other than 0: run the work rank 0's ``generate`` calls hand out, until
        rank 0 broadcasts None (no more work)."""
        while (work := self.tp.broadcast()) is not None:
            prompts, params, seq_ids, return_logits, share_prefix = work
            self.generate(prompts, params, seq_ids, return_logits=return_logits, share_prefix=share_prefix)

    def _generate_block(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        seq_ids: list[int],
        timers: Timers,
        stats: RunStats,
        on_step: TokenCallback | None,
        stop_check: Callable[[int, list[int]], bool] | None,
        members: list[int],
        return_logits: bool,
        shared: SharedBlock | None = None,
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        n, s = len(prompts), max(len(p) for p in prompts)
        gbs = self.placement.gpu_batch_size
        sizes = [min(gbs, n - o) for o in range(0, n, gbs)]
        # Padding and a finished sequence's next input feed an id the embedding holds (never attended to).
        pad = self.cfg.fill_token_id
        stop_ids = self.cfg.stop_token_ids
        ids = torch.full((n, s), pad, dtype=torch.long)
        valid = torch.zeros((n, s), dtype=torch.bool)
        for r, p in enumerate(prompts):
            ids[r, s - len(p) :] = torch.tensor(p)
            valid[r, s - len(p) :] = True
        block = _Block(ids, valid, sizes)
        sampler = Sampler(params, seq_ids)
        # The repetition penalty sees each sequence's own tokens only: padding repeats its first token, so
        # a sequence samples the same whatever it is batched with.
        history = torch.where(valid, ids, torch.tensor([p[0] for p in prompts])[:, None])  # (n, s)
        out: list[list[int]] = [[] for _ in range(n)]
        finished = torch.zeros(n, dtype=torch.bool)
        logits_log: list[torch.Tensor] = []
        with timers.time("prefill"):
            if shared:
                logits = self.shared.prefill(self, shared, list(map(len, prompts)), sizes)
            else:
                logits = self._step(block, list(ids.split(sizes)), past=0)
        stats.prompt_tokens += n * s
        stats.input_tokens += sum(map(len, prompts))
        stats.prefilled_tokens += shared.tokens if shared else sum(map(len, prompts))
        moe_before = (self.moe.stream.read, self.moe.stream.loads) if self.moe else (0, 0)
        read_before = self._bytes_read()
        for t in range(params.max_new_tokens):
            if return_logits:
                logits_log.append(self.tp.gather_vocab(logits, self.cfg.vocab_size))
            nxt = self.tp.choose(
                sampler, logits, history, self.cfg.vocab_size, params.greedy, params.repetition_penalty
            )
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            if not stats.first_token_s:  # the run's first token: what a person waits for before any output
                stats.first_token_s = timers.elapsed()
            stats.generated_tokens += n
            for r in range(n):
                if not finished[r]:
                    out[r].append(int(nxt[r]))
                    if (params.stop_at_eos and int(nxt[r]) in stop_ids) or (
                        stop_check is not None and stop_check(members[r], out[r])
                    ):
                        finished[r] = True
            if self.tp.world > 1 and params.stop:  # stop strings are found on rank 0, which has the tokenizer
                finished = torch.tensor(self.tp.broadcast(finished.tolist()))
            if on_step is not None:
                on_step(members, [o[-1] if o else pad for o in out])
            if bool(finished.all()) or t == params.max_new_tokens - 1:
                break
            history = torch.cat([history, nxt[:, None]], dim=1)
            block.valid = torch.cat([block.valid, torch.ones((n, 1), dtype=torch.bool)], dim=1)
            with timers.time("decode"):
                logits = self._step(block, list(nxt[:, None].split(sizes)), past=s + t)
            stats.decode_steps += 1
        stats.decode_bytes_read += self._bytes_read() - read_before
        if self.moe is not None:  # experts read per layer per decode step
            stats.experts_read += self.moe.stream.read - moe_before[0]
            stats.expert_loads += self.moe.stream.loads - moe_before[1]
        return out, logits_log


class _CacheWalk:
    """The block's KV cache in schedule order (layer-major, micro-batch minor), the fetches of the next ones
    (as many as the cache has staging turns to spare: ``KVCache.depth``) started while one is in use."""

    def __init__(self, cache: KVCache, sizes: list[int], windows: list[int], past: int) -> None:
        """``windows``: each layer's attention window (0: global), so a windowed layer reads only its window."""
        self.cache, self.sizes, self.past, self.windows = cache, sizes, past, windows
        self._order = [(i, j) for i in range(len(windows)) for j in range(len(sizes))]
        self._started = 0
        self._ahead: deque[Future[tuple[KV, int]]] = deque()
        self._start()

    def _start(self) -> None:
        """Start fetches until ``depth - 1`` are in flight: with the one in use, they take every staging turn."""
        while self._started < len(self._order) and len(self._ahead) < self.cache.depth - 1:
            i, j = self._order[self._started]
            self._ahead.append(self.cache.fetch(i, j, self.sizes[j], self.past, self.windows[i]))
            self._started += 1

    def next(self) -> tuple[KV, int]:
        """The next micro-batch's buffers (k, v) and staging turn, for ``KVCache.store`` (called before the
        next ``next``: the fetch started here may reuse the turn of the one before)."""
        got = self._ahead.popleft().result()
        self._start()
        return got


def _cat_rotary(parts: list[Rotary | None]) -> Rotary | None:
    """The block's rotary angles from its micro-batches'."""
    if parts[0] is None:
        return None
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts if p is not None]), torch.cat([p[1] for p in parts if p is not None])
