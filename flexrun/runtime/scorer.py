"""The scorer: log-likelihoods of continuations, one causal pass over the layer stack per block of rows.

The same block schedule as generation's prefill (each group's weights loaded once per block and reused by
every micro-batch, the next group loading meanwhile), with no KV cache: a pass ends at the last layer, so
each layer's keys and values go to one scratch buffer the next layer overwrites, whatever the placement
says of the cache. Rows are packed (``runtime.packing``): a prefix several requests share is computed
once and seen by each of their continuations through the tree mask. The LM head runs only at the rows'
scored positions, a chunk at a time, and its log-softmax in float32: [batch, seq, vocab] logits never exist.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexrun.costmodel.equations import SCORED_ROWS
from flexrun.errors import InputError
from flexrun.kernels import positions as P
from flexrun.runtime.activations import ActivationStore
from flexrun.runtime.engine import Engine
from flexrun.runtime.kvformat import PlainKV
from flexrun.runtime.layer import FusedLayer, LayerSpec, LayerWeights
from flexrun.runtime.moe import ExpertStream, MoeMlp
from flexrun.runtime.packing import Row, ScoreRequest, can_share, pack, row_tensors, tree_mask
from flexrun.runtime.stack import token_problem
from flexrun.runtime.stats import RunStats
from flexrun.runtime.tiers import Ledger

#: Scored positions per LM-head matmul: large enough that the head's weight is read for many rows at once,
#: small enough that the (chunk, vocab) float32 logits stay a modest buffer (the planner counts them).
HEAD_CHUNK = SCORED_ROWS


@dataclass
class Scored:
    """One request's result: the continuation's summed log-probability, whether greedy decoding would
    produce it, and each of its tokens' log-probabilities."""

    logprob: float
    is_greedy: bool
    token_logprobs: list[float]


