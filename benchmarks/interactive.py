"""Baselines for interactive.sh: one sequence through Hugging Face `generate` (float32, the GGUF file's own
weights dequantized by transformers) or llama-cpp-python (the GGUF file itself), on the same synthetic
prompt as `flexrun bench` and the same threads. One JSON line per run: time to first token, decode tok/s."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's flexrun
from flexrun.resolver import resolve  # noqa: E402
from flexrun.resolver.packaged import packaged_model_path  # noqa: E402


def prompt(vocab: int, length: int) -> list[int]:
    """The prompt `flexrun bench` feeds a block of one: seeded random ids."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(4, vocab, (1, length), generator=gen)[0].tolist()


def hf(path: Path, ids: list[int], gen: int) -> tuple[float, float, float]:
    """Time to first token, decode tok/s, and CPU seconds per decode step (every thread)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def run(n: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():  # never stopping early: n tokens exactly
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start, time.process_time() - cpu

    run(2)  # warm-up (first-call allocations), as flexrun's store is warm
    first, first_cpu = run(1)
    whole, whole_cpu = run(gen)
    return first, (gen - 1) / (whole - first), (whole_cpu - first_cpu) / (gen - 1)


def llama_cpp(path: Path, ids: list[int], gen: int, threads: int) -> tuple[float, float, float]:
    """llama.cpp through its low-level API (llama_batch, llama_decode), as llamacpp_batched.py drives it: the
    high-level ``Llama.eval`` of a multi-token prompt segfaulted on an AMX machine (ggml's AMX int8 kernels),
    with or without its repacked weight buffers; plain CPU buffers, greedy argmax."""
    import llama_cpp as L  # type: ignore[import-not-found]
    import numpy as np
    from llamacpp_batched import fill

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = False  # plain CPU buffers (the repacked ones crashed on an AMX machine, issue 23)
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx = len(ids) + gen + 8
    cp.n_batch = cp.n_ubatch = max(len(ids), 8)
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(cp.n_batch, 0, 1)

    def decode(tokens: list[int], at: int) -> int:
        fill(batch, [(t, at + i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, len(tokens) - 1), shape=(n_vocab,))
        return int(logits.argmax())

    decode(ids[:4], 0)  # warm-up, then a fresh sequence
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    start = time.perf_counter()
    tok = decode(ids, 0)
    first = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    for step in range(gen - 1):
        tok = decode([tok], len(ids) + step)
    result = first, (gen - 1) / (time.perf_counter() - start), (time.process_time() - cpu) / (gen - 1)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("side", choices=["hf", "llama-cpp"])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompt-len", type=int, default=40)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = packaged_model_path(args.model)
    if path is None:
        sys.exit(f"{args.model} is not a packaged GGUF model")

    ids = prompt(resolve(args.model).vocab_size, args.prompt_len)
    if args.side == "hf":
        first, rate, cpu = hf(path, ids, args.gen_len)
    else:
        try:
            first, rate, cpu = llama_cpp(path, ids, args.gen_len, args.threads)
        except ImportError:
            print("llama-cpp-python is not importable: skipped", file=sys.stderr)
            sys.exit(3)
    row = {"side": args.side, "threads": args.threads, "first_token_s": first, "decode_tok_s": rate, "step_cpu_s": cpu}
    print(json.dumps(row))
