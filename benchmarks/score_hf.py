"""The baseline of score.sh: lm-evaluation-harness's `hf` backend scoring the same requests as `flexrun score`,
through its own token-level path (HFLM._loglikelihood_tokens: its batching, its left truncation, one forward
pass per request), on the same OPT built from OPTConfig with random weights. With --ckpt, the model is that
saved checkpoint dispatched by accelerate with disk offload (device_map="auto", max_memory cpu=--host-mem,
offload_folder), as accelerate_offload.py loads it: what does not fit the budget is read from the offload
folder at every forward. One JSON line of results; --logprobs writes each request's log-likelihood."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from hf_common import DTYPES, peak_rss, random_model
from lm_eval.models.huggingface import HFLM
from tokenizers import Tokenizer, models
from transformers import OPTForCausalLM, PreTrainedModel, PreTrainedTokenizerFast


def placeholder_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A tokenizer of the model's vocabulary size: HFLM needs one, the token-level path never tokenizes."""
    words = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t3"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t1", eos_token="t2", bos_token="t2")


def offloaded_model(ckpt: Path, dtype: str, host_mem: str, offload_dir: str) -> PreTrainedModel:
    """The checkpoint dispatched by accelerate within ``host_mem``, the rest offloaded to ``offload_dir``."""
    shutil.rmtree(offload_dir, ignore_errors=True)
    return OPTForCausalLM.from_pretrained(
        ckpt,
        dtype=DTYPES[dtype],
        device_map="auto",
        max_memory={"cpu": host_mem},
        offload_folder=offload_dir,
        offload_state_dict=True,
    ).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="opt-1.3b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--requests", required=True, help="score.sh's JSONL requests (token ids)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ckpt", type=Path, help="a saved checkpoint to load with accelerate's disk offload")
    p.add_argument("--host-mem", default="1GiB", help="accelerate's max_memory for the CPU (with --ckpt)")
    p.add_argument("--offload-dir", default="/tmp/flexrun-bench/accelerate-offload")
    p.add_argument("--logprobs", type=Path, help='write {"id", "logprob", "is_greedy"} per request here')
    args = p.parse_args()
    records = [json.loads(line) for line in Path(args.requests).read_text().splitlines()]
    start = time.perf_counter()
    if args.ckpt:
        model = offloaded_model(args.ckpt, args.dtype, args.host_mem, args.offload_dir)
        side, placed = (
            f"accelerate disk offload ({args.dtype})",
            sorted({str(d) for d in getattr(model, "hf_device_map", {"": "cpu"}).values()}),
        )
    else:
        model, side, placed = random_model(args.model, args.dtype), f"lm-eval hf ({args.dtype})", ["cpu"]
    load_s = time.perf_counter() - start
    lm = HFLM(pretrained=model, tokenizer=placeholder_tokenizer(model.config.vocab_size), batch_size=args.batch,
              device="cpu")  # fmt: skip
    lm._device = torch.device("cpu")  # inputs go to the CPU, where accelerate's hooks bring offloaded weights
    requests = [(("", ""), r["context"], r["continuation"]) for r in records]
    with torch.inference_mode():
        start = time.perf_counter()
        results = lm._loglikelihood_tokens(requests, disable_tqdm=True)
        seconds = time.perf_counter() - start
    if args.logprobs:
        with args.logprobs.open("w") as f:
            for r, (logprob, greedy) in zip(records, results, strict=True):
                f.write(json.dumps({"id": r["id"], "logprob": logprob, "is_greedy": greedy}) + "\n")
    tokens = sum(len(r["context"]) + len(r["continuation"]) - 1 for r in records)
    print(json.dumps({"side": side, "requests": len(records), "seconds": seconds, "load_s": load_s,
                      "tokens_read": tokens, "placed_on": placed, "threads": torch.get_num_threads(),
                      "peak_rss_bytes": peak_rss()}))  # fmt: skip


if __name__ == "__main__":
    main()
