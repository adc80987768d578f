"""The tensor-parallel group a rank runs in: torch.distributed set up from RANK / WORLD_SIZE, and the collectives
the engine needs (the row-parallel all-reduce, the vocab-parallel embedding and LM head, the sampler's choice).

One process is the same object with ``world == 1``, every collective an identity, so the engine has one code
path. Ranks come from torchrun's (or ``flexrun generate --tp``'s) environment: global RANK and WORLD_SIZE, with
MASTER_ADDR / MASTER_PORT for the rendezvous; gloo on CPU, NCCL on CUDA. Collectives time out
(``FLEXRUN_TP_TIMEOUT`` seconds, 300 by default; setup waits ``FLEXRUN_TP_SETUP_TIMEOUT``, an hour), and a
failed one is a ``RankLost`` error: a rank that dies takes the job down rather than hanging it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from flexrun.errors import ConfigError, FlexrunError
from flexrun.parallel.shard import Shard

log = logging.getLogger(__name__)

#: The sampler's contract: (logits (n, vocab) float32, history (n, t)) -> (n,) next tokens.
Sample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RankLost(FlexrunError):
    """A collective failed or timed out: another rank died, hung or lost the network."""


def _seconds(var: str, default: float) -> timedelta:
    value = os.environ.get(var)
    try:
        seconds = float(value) if value else default
    except ValueError:
        raise ConfigError(f"{var} must be a number of seconds, got {value!r}") from None
    return timedelta(seconds=seconds)


class TensorParallel:
    """This rank's place in the tensor-parallel group and the collectives over it."""

    def __init__(
        self,
        shard: Shard | None = None,
        group: Any = None,
        control: Any = None,
        device: torch.device | None = None,
        local_world: int = 1,
    ) -> None:
        self.shard = shard or Shard()
        self.local_world = local_world  # the ranks on this machine (LOCAL_WORLD_SIZE), sharing its memory and disk
        self.group = group  # the collectives of a step (the default group)
        self.control = control  # setup and the work handed out by rank 0 (gloo, long timeout)
        self.device = device or torch.device("cpu")  # where the step's collectives take their tensors
        self.gloo = self.device.type == "cpu"
        self.comm_s = 0.0  # seconds in the step's collectives, waits for the slowest rank included
        self.comm_calls = 0

    @property
    def world(self) -> int:
        return self.shard.world

    @property
    def rank(self) -> int:
        return self.shard.rank

    @property
    def reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The fused layer's reduction point: None for one process."""
        return self.all_reduce if self.world > 1 else None

    @contextmanager
    def _guard(self, what: str, timed: bool = True) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except RuntimeError as exc:  # gloo/NCCL errors, timeouts and closed connections alike
            text = str(exc).strip()
            # gloo's first sentence says what happened ("Connection closed by peer [127.0.0.1]:29500")
            reason = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
            raise RankLost(
                f"rank {self.rank} of {self.world}: {what} failed, another rank stopped or is unreachable "
                f"({reason}); what was finished is kept, run the same command again to resume"
            ) from None
        if timed:
            self.comm_s += time.perf_counter() - start
            self.comm_calls += 1

    # ---- the collectives of a step -----------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the ranks (in place where it can be). gloo sums 16-bit tensors in float32."""
        if self.world == 1:
            return t
        wide = t.float() if self.gloo and t.dtype in (torch.float16, torch.bfloat16) else t
        with self._guard("an all-reduce"):
            dist.all_reduce(wide, group=self.group)
        return wide.to(t.dtype) if wide is not t else t

    def embed(self, ids: torch.Tensor, table: torch.Tensor, vocab: int) -> torch.Tensor:
        """Rows ``ids`` (b, s) of a vocab-parallel embedding whose rows this rank holds: (b, s, p)."""
        if self.world == 1:
            return F.embedding(ids, table)
        lo, hi = self.shard.vocab(vocab)
        local = ids - lo
        inside = (local >= 0) & (local < hi - lo)
        x = F.embedding(local.clamp(0, hi - lo - 1), table).masked_fill(~inside[..., None], 0)
        return self.all_reduce(x)

    def gather_vocab(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        """The whole vocabulary's logits (n, vocab) from this rank's columns (n, part)."""
        if self.world == 1:
            return logits
        parts = [Shard(r, self.world).vocab(vocab) for r in range(self.world)]
        width = max(b - a for a, b in parts)
        padded = F.pad(logits, (0, width - logits.shape[1]), value=float("-inf")).to(self.device).contiguous()
        out = [torch.empty_like(padded) for _ in range(self.world)]
        with self._guard("gathering the logits"):
            dist.all_gather(out, padded, group=self.group)
        return torch.cat([o[:, : b - a] for o, (a, b) in zip(out, parts, strict=True)], dim=1).to(logits.device)

    def token_logprobs(
        self, logits: torch.Tensor, targets: torch.Tensor, vocab: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's log-probability of its ``targets`` (n,) over the whole vocabulary, and whether the target is
        the row's greedy choice (argmax's first best), from this rank's columns of float32 ``logits`` (n, part):
        the rows' maxima, the target's logit, the sums of exponentials and the first best token are reduced
        across ranks (4 x n values), never the [n, vocab] logits."""
        if self.world == 1:
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
            return logprobs, logits.argmax(-1) == targets
        lo, hi = self.shard.vocab(vocab)
        inside = (targets >= lo) & (targets < hi)
        held = logits.gather(1, (targets - lo).clamp(0, hi - lo - 1)[:, None])[:, 0]
        top = torch.stack([logits.max(-1).values, torch.where(inside, held, float("-inf"))])  # (2, n)
        top = self._reduce(top, dist.ReduceOp.MAX)
        best, target = top[0], top[1]  # the rows' maxima and their targets' logits over the whole vocabulary
        sums = self._reduce((logits - best[:, None]).exp().sum(-1), dist.ReduceOp.SUM)  # (n,)
        # The first token holding the maximum, as argmax chooses: each rank's first, the smallest of them.
        mine = (logits == best[:, None]).int().argmax(-1) + lo
        has = (logits == best[:, None]).any(-1)
        first = -self._reduce(torch.where(has, -mine.double(), float("-inf")), dist.ReduceOp.MAX)
        return target - best - sums.log(), first.long() == targets

    def _reduce(self, t: torch.Tensor, op: Any) -> torch.Tensor:
        """``t`` reduced with ``op`` over the ranks, on the collectives' device, returned where it was."""
        wide = t.to(self.device).contiguous()
        with self._guard("reducing the log-probabilities"):
            dist.all_reduce(wide, op=op, group=self.group)
        return wide.to(t.device)

    def choose(
        self, sample: Sample, logits: torch.Tensor, history: torch.Tensor, vocab: int, greedy: bool, penalty: float
    ) -> torch.Tensor:
        """The next tokens (n,), the same on every rank and the same as one process would choose. Greedy
        decoding takes each rank's best and agrees on the first best of all (as argmax does), without gathering
        the logits; sampling gathers them, so every rank's seeded draw is one process's."""
        if self.world == 1 or not greedy:
            return sample(self.gather_vocab(logits, vocab), history)
        lo, hi = self.shard.vocab(vocab)
        if penalty != 1.0:  # the repetition penalty on the seen tokens this rank holds
            inside = (history >= lo) & (history < hi)
            index = torch.where(inside, history - lo, hi - lo)  # the others go to a spare column
            ext = torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], dim=1)
            seen = torch.gather(ext, 1, index)
            ext = ext.scatter(1, index, torch.where(seen > 0, seen / penalty, seen * penalty))
            logits = ext[:, :-1]
        idx = logits.argmax(-1)
        best = torch.stack([logits.gather(1, idx[:, None])[:, 0].double(), (idx + lo).double()], dim=1)  # (n, 2)
        best = best.to(self.device)
        out = [torch.empty_like(best) for _ in range(self.world)]
        with self._guard("choosing the next tokens"):
            dist.all_gather(out, best, group=self.group)
        every = torch.stack(out).cpu()  # (world, n, 2): each rank's best value and its token
        top = every[..., 0].max(0).values
        first = (every[..., 0] == top).int().argmax(0)  # the first rank holding the best: argmax's tie rule
        return every[first, torch.arange(every.shape[1]), 1].long()

    # ---- the work rank 0 hands out -------------------------------------------------------------------
    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object: options, prompts, a stop)."""
        if self.world == 1:
            return obj
        box = [obj]
        with self._guard("waiting for rank 0", timed=False):
            dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank (each has built its engine before the first step's collectives time out)."""
        if self.world > 1:
            with self._guard("waiting for the other ranks", timed=False):
                dist.barrier(group=self.control)

    def close(self) -> None:
        global _current
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        _current = SINGLE


