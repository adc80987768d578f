"""FlexGen's published single-GPU policies (prompt 512, gen 32) and their spelling for each side of gpu.sh.

Source: FlexGen's benchmark/flexgen/bench_suite.py (the T4 16 GB runs of its README and paper), the rows at
prompt 512: ``suite_6b7_1x1``, ``suite_6b7_1x1_comp``, ``suite_30b_1x1``, ``suite_30b_1x1_comp``. Their
``--debug fewer_batch`` (run a few steps and project the rest) is left out: every side here runs all
``gen_len`` steps. ``--cpu`` there is an abbreviation of flexgen 0.1.8's ``--cpu-cache-compute``.

`python policies.py flexgen|flexrun MODEL POLICY [--prompt-len N --gen-len N --offload-dir D --log-file F]`
prints the arguments for that side, one per line (gpu.sh reads them with mapfile).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's flexrun


@dataclass(frozen=True)
class Policy:
    percent: tuple[int, int, int, int, int, int]  # weights gpu, cpu; cache gpu, cpu; activations gpu, cpu
    gpu_batch_size: int
    num_gpu_batches: int = 1
    overlap: bool = True
    cpu_cache_compute: bool = False
    compress_weight: bool = False  # FlexGen's: int4, groups of 64, asymmetric
    compress_cache: bool = False  # FlexGen's: int4, groups of 64 along the hidden dim, asymmetric

    @property
    def block(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches


PUBLISHED: dict[tuple[str, str], Policy] = {
    ("opt-6.7b", "fp16"): Policy((100, 0, 100, 0, 100, 0), 2, overlap=False),
    ("opt-6.7b", "comp"): Policy(
        (100, 0, 100, 0, 100, 0), 72, overlap=False, compress_weight=True, compress_cache=True
    ),
    ("opt-30b", "fp16"): Policy((20, 80, 0, 100, 0, 100), 48, 3, cpu_cache_compute=True),
    ("opt-30b", "comp"): Policy((0, 100, 0, 100, 0, 100), 64, 8, compress_cache=True),
}


def base_name(model: str) -> str:
    """The OPT a model directory is shaped like: ``opt-30b-12of48`` (opt-30b, 12 of its 48 layers) -> opt-30b."""
    return "-".join(model.split("-")[:2])


def policy(model: str, name: str) -> Policy:
    """The published policy for ``model`` (a truncated ``opt-30b-12of48`` takes opt-30b's)."""
    key = (base_name(model), name)
    if key not in PUBLISHED:
        known = ", ".join(f"{m} {p}" for m, p in PUBLISHED)
        raise SystemExit(f"no published FlexGen policy {name!r} for {model}; known: {known}")
    return PUBLISHED[key]


def _shares(gpu: int, cpu: int) -> str:
    disk = 100 - gpu - cpu
    parts = [f"{t}={v}" for t, v in (("device", gpu), ("host", cpu), ("disk", disk)) if v]
    return ",".join(parts)


def flexgen_args(model: str, p: Policy, prompt_len: int, gen_len: int, offload_dir: str, log_file: str) -> list[str]:
    """``python -m flexgen.flex_opt`` arguments for policy ``p`` on dummy weights."""
    args = ["--model", f"facebook/{base_name(model)}", "--path", "_DUMMY_"]
    args += ["--percent", *map(str, p.percent)]
    args += ["--gpu-batch-size", str(p.gpu_batch_size), "--num-gpu-batches", str(p.num_gpu_batches)]
    args += ["--prompt-len", str(prompt_len), "--gen-len", str(gen_len), "--overlap", str(p.overlap)]
    args += ["--cpu-cache-compute"] * p.cpu_cache_compute
    args += ["--compress-weight"] * p.compress_weight + ["--compress-cache"] * p.compress_cache
    return args + ["--offload-dir", offload_dir, "--log-file", log_file]


def cpu_cache_compute_flag() -> list[str]:
    """How this checkout's `flexrun bench` takes host-side attention: a flag, a choice (``on``), or not at
    all (an empty list: the run then computes attention on the device, and gpu.sh says so)."""
    import click

    from flexrun.cli import cli

    bench = cli.commands["bench"]  # type: ignore[attr-defined]
    for param in bench.params:
        if param.name == "cpu_cache_compute":
            if getattr(param, "is_flag", False):
                return ["--cpu-cache-compute"]
            if isinstance(param.type, click.Choice) and "on" in param.type.choices:
                return ["--cpu-cache-compute", "on"]
    return []


def flexrun_args(p: Policy, host_attention: list[str]) -> list[str]:
    """`flexrun bench` placement arguments for policy ``p`` (``host_attention`` from cpu_cache_compute_flag)."""
    w, c, a = p.percent[0:2], p.percent[2:4], p.percent[4:6]
    args = ["--placement", "manual", "--weights", _shares(*w), "--cache", _shares(*c), "--activations", _shares(*a)]
    args += ["--gpu-batch-size", str(p.gpu_batch_size), "--num-gpu-batches", str(p.num_gpu_batches)]
    args += ["--overlap" if p.overlap else "--no-overlap"]
    args += ["--compress-weight", "int4", "--group-size", "64"] if p.compress_weight else ["--compress-weight", "none"]
    args += ["--compress-cache", "int4" if p.compress_cache else "none"]
    return args + (host_attention if p.cpu_cache_compute else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("side", choices=["flexgen", "flexrun", "describe"])
    ap.add_argument("model")
    ap.add_argument("policy", choices=["fp16", "comp"])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--offload-dir", default="/tmp/flexgen-offload")
    ap.add_argument("--log-file", default="/tmp/flexgen.log")
    a = ap.parse_args()
    p = policy(a.model, a.policy)
    if a.side == "flexgen":
        out = flexgen_args(a.model, p, a.prompt_len, a.gen_len, a.offload_dir, a.log_file)
    elif a.side == "flexrun":
        host_attention = cpu_cache_compute_flag()
        if p.cpu_cache_compute and not host_attention:
            print(
                "note: this flexrun's bench has no --cpu-cache-compute: attention over the host-resident cache "
                "runs on the device (FlexGen's policy computes it on the CPU)",
                file=sys.stderr,
            )
        out = flexrun_args(p, host_attention)
    else:
        out = [" ".join(flexgen_args(a.model, p, a.prompt_len, a.gen_len, "DIR", "LOG")[:-4])]
    print("\n".join(out))


if __name__ == "__main__":
    main()
