"""Shared by the Hugging Face baselines: the same OPT as flexrun's, built from OPTConfig with random weights,
synthetic prompts like `flexrun bench`'s, timing of `generate`, and one JSON line of results per run."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import OPTConfig, OPTForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's flexrun
from flexrun.resolver import resolve  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config(name: str, dtype: str) -> OPTConfig:
    """The Hugging Face config of the model flexrun resolves ``name`` to."""
    c = resolve(name)
    return OPTConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        ffn_dim=c.ffn_embed_dim,
        num_attention_heads=c.n_head,
        max_position_embeddings=c.max_seq_len,
        do_layer_norm_before=c.do_layer_norm_before,
        word_embed_proj_dim=c.word_embed_proj_dim or c.hidden_size,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        tie_word_embeddings=c.tie_word_embeddings,
        torch_dtype=dtype,
    )


def random_model(name: str, dtype: str) -> OPTForCausalLM:
    """Random (dummy) weights: throughput does not depend on the values."""
    torch.manual_seed(0)
    model = OPTForCausalLM(hf_config(name, dtype)).to(DTYPES[dtype])
    return model.eval()


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--model", required=True, help="OPT name, e.g. opt-125m")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    return p


def prompts(vocab: int, batch: int, prompt_len: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(4, vocab, (batch, prompt_len), generator=gen)  # (b, s)


def timed_generate(model: Any, ids: torch.Tensor, gen_len: int) -> dict[str, float]:
    """Prefill = a 1-token generate; decode = the full generate minus it (as FlexGen measures Accelerate)."""
    kw = {"do_sample": False, "pad_token_id": 1, "min_new_tokens": gen_len}
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, **{**kw, "min_new_tokens": 1})
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=gen_len, **kw)
        total = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + gen_len
    return {"prefill_s": prefill, "total_s": total, "decode_s": max(total - prefill, 0.0)}


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def emit(side: str, args: argparse.Namespace, t: dict[str, float], **extra: Any) -> None:
    b, n = args.batch, args.gen_len
    steps = n - 1
    print(
        json.dumps(
            {
                "side": side,
                "model": args.model,
                "dtype": args.dtype,
                "batch": b,
                "prompt_len": args.prompt_len,
                "gen_len": n,
                **t,
                "decode_steps": steps,
                "total_tok_s": b * n / t["total_s"],
                "decode_tok_s": b * steps / t["decode_s"] if t["decode_s"] > 0 else 0.0,
                "peak_rss_bytes": peak_rss(),
                "threads": torch.get_num_threads(),
                "pid": os.getpid(),
                **extra,
            }
        ),
        flush=True,
    )