SINGLE = TensorParallel()
_current = SINGLE


def current() -> TensorParallel:
    """This process's group: ``init_from_env``'s, or one process."""
    return _current


def launched() -> bool:
    """Whether this process is one rank of several (torchrun's or ``generate --tp``'s environment)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(tp: int | None = None) -> TensorParallel:
    """This process's group from RANK / WORLD_SIZE (one process without them). ``tp``: the --tp asked for,
    which must be the world's size. CPU ranks on one machine divide its cores; CUDA ranks take the GPU
    LOCAL_RANK names."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None
    if tp is not None and tp != world:
        raise ConfigError(f"--tp {tp} but the launcher started {world} processes (WORLD_SIZE); give the same number")
    global _current
    if world == 1:
        return SINGLE
    if _current.world > 1:
        return _current
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        if local_world > torch.cuda.device_count():
            raise ConfigError(
                f"{local_world} ranks on this machine but {torch.cuda.device_count()} GPU(s): NCCL takes one GPU per "
                'rank; start fewer, or run CPU ranks with CUDA_VISIBLE_DEVICES=""'
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif not os.environ.get("OMP_NUM_THREADS"):  # the machine's cores divided between its ranks
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // max(1, local_world)))
    timeout = _seconds("FLEXRUN_TP_TIMEOUT", 300)
    shard = Shard(rank, world)
    group = TensorParallel(shard)
    with group._guard("joining the group"):
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, rank=rank, world_size=world)
        control = dist.new_group(backend="gloo", timeout=_seconds("FLEXRUN_TP_SETUP_TIMEOUT", 3600))
    log.info("rank %d of %d (%s), %d threads", rank, world, "nccl" if cuda else "gloo", torch.get_num_threads())
    _current = TensorParallel(shard, dist.group.WORLD, control, device, local_world)
    return _current
