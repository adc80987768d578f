"""Run ``flexgen.flex_opt`` (flexgen 0.1.8, PyPI) offline on a model directory of gpu.sh, one JSON line out.

`python flexgen_run.py --config-dir DIR --tokenizer TOK [--dry-run] -- FLEX_OPT_ARGS...`

What it changes in flexgen, from outside (its source is untouched):
- the tokenizer: flex_opt loads ``facebook/opt-30b``'s from the hub to pad its prompt; here
  ``AutoTokenizer.from_pretrained`` in flex_opt's namespace loads TOK instead (models.py's stand-in with
  OPT's special ids), and the hub is switched off (HF_HUB_OFFLINE);
- the model's dims: flex_opt's ``get_opt_config`` returns DIR/config.json's (the same file flexrun and
  accelerate run from), so a truncated ``opt-30b-12of48`` runs 12 layers of OPT-30B's shape;
- the result: ``write_benchmark_log`` also prints its figures as one JSON line (the fields of
  ``flexrun bench --json`` that gpu.sh's table reads) after writing flexgen's own log file.

With --dry-run (no CUDA needed) it stops where flex_opt would touch the GPU: it parses the arguments with
flex_opt's own parser, loads the tokenizer, builds the prompts, flexgen's config and its Policy, and prints
them as a JSON line.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def opt_config(fo: Any, config_dir: Path, name: str) -> Any:
    """flexgen's OptConfig with the dims of ``config_dir``'s Hugging Face config."""
    c = json.loads((config_dir / "config.json").read_text())
    return fo.OptConfig(
        name=name.split("/")[-1],
        num_hidden_layers=c["num_hidden_layers"],
        max_seq_len=c["max_position_embeddings"],
        hidden_size=c["hidden_size"],
        n_head=c["num_attention_heads"],
        input_dim=c["hidden_size"],
        ffn_embed_dim=c["ffn_dim"],
        vocab_size=c["vocab_size"],
        pad_token_id=c.get("pad_token_id", 1),
    )


def patch(fo: Any, config_dir: Path, tokenizer_dir: Path, emit: dict[str, Any]) -> None:
    """Point flex_opt at the local tokenizer and config, and make its benchmark log also print JSON."""
    from transformers import AutoTokenizer

    class LocalTokenizer:
        @staticmethod
        def from_pretrained(name: str, **kw: Any) -> Any:
            emit["tokenizer_asked"] = name
            return AutoTokenizer.from_pretrained(tokenizer_dir, **kw)

    fo.AutoTokenizer = LocalTokenizer
    fo.get_opt_config = lambda name, **kw: opt_config(fo, config_dir, name)
    write_log = fo.write_benchmark_log

    def write_benchmark_log(filename: str, model_size: int, cache_size: int, hidden_size: int, gpu_peak_mem: int,
                            projected: bool, prefill_latency: float, prefill_throughput: float, decode_latency: float,
                            decode_throughput: float, total_latency: float, total_throughput: float) -> str:  # fmt: skip
        steps = emit["gen_len"] - 1
        run = {
            **emit,
            "prefill_s": prefill_latency,
            "decode_s": decode_latency,
            "total_s": total_latency,
            "decode_steps": steps,
            "prefill_tok_s": prefill_throughput,
            "decode_tok_s": decode_throughput,
            "total_tok_s": total_throughput,
            "flexgen_peak_gpu_bytes": gpu_peak_mem,
            "model_bytes": model_size,
            "cache_bytes": cache_size,
            "projected": projected,
        }
        print(json.dumps(run), flush=True)
        return str(write_log(filename, model_size, cache_size, hidden_size, gpu_peak_mem, projected,
                             prefill_latency, prefill_throughput, decode_latency, decode_throughput,
                             total_latency, total_throughput))  # fmt: skip

    fo.write_benchmark_log = write_benchmark_log


def dry_run(fo: Any, args: argparse.Namespace, emit: dict[str, Any]) -> None:
    """run_flexgen up to its first CUDA call: tokenizer, prompts, config, Policy."""
    tokenizer = fo.AutoTokenizer.from_pretrained(args.model, padding_side="left")
    n = args.num_gpu_batches * args.gpu_batch_size
    inputs = fo.get_test_inputs(args.prompt_len, n, tokenizer)
    cfg = fo.get_opt_config(args.model)
    comp = fo.CompressionConfig
    policy = fo.Policy(
        args.gpu_batch_size, args.num_gpu_batches, *args.percent, args.overlap, args.sep_layer, args.pin_weight,
        args.cpu_cache_compute, args.attn_sparsity, args.compress_weight,
        comp(num_bits=4, group_size=64, group_dim=0, symmetric=False), args.compress_cache,
        comp(num_bits=4, group_size=64, group_dim=2, symmetric=False),
    )  # fmt: skip
    assert len(inputs) == n and all(len(x) == args.prompt_len for x in inputs), "prompts of the wrong shape"
    print(
        json.dumps(
            {
                **emit,
                "dry_run": True,
                "prompt_ids_head": list(inputs[0][-8:]),
                "pad_token_id": tokenizer.pad_token_id,
                "model_bytes": cfg.model_bytes(),
                "cache_bytes": cfg.cache_bytes(n, args.prompt_len + args.gen_len),
                "layers": cfg.num_hidden_layers,
                "policy": repr(policy),
            }
        ),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-dir", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("flex_opt_args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    rest = a.flex_opt_args[1:] if a.flex_opt_args[:1] == ["--"] else a.flex_opt_args
    import flexgen.flex_opt as fo

    fg_parser = argparse.ArgumentParser(prog="flexgen.flex_opt")
    fo.add_parser_arguments(fg_parser)
    args = fg_parser.parse_args(rest)
    if len(args.percent) != 6:
        raise SystemExit("--percent takes six numbers")
    emit: dict[str, Any] = {
        "side": "flexgen",
        "model": a.config_dir.name,
        "batch": args.gpu_batch_size * args.num_gpu_batches,
        "gpu_batch_size": args.gpu_batch_size,
        "num_gpu_batches": args.num_gpu_batches,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "percent": args.percent,
        "cpu_cache_compute": args.cpu_cache_compute,
        "compress_weight": args.compress_weight,
        "compress_cache": args.compress_cache,
        "overlap": args.overlap,
        "flexgen_version": importlib.metadata.version("flexgen"),
    }
    patch(fo, a.config_dir, a.tokenizer, emit)
    if a.dry_run:
        dry_run(fo, args, emit)
        return
    fo.run_flexgen(args)


if __name__ == "__main__":
    sys.exit(main())
