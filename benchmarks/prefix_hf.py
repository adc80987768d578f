"""The baseline of prefix.sh: Hugging Face transformers `generate` over the same prompts as flexrun, left-padded
in one batch, greedy, on the same OPT built from OPTConfig with random weights (every prompt's prefix computed
in full, as HF does). One JSON line of results."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hf_common import peak_rss, random_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", required=True, help="prefix.sh's JSONL prompts (input_ids)")
    p.add_argument("--gen-len", type=int, default=8)
    p.add_argument("--side", default="hf generate")
    args = p.parse_args()
    prompts = [json.loads(line)["input_ids"] for line in Path(args.prompts).read_text().splitlines()]
    model = random_model(args.model, args.dtype)
    s, pad = max(map(len, prompts)), model.config.pad_token_id
    ids = torch.tensor([[pad] * (s - len(q)) + q for q in prompts])  # (b, s), left-padded
    mask = torch.tensor([[0] * (s - len(q)) + [1] * len(q) for q in prompts])
    kw = {"do_sample": False, "pad_token_id": pad, "min_new_tokens": args.gen_len, "max_new_tokens": args.gen_len}
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kw)
        seconds = time.perf_counter() - start
    assert out.shape[1] == s + args.gen_len
    print(json.dumps({"side": args.side, "sequences": len(prompts), "seconds": seconds, "prefill_s": None,
                      "prefilled_tokens": sum(map(len, prompts)), "threads": torch.get_num_threads(),
                      "peak_rss_bytes": peak_rss()}))  # fmt: skip


if __name__ == "__main__":
    main()
