"""The baseline of perplexity.sh: Hugging Face transformers' perplexity of a text in lm-evaluation-harness's rolling
windows, on a GGUF checkpoint transformers dequantizes to float32. The text is tokenized as lm-eval's hf backend
does (the tokenizer's own special tokens, none when the text starts with BOS) and split by lm-eval's own
get_rolling_token_windows + make_disjoint_window (the prefix token: the tokenizer's BOS, else EOS), each window
one forward pass, its log-softmax in float32: the same windows `flexrun score --window` scores. One JSON line."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from lm_eval import utils as lm_utils
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gguf", type=Path, required=True, help="the .gguf file")
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--window", type=int, default=1024, help="tokens a window predicts at most")
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name)
    model = AutoModelForCausalLM.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name, dtype=torch.float32)
    model.eval()
    text = args.text.read_text()
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    special = {"add_special_tokens": False} if text.startswith(tok.decode([prefix])) else {}
    tokens = tok.encode(text, **special)
    windows = [
        lm_utils.make_disjoint_window(w)
        for w in lm_utils.get_rolling_token_windows(tokens, prefix, max_seq_len=args.window, context_len=1)
    ]
    logprob, count = 0.0, 0
    start = time.perf_counter()
    with torch.inference_mode():
        for ctx, cont in windows:
            ids = torch.tensor(ctx + cont)[None, :-1]  # (1, s): the last token is only predicted
            logits = model(input_ids=ids).logits[0, len(ctx) - 1 :].float()  # (len(cont), vocab)
            lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(cont)[:, None])
            logprob += lp.sum().item()
            count += len(cont)
    seconds = time.perf_counter() - start
    print(json.dumps({"side": "hf", "logprob": logprob, "tokens": count, "windows": len(windows),
                      "perplexity": math.exp(-logprob / count), "seconds": seconds,
                      "threads": torch.get_num_threads()}))  # fmt: skip


if __name__ == "__main__":
    main()