class Scorer(Engine):
    """Scores continuations with a placement over device / host / disk. Use as a context manager."""

    workdir_prefix = "score-"

    def _plan(self, ledger: Ledger) -> None:
        cfg, pl = self.cfg, self.placement
        gbs, ngb = pl.gpu_batch_size, pl.num_gpu_batches
        self._scratch_kv = PlainKV(self.dtype, cfg.n_kv_head, cfg.head_dim)
        self._kv_elems = self.max_len * self._scratch_kv.row_elems(gbs)
        ledger.add("device", "k/v scratch", 2 * self.max_len * self._scratch_kv.row_bytes(gbs))
        ledger.add("device", "scored logits", 2 * HEAD_CHUNK * cfg.vocab_size * 4)  # logits and log-softmax
        common = (self.device, self.pool, ledger, self.workdir)
        self.acts = ActivationStore(
            cfg, pl.activations, *common, max_tokens=gbs * self.max_len, num_batches=ngb, mover=self.mover
        )
        self.layers = [
            FusedLayer(LayerSpec.from_config(cfg, i), self.kernels, self._scratch_kv)
            for i in range(cfg.num_hidden_layers)
        ]
        self.windows = sorted({layer.spec.window for layer in self.layers})
        self.rope = P.Rope(cfg) if cfg.position == "rotary" else None

    def _allocate(self) -> None:
        self.head_positions = 0  # positions the LM head ran at, each once however many tokens it scored
        self._kv = torch.empty(2, self._kv_elems, dtype=self.dtype, device=self.device)
        # Mixture of experts: each layer's routed experts load after its router ran (runtime.moe).
        self.moe = MoeMlp(self.cfg, self.kernels, ExpertStream(self.weights, self.layout)) if self.cfg.moe else None

    def _bytes_read(self) -> int:
        return int(self.store.bytes_read)

    # ---- the LM head at the scored positions ---------------------------------------------------------
    def _score_rows(
        self, w: dict[str, torch.Tensor], x: torch.Tensor, rows: list[Row], pad: list[int]
    ) -> list[list[Scored]]:
        """x: (b, s, h) the last layer's states of ``rows``, each left-padded by ``pad`` tokens. Returns
        each row's members' results."""
        where = [(r, pad[r] + i) for r, row in enumerate(rows) for scored in row.scored for i in scored]
        targets = torch.tensor([t for row in rows for tg in row.targets for t in tg], device=x.device)
        # Continuations after one context are all scored first from its last token: the head runs once a position.
        at, which = torch.unique(torch.tensor(where, device=x.device), dim=0, return_inverse=True)  # (u, 2), (n,)
        self.head_positions += len(at)
        logprobs = torch.empty(len(where), device=x.device)
        greedy = torch.empty(len(where), dtype=torch.bool, device=x.device)
        for start in range(0, len(at), HEAD_CHUNK):
            part = at[start : start + HEAD_CHUNK]
            h = x[part[:, 0], part[:, 1]]  # (c, h)
            if "final_ln_w" in w:
                h = self.kernels.norms[self.cfg.norm](h, w["final_ln_w"], w.get("final_ln_b"), self.cfg.layer_norm_eps)
            if "project_out" in w:
                h = self.kernels.linear(h, w["project_out"], None)
            head = w["lm_head"] if "lm_head" in w else w["embed_tokens"]
            logits = self.kernels.linear(h, head, w.get("lm_head_b")).float()  # (c, vocab)
            sel = ((which >= start) & (which < start + len(part))).nonzero()[:, 0]  # the scored tokens read here
            local, tgt = which[sel] - start, targets[sel]
            greedy[sel] = logits.argmax(-1)[local] == tgt
            logprobs[sel] = torch.log_softmax(logits, dim=-1)[local, tgt]
        lp, gr = logprobs.cpu().tolist(), greedy.cpu().tolist()
        out: list[list[Scored]] = []
        k = 0
        for row in rows:
            results = []
            for tg in row.targets:
                tok, ok = lp[k : k + len(tg)], gr[k : k + len(tg)]
                results.append(Scored(float(sum(tok)), all(ok), tok))
                k += len(tg)
            out.append(results)
        return out

    # ---- the block schedule ----------------------------------------------------------------------------
    def _block(self, rows: list[Row]) -> list[list[Scored]]:
        """One block of rows through the stack; each row's members' results."""
        ids, positions, ends, pad = row_tensors(rows, self.cfg.fill_token_id)
        n, s = ids.shape
        gbs = self.placement.gpu_batch_size
        bounds = [(o, min(o + gbs, n)) for o in range(0, n, gbs)]
        pos = [positions[a:b].to(self.device) for a, b in bounds]
        inputs = []
        for j, (a, b) in enumerate(bounds):
            end = ends[a:b].to(self.device)
            masks = {win: tree_mask(pos[j], end, self.dtype, win) for win in self.windows}
            if self.cfg.position == "alibi":
                bias = P.alibi_bias(pos[j], self.cfg.n_head, self.dtype)  # (b, nh, 1, s)
                masks = {win: m + bias for win, m in masks.items()}
            rotary = self.rope.cos_sin(pos[j], self.dtype) if self.rope is not None else None
            inputs.append((masks, rotary))
        n_layers = self.cfg.num_hidden_layers
        out: list[list[Scored]] = []
        for group, w in self.walk():
            if group.kind == "input":
                for j, (a, b) in enumerate(bounds):
                    self.acts.put(0, j, self._embed(w, ids[a:b].to(self.device), pos[j]))
                continue
            if group.kind == "output":
                for j, (a, b) in enumerate(bounds):
                    out += self._score_rows(w, self.acts.take(j), rows[a:b], pad[a:b])
                continue
            i = group.layer
            lw = LayerWeights.from_slots({slot: w[name] for name, slot in group.slots})
            layer = self.layers[i]
            for j, (a, b) in enumerate(bounds):
                k, v = (self._scratch_kv.slot(buf, s, b - a) for buf in self._kv)  # (s, b, kv_dim) each
                masks, rotary = inputs[j]
                core = layer.cached_core(k, v, 0, masks[layer.spec.window])
                x = layer(lw, self.acts.take(j), core, rotary, self._mlp(i, pos[j] >= 0))  # padding routes nowhere
                self.acts.put(min(i + 1, n_layers - 1), j, x)
        return out

    def check(self, requests: list[ScoreRequest]) -> None:
        """Refuse a request the run cannot score: no context or continuation, a token outside the vocabulary,
        more tokens than the run was sized for."""
        for n, req in enumerate(requests):
            for part, ids in (("context", req.context), ("continuation", req.continuation)):
                problem = token_problem(list(ids), self.cfg.vocab_size)
                if problem:
                    raise InputError(f"request {n}: {part}: {problem}")
            if len(req) > self.max_len:
                raise InputError(f"request {n} reads {len(req)} tokens, over the {self.max_len} this run was sized for")

    def score_rows(
        self, requests: list[ScoreRequest], rows: list[Row], on_block: Callable[[list[int], list[Scored]], None]
    ) -> RunStats:
        """Score the members of ``rows`` (packed from ``requests``), one block (placement.block_size rows)
        at a time in the order given, handing each block's results to ``on_block(members, results)`` as soon
        as it is done. The stats count the tokens prefilled (``input_tokens``: each shared prefix once) and
        the time spent outside ``on_block``."""
        self.check([requests[m] for row in rows for m in row.members])
        stats, read_before = self._start_stats(sum(len(row.members) for row in rows))
        started, handed_s = time.perf_counter(), 0.0
        bs = self.placement.block_size
        for start in range(0, len(rows), bs):
            block = rows[start : start + bs]
            results = self._block(block)
            stats.blocks += 1
            stats.prompt_tokens += len(block) * max(len(row) for row in block)
            stats.input_tokens += sum(len(row) for row in block)
            handed = time.perf_counter()
            on_block([m for row in block for m in row.members], [s for part in results for s in part])
            handed_s += time.perf_counter() - handed
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats.prefill_s = time.perf_counter() - started - handed_s
        return self._finish_stats(stats, read_before)

    def score(self, requests: list[ScoreRequest], share: bool = True) -> tuple[list[Scored], RunStats]:
        """Every request's result in input order, and the stats; ``share``: requests sharing a context prefix
        compute it once (never under a length-dependent rotary scaling)."""
        results: list[Scored | None] = [None] * len(requests)

        def keep(members: list[int], scored: list[Scored]) -> None:
            for m, sc in zip(members, scored, strict=True):
                results[m] = sc

        rows = pack(requests, self.max_len, share and can_share(self.cfg))
        stats = self.score_rows(requests, rows, keep)
        return [r for r in results if r is not None], stats
