"""Baseline: transformers + accelerate big-model inference with CPU/disk offload at a host budget.

The random checkpoint is saved once (safetensors) under --ckpt-dir, then loaded with
``device_map="auto"``, ``max_memory={"cpu": BUDGET}`` and ``offload_folder``: accelerate keeps what fits
the budget in RAM and memory-maps the rest from the offload folder, layer by layer, at every forward.
One JSON line per run.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from hf_common import emit, parser, prompts, random_model, timed_generate
from transformers import OPTForCausalLM

if __name__ == "__main__":
    p = parser(__doc__ or "")
    p.add_argument("--host-mem", default="1GiB", help="accelerate's max_memory for the CPU")
    p.add_argument("--ckpt-dir", default="/tmp/flexrun-bench/hf-ckpt")
    p.add_argument("--offload-dir", default="/tmp/flexrun-bench/accelerate-offload")
    p.add_argument("--prepare", action="store_true", help="only save the random checkpoint (outside the limit)")
    args = p.parse_args()
    ckpt = Path(args.ckpt_dir) / f"{args.model}-{args.dtype}"
    if not (ckpt / "config.json").is_file():
        random_model(args.model, args.dtype).save_pretrained(ckpt)  # once; reused by later runs
    if args.prepare:
        raise SystemExit(0)
    shutil.rmtree(args.offload_dir, ignore_errors=True)
    t0 = time.perf_counter()
    model = OPTForCausalLM.from_pretrained(
        ckpt,
        dtype=args.dtype,
        device_map="auto",
        max_memory={"cpu": args.host_mem},
        offload_folder=args.offload_dir,
        offload_state_dict=True,
    ).eval()
    load_s = time.perf_counter() - t0
    devices = sorted({str(d) for d in model.hf_device_map.values()})
    ids = prompts(model.config.vocab_size, args.batch, args.prompt_len)
    emit("accelerate", args, timed_generate(model, ids, args.gen_len), load_s=load_s, placed_on=devices)
