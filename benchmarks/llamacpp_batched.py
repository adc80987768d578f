"""llama.cpp's side of a batch benchmark: N sequences of S random prompt tokens, GEN greedy tokens each,
decoded together (one llama_decode per step for all sequences, as llama.cpp's `batched` example does), the
GGUF file mmap-ed (the kernel pages it) unless --no-mmap.

    python benchmarks/llamacpp_batched.py MODEL.gguf N S GEN THREADS [--no-mmap]

Prints one markdown row: case, side, decode tok/s, overall tok/s (generated tokens over prefill + decode),
peak RSS (VmHWM, which counts the mapped file's resident pages), and the bytes the process had read from
the disk per decode step (/proc/self/io read_bytes, which counts the mapping's page faults).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import llama_cpp as L
import numpy as np


def read_bytes() -> int:
    """Bytes this process has had read from storage (its page faults on the mapping included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def fill(batch: L.llama_batch, entries: list[tuple[int, int, int, bool]]) -> None:
    """entries: (token, position, sequence, wants logits)."""
    for i, (tok, pos, seq, out) in enumerate(entries):
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = out
    batch.n_tokens = len(entries)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("n", type=int)
    ap.add_argument("s", type=int)
    ap.add_argument("gen", type=int)
    ap.add_argument("threads", type=int)
    ap.add_argument("--no-mmap", action="store_true")
    a = ap.parse_args()
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.use_mmap = not a.no_mmap
    # Plain CPU buffers: the extra (repacked) weight buffers copy the weights out of the mapping into anonymous
    # memory, which is not mmap's paging any more, and they crashed on an AMX machine (issue 23).
    if hasattr(mp, "use_extra_bufts"):
        mp.use_extra_bufts = False
    model = L.llama_model_load_from_file(str(a.model).encode(), mp)
    if not model:
        sys.exit(f"llama.cpp could not load {a.model}")
    cp = L.llama_context_default_params()
    cp.n_seq_max = a.n
    cp.n_ctx = a.n * (a.s + a.gen + 8)
    cp.n_batch = max(a.n * a.s, a.n, 512)
    cp.n_ubatch = 512
    cp.n_threads = cp.n_threads_batch = a.threads
    ctx = L.llama_init_from_model(model, cp)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(cp.n_batch, 0, a.n)
    rng = random.Random(0)
    prompts = [[rng.randint(4, min(30000, n_vocab - 1)) for _ in range(a.s)] for _ in range(a.n)]

    def argmax(index: int) -> int:
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, index), shape=(n_vocab,))
        return int(logits.argmax())

    start = time.perf_counter()
    fill(batch, [(t, p, q, p == a.s - 1) for q, ids in enumerate(prompts) for p, t in enumerate(ids)])
    if L.llama_decode(ctx, batch) != 0:
        sys.exit("llama_decode failed on the prompts")
    last = [argmax(q * a.s + a.s - 1) for q in range(a.n)]
    t_decode, read_before = time.perf_counter(), read_bytes()
    for step in range(a.gen - 1):
        fill(batch, [(last[q], a.s + step, q, True) for q in range(a.n)])
        if L.llama_decode(ctx, batch) != 0:
            sys.exit(f"llama_decode failed at step {step}")
        last = [argmax(q) for q in range(a.n)]
    end = time.perf_counter()
    per_step = (read_bytes() - read_before) / max(a.gen - 1, 1)
    decode, total = end - t_decode, end - start
    # The first new token comes from the prefill; the GEN - 1 others from the decode steps.
    peak = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    side = f"llama.cpp {a.model.name}" + (" (no mmap)" if a.no_mmap else "")
    print(
        f"| {a.n} x p{a.s} g{a.gen} | {side} | {a.n * (a.gen - 1) / decode:.2f} | {a.n * a.gen / total:.2f} "
        f"| {peak / 2**20:.0f} MiB | {per_step / 2**30:.3f} GiB |"
    )


if __name__ == "__main__":
    main()
