"""``flexrun generate --tp N`` on one machine: N local ranks started with torch.multiprocessing, each given the
environment torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), so a rank
runs exactly as under ``torchrun``.

Rank 0 hosts the rendezvous store on a loopback port the launcher found free; the launcher
forks the ranks (no CUDA is touched before, so forking is safe and skips N imports of torch). Ctrl-C reaches
every rank (one process group) and rank 0 decides; SIGTERM sent to the launcher is passed on. When one rank
fails the others get ``GRACE_S`` to notice (their collectives fail at once on a closed connection) and are then
killed; the launcher exits with rank 0's status, saying in one line what happened if rank 0 could not.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch.multiprocessing as mp

#: Seconds the other ranks get to stop on their own once one has failed.
GRACE_S = 10.0

Entry = Callable[[list[str]], None]


def _rank(local_rank: int, world: int, port: int, stdin_fd: int, entry: Entry, argv: list[str]) -> None:
    os.environ.update(
        RANK=str(local_rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if local_rank == 0:  # multiprocessing closed stdin; rank 0 reads the input
        os.dup2(stdin_fd, 0)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
    else:  # rank 0 decides when to stop; the others follow it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.close(stdin_fd)
    try:
        entry(argv)
    except Exception:  # a bug, not a user error (the command line says those in one line itself)
        traceback.print_exc()
        raise SystemExit(1) from None


def run_local(world: int, entry: Entry, argv: list[str]) -> int:
    """Run ``entry(argv)`` (the command line again) in ``world`` local ranks; returns the exit status."""
    port = _free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    stdin_fd = os.dup(0)
    ctx = mp.start_processes(
        _rank, args=(world, port, stdin_fd, entry, argv), nprocs=world, join=False, start_method="fork"
    )
    os.close(stdin_fd)
    procs = ctx.processes

    def forward(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGTERM and procs[0].pid is not None:
            os.kill(procs[0].pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _wait(procs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()


def _free_port() -> int:
    """A loopback port free now, for rank 0's rendezvous store (as torchrun --standalone finds one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(procs: list[Any]) -> int:
    """Wait for every rank; once one fails, give the others ``GRACE_S`` and kill those left."""
    failed_at: float | None = None
    first_failure = ""
    while alive := [p.sentinel for p in procs if p.is_alive()]:
        # Never an empty wait without a timeout: a rank that ends between the two checks would leave one forever.
        timeout = 1.0 if failed_at is None else min(1.0, max(0.0, failed_at + GRACE_S - time.monotonic()))
        multiprocessing.connection.wait(alive, timeout)
        for r, p in enumerate(procs):
            if failed_at is None and p.exitcode not in (None, 0):
                failed_at, first_failure = time.monotonic(), f"rank {r} {_how(p.exitcode)}"
        if failed_at is not None and time.monotonic() >= failed_at + GRACE_S:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join()
            if procs[0].exitcode == -signal.SIGKILL:
                print(
                    f"Error: {first_failure}; the other ranks did not stop within {GRACE_S:.0f} s and were killed",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
    code = procs[0].exitcode or 0
    if code < 0 or (code == 0 and failed_at is not None):
        # rank 0 did not say what happened (killed, or it finished while another rank failed)
        print(f"Error: {first_failure or f'rank 0 {_how(code)}'}", file=sys.stderr, flush=True)
        return 1 if code >= 0 else 128 - code
    return code


def _how(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"
