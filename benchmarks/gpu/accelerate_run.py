"""Baseline for gpu.sh: transformers + accelerate big-model inference with CPU offload under a GPU memory cap.

`python accelerate_run.py --config-dir DIR --batch B|auto --gpu-mem BYTES [--prompt-len N --gen-len N]`

The model (DIR/config.json, float16) is built on the meta device and given values in host RAM (a block of
random numbers repeated: throughput does not depend on them, and filling 60 GB from a random generator
would take minutes); then ``infer_auto_device_map`` with ``max_memory={0: GPU share, "cpu": the rest of
RAM}`` and ``dispatch_model``, the two steps of ``from_pretrained(device_map="auto", max_memory=...)``:
the first layers stay on the GPU, the rest stay in host RAM and accelerate's hooks move each one to the
GPU at every forward. The GPU share is --gpu-mem less the batch's KV cache and a working margin, since
transformers keeps the whole cache on the GPU. Its best batch (``--batch auto``) is the largest power of two
whose cache leaves at least two decoder layers' weights on the GPU: each forward moves the offloaded
layers to the GPU whatever the batch, so tokens per second grow with the batch until the cache crowds the
weights out; a batch that still runs out of GPU memory is halved until one runs. Timing as hf_common's (prefill = a one-token generate,
decode = the full generate less it), with a CUDA synchronize around each. One JSON line.

Without CUDA (gpu.sh's small mode) the same code runs with the GPU share mapped to "cpu" and the offloaded
rest to an offload folder on disk, so every step but the device runs here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ (hf_common)
from hf_common import emit, prompts  # noqa: E402


def build(config_dir: Path) -> Any:
    """OPTForCausalLM of DIR's config in float16, its values a repeated random block (see the module's doc)."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = OPTForCausalLM(cfg).to(torch.float16)
    model = model.to_empty(device="cpu")
    pool = torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(torch.float16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.view(-1)
            for off in range(0, flat.numel(), pool.numel()):
                n = min(pool.numel(), flat.numel() - off)
                flat[off : off + n].copy_(pool[:n])
            if "layer_norm" in name and name.endswith("weight"):
                p.fill_(1.0)
        for b in model.buffers():
            b.zero_()
    model.tie_weights()
    return model.eval()


def kv_cache_bytes(cfg: Any, batch: int, seq: int) -> int:
    return 2 * cfg.num_hidden_layers * batch * seq * cfg.hidden_size * 2  # K and V, float16


def layer_bytes(cfg: Any) -> int:
    h, f = cfg.hidden_size, cfg.ffn_dim
    return 2 * (4 * h * h + 2 * h * f + 10 * h + f)


def best_batch(cfg: Any, gpu_mem: int, seq: int, margin: int) -> int:
    """The largest power of two (up to 1024) whose KV cache leaves two layers' weights on the GPU; at least 1."""
    b = 1
    while b < 1024 and gpu_mem - kv_cache_bytes(cfg, 2 * b, seq) - margin >= 2 * layer_bytes(cfg):
        b *= 2
    return b


def timed(model: Any, ids: torch.Tensor, gen_len: int, sync: Any) -> dict[str, float]:
    kw = {"do_sample": False, "pad_token_id": 1}
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, **kw)
        sync()
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=gen_len, min_new_tokens=gen_len, **kw)
        sync()
        total = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + gen_len
    return {"prefill_s": prefill, "total_s": total, "decode_s": max(total - prefill, 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-dir", type=Path, required=True)
    ap.add_argument("--batch", required=True, help="sequences, or auto (see above)")
    ap.add_argument("--gpu-mem", type=int, required=True, help="bytes: the GPU cap (capped.py sets it too)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--margin", type=float, default=2.0, help="GiB of the cap kept for activations")
    ap.add_argument("--share", type=int, help="bytes of weights kept on the main device (default: see above)")
    ap.add_argument("--offload-dir", default="/tmp/flexrun-bench/accelerate-offload", help="small mode only")
    a = ap.parse_args()
    from accelerate import dispatch_model, infer_auto_device_map

    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    model = build(a.config_dir)
    cfg = model.config
    seq, margin = a.prompt_len + a.gen_len, int(a.margin * 2**30)
    batch = best_batch(cfg, a.gpu_mem, seq, margin) if a.batch == "auto" else int(a.batch)
    share = a.share or a.gpu_mem - kv_cache_bytes(cfg, batch, seq) - margin
    if share <= 0:
        raise SystemExit(f"batch {batch}: its KV cache alone does not fit the GPU cap of {a.gpu_mem / 2**30:.1f} GiB")
    import psutil

    host = int(psutil.virtual_memory().available * 0.9)
    main_dev: Any = 0 if cuda else "cpu"
    rest = "cpu" if cuda else "disk"
    max_memory = {main_dev: share, "cpu": host} if cuda else {"cpu": share}
    device_map = infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=model._no_split_modules, dtype=torch.float16
    )
    print(f"batch {batch}, device map: {dict(device_map)}", file=sys.stderr)
    kw: dict[str, Any] = {}
    if not cuda:
        shutil.rmtree(a.offload_dir, ignore_errors=True)
        kw = {"offload_dir": a.offload_dir}
    model = dispatch_model(model, device_map=device_map, main_device=main_dev if cuda else None, **kw)
    load_s = time.perf_counter() - t0
    placed = {str(d): sum(1 for v in device_map.values() if v == d) for d in {*device_map.values()}}
    ids = prompts(cfg.vocab_size, batch, a.prompt_len).to(f"cuda:{main_dev}" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    args = argparse.Namespace(model=a.config_dir.name, dtype="float16", batch=batch, prompt_len=a.prompt_len,
                              gen_len=a.gen_len)  # fmt: skip
    while True:  # a batch whose activations do not fit the cap after all: half of it, and so on
        try:
            t = timed(model, ids, a.gen_len, sync)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            ids, args.batch = ids[:batch], batch
            torch.cuda.empty_cache()
            print(f"out of GPU memory: batch {batch} next", file=sys.stderr)
    offloaded = sum(1 for v in device_map.values() if v == rest)
    emit("accelerate", args, t, load_s=load_s, modules_by_device=placed, offloaded_modules=offloaded,
         gpu_share_bytes=share, batch_asked=a.batch)  # fmt: skip


if __name__ == "__main__":
    main()
