"""The baseline of score.sh: lm-evaluation-harness's `hf` backend scoring the same requests as `flexrun score`,
through its own token-level path (HFLM._loglikelihood_tokens: its batching, its left truncation, one forward
pass per request), on the same OPT built from OPTConfig with random weights. One JSON line of results."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hf_common import peak_rss, random_model
from lm_eval.models.huggingface import HFLM
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast


def placeholder_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A tokenizer of the model's vocabulary size: HFLM needs one, the token-level path never tokenizes."""
    words = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t3"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t1", eos_token="t2", bos_token="t2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="opt-1.3b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--requests", required=True, help="score.sh's JSONL requests (token ids)")
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    records = [json.loads(line) for line in Path(args.requests).read_text().splitlines()]
    model = random_model(args.model, args.dtype)
    lm = HFLM(pretrained=model, tokenizer=placeholder_tokenizer(model.config.vocab_size), batch_size=args.batch,
              device="cpu")  # fmt: skip
    requests = [(("", ""), r["context"], r["continuation"]) for r in records]
    with torch.inference_mode():
        start = time.perf_counter()
        lm._loglikelihood_tokens(requests, disable_tqdm=True)
        seconds = time.perf_counter() - start
    tokens = sum(len(r["context"]) + len(r["continuation"]) - 1 for r in records)
    print(json.dumps({"side": f"lm-eval hf ({args.dtype})", "requests": len(records), "seconds": seconds,
                      "tokens_read": tokens, "threads": torch.get_num_threads(), "peak_rss_bytes": peak_rss()}))  # fmt: skip


if __name__ == "__main__":
    main()
