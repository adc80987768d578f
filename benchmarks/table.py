"""Medians of benchmark runs as table rows: `python table.py RUNS.jsonl [--compare]`.

Each line of RUNS.jsonl is one run: `flexrun bench --json` or a baseline runner's JSON, tagged with
"case" and "side" by the shell script. Rows: one per case (and side); with --compare, flexrun and each
baseline on the same row with the ratio flexrun / baseline of total throughput.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from typing import Any


def step_s(run: dict[str, Any]) -> float:
    return run["decode_s"] / run["decode_steps"] if run.get("decode_steps") else 0.0


def batch(run: dict[str, Any]) -> int:
    """Sequences per block: a baseline's batch, or flexrun's micro-batch size x count."""
    if "batch" in run:
        return int(run["batch"])
    pl = run.get("placement", {})
    return int(pl.get("gpu_batch_size", 0)) * int(pl.get("num_gpu_batches", 1))


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    med = statistics.median
    out = {
        "n": len(runs),
        "batch": max(batch(r) for r in runs),
        "tok_s": med(r["total_tok_s"] for r in runs),
        "step_s": med(step_s(r) for r in runs),
        "spread": (max(r["total_tok_s"] for r in runs) - min(r["total_tok_s"] for r in runs))
        / med(r["total_tok_s"] for r in runs),
    }
    roofs = [r["roofline"] for r in runs if "roofline" in r]
    if roofs:
        out["bound_s"] = med(x["bound_s"] for x in roofs)
        out["over_bound"] = med(x["measured_over_bound"] for x in roofs)
        out["disk_bound_s"] = med(x["disk_bound_s"] for x in roofs)
    return out


def main() -> None:
    path, compare = sys.argv[1], "--compare" in sys.argv
    groups: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    with open(path) as f:
        for run in (json.loads(line) for line in f if line.strip()):
            groups[run["case"]][run["side"]].append(run)
    if not compare:
        print(
            "| case | side | runs | total tok/s (median) | spread | decode s/step | roofline bound s/step | measured/bound |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for case, sides in groups.items():
            for side, runs in sides.items():
                s = summary(runs)
                roof = f"{s['bound_s']:.3f} | {s['over_bound']:.2f}x" if "bound_s" in s else "- | -"
                print(
                    f"| {case} | {side} | {s['n']} | {s['tok_s']:.2f} | {s['spread']:.0%} | {s['step_s']:.3f} | {roof} |"
                )
        return
    print(
        "| case | flexrun batch | flexrun tok/s | flexrun s/step | measured/bound | baseline | baseline batch "
        "| baseline tok/s | baseline s/step | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case, sides in groups.items():
        if "flexrun" not in sides:
            continue
        f = summary(sides["flexrun"])
        roof = f"{f['over_bound']:.2f}x" if "over_bound" in f else "-"
        for side, runs in sides.items():
            if side == "flexrun":
                continue
            b = summary(runs)
            print(
                f"| {case} | {f['batch']} | {f['tok_s']:.2f} (n={f['n']}) | {f['step_s']:.3f} | {roof} | {side} | "
                f"{b['batch']} | {b['tok_s']:.3f} (n={b['n']}) | {b['step_s']:.3f} | "
                f"**{f['tok_s'] / b['tok_s']:.2f}x** |"
            )


if __name__ == "__main__":
    main()
