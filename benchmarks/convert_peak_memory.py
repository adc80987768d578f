"""Peak memory of `flexrun convert` on a checkpoint bigger than the memory it is allowed.

Writes a random-valued Hugging Face OPT checkpoint of a named size (safetensors shards, one layer at a
time, so writing it needs little memory), then converts it with `flexrun convert` in a memory cgroup whose
limit is far below the checkpoint's size (root and cgroup v1 needed for the limit; without them the
conversion runs unconfined and the script says so). Reports the converter's peak resident memory (VmHWM)
and the cgroup's peak usage, which includes the page cache it was allowed to keep.

    python benchmarks/convert_peak_memory.py --model opt-2.7b --limit 1GiB --workdir /var/tmp/fr-convert
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import OPTConfig

from flexrun.resolver import resolve
from flexrun.units import format_bytes, parse_size

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def write_checkpoint(name: str, out: Path) -> int:
    """A float16 OPT checkpoint with ``name``'s shapes and random values; returns its size in bytes."""
    cfg = resolve(name, dtype="float16")
    out.mkdir(parents=True, exist_ok=True)
    hf = OPTConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        ffn_dim=cfg.ffn_embed_dim,
        num_attention_heads=cfg.n_head,
        max_position_embeddings=cfg.max_seq_len,
        torch_dtype="float16",
        architectures=["OPTForCausalLM"],
    )
    hf.to_json_file(str(out / "config.json"))
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32).mul_(0.02).half()

    h, f = cfg.hidden_size, cfg.ffn_embed_dim
    total = 0
    glob = {
        "model.decoder.embed_tokens.weight": rand(cfg.vocab_size, h),
        "model.decoder.embed_positions.weight": rand(cfg.max_seq_len + 2, h),
        "model.decoder.final_layer_norm.weight": torch.ones(h, dtype=torch.float16),
        "model.decoder.final_layer_norm.bias": torch.zeros(h, dtype=torch.float16),
    }
    save_file(glob, str(out / "model-globals.safetensors"))
    total += sum(t.numel() * 2 for t in glob.values())
    for i in range(cfg.num_hidden_layers):
        p = f"model.decoder.layers.{i}."
        layer = {p + f"self_attn.{x}_proj.weight": rand(h, h) for x in "qkv"}
        layer |= {p + f"self_attn.{x}_proj.bias": rand(h) for x in "qkv"}
        layer |= {
            p + "self_attn.out_proj.weight": rand(h, h),
            p + "self_attn.out_proj.bias": rand(h),
            p + "self_attn_layer_norm.weight": torch.ones(h, dtype=torch.float16),
            p + "self_attn_layer_norm.bias": torch.zeros(h, dtype=torch.float16),
            p + "fc1.weight": rand(f, h),
            p + "fc1.bias": rand(f),
            p + "fc2.weight": rand(h, f),
            p + "fc2.bias": rand(h),
            p + "final_layer_norm.weight": torch.ones(h, dtype=torch.float16),
            p + "final_layer_norm.bias": torch.zeros(h, dtype=torch.float16),
        }
        save_file(layer, str(out / f"model-layer{i:03d}.safetensors"))
        total += sum(t.numel() * 2 for t in layer.values())
    return total


def _cgroup(limit: int) -> Path | None:
    if os.geteuid() != 0 or not CGROUP_ROOT.is_dir():
        return None
    group = CGROUP_ROOT / "flexrun-convert"
    if group.exists():
        group.rmdir()
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(limit))
    return group


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="opt-2.7b", help="OPT size whose shapes the checkpoint has")
    ap.add_argument("--limit", default="1GiB", help="memory cgroup limit for the conversion")
    ap.add_argument("--workdir", default="/var/tmp/flexrun-convert-bench")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the store")
    args = ap.parse_args()
    work = Path(args.workdir)
    ckpt, store = work / "ckpt", work / "store"
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    size = write_checkpoint(args.model, ckpt)
    print(f"checkpoint: {args.model} float16, {format_bytes(size)} in {time.perf_counter() - start:.0f} s")
    limit = parse_size(args.limit)
    group = _cgroup(limit)
    if os.geteuid() == 0:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3")
    # The converter reports its own peak (VmHWM is per process image, reset at exec; a rusage figure would
    # include the pages this parent shared with the child before exec).
    probe = (
        "import atexit, runpy, sys; "
        "atexit.register(lambda: print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0], "
        "file=sys.stderr)); sys.argv = ['flexrun', *sys.argv[1:]]; runpy.run_module('flexrun', run_name='__main__')"
    )
    cmd = [sys.executable, "-c", probe, "convert", "--model", str(ckpt), "--out", str(store)]
    # The child joins the cgroup before exec, so everything it allocates is counted.
    join = (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if group else None  # noqa: E731
    start = time.perf_counter()
    proc = subprocess.run(cmd, preexec_fn=join, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    peak = next((int(ln.split()[1]) * 1024 for ln in proc.stderr.splitlines() if ln.startswith("VmHWM")), 0)
    cg_peak = int((group / "memory.max_usage_in_bytes").read_text()) if group else 0
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        sys.exit(f"convert failed with exit code {proc.returncode}")
    where = f"in a memory cgroup limited to {format_bytes(limit)}" if group else "UNCONFINED (not root or no cgroup v1)"
    print(f"convert: {elapsed:.0f} s {where}")
    print(f"converter peak RSS: {format_bytes(peak)} ({peak / size:.1%} of the checkpoint)")
    if group:
        print(f"cgroup peak usage (RSS + page cache it kept): {format_bytes(cg_peak)}")
        group.rmdir()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
