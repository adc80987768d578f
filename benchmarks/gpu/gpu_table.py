"""gpu.sh's tables: `python gpu_table.py RUNS.jsonl` prints, in Markdown, every side's median per model and the
ratios the issue's targets are stated in.

Each line of RUNS.jsonl is one run (flexrun bench --json, flexgen_run.py or accelerate_run.py), tagged by
gpu.sh with "case" (the model directory: opt-6.7b, opt-30b-12of48), "side" (flexrun, flexgen, accelerate)
and "policy" (fp16 / comp: FlexGen's published policy of that name; fp16-nocap / comp-nocap: the same
with the GPU cap lifted, after flexrun refused it or ran out of memory under the cap; own: flexrun's
planner; b=N: accelerate's batch), and with capped.py's GPU figures. A line with "failed" is a run that did not finish
(its exit status and last error line): it is listed, never counted.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from typing import Any

GIB = 2**30
LABEL = {
    "fp16": "FlexGen's policy",
    "comp": "FlexGen's policy, compressed",
    "own": "its own plan",
    "fp16-nocap": "FlexGen's policy, the GPU cap lifted",
    "comp-nocap": "FlexGen's policy, compressed, the GPU cap lifted",
}


def label(side: str, policy: str) -> str:
    if side == "accelerate":
        return f"accelerate {policy}"
    return f"{side}, {LABEL.get(policy, policy)} ({policy})"


def block(run: dict[str, Any]) -> str:
    pl = run.get("placement")
    if pl:
        return f"{pl['gpu_batch_size']} x {pl['num_gpu_batches']}"
    if "gpu_batch_size" in run:
        return f"{run['gpu_batch_size']} x {run['num_gpu_batches']}"
    return str(run.get("batch", "?"))


def median(runs: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "failed" not in r]
    tok = [r["total_tok_s"] for r in ok]
    return {
        "ok": ok,
        "failed": [r for r in runs if "failed" in r],
        "tok_s": statistics.median(tok) if tok else float("nan"),
        "runs": ", ".join(f"{t:.2f}" for t in tok),
        "decode_tok_s": median(ok, "decode_tok_s"),
        "prefill_s": median(ok, "prefill_s"),
        "peak": median(ok, "gpu_peak_bytes") / GIB,
        "cap": median(ok, "gpu_cap_bytes") / GIB,
        "block": block(ok[-1]) if ok else "-",
    }


def num(x: float, fmt: str = ".2f") -> str:
    return "-" if x != x else format(x, fmt)  # x != x: NaN, nothing measured


def ratio(a: float, b: float) -> str:
    return f"**{a / b:.2f}x**" if a == a and b == b and b > 0 else "-"  # a == a: not NaN


def main() -> None:
    groups: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    with open(sys.argv[1]) as f:
        for run in (json.loads(line) for line in f if line.strip()):
            groups[run["case"]][(run["side"], run["policy"])].append(run)
    print(
        "| model | side | block | runs ok | total tok/s: median (runs) | decode tok/s | prefill s | GPU peak / cap GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    sums: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for case, sides in groups.items():
        sums[case] = {k: summarize(v) for k, v in sides.items()}
        for (side, policy), s in sums[case].items():
            fails = f" (+{len(s['failed'])} failed)" if s["failed"] else ""
            print(
                f"| {case} | {label(side, policy)} | {s['block']} | {len(s['ok'])}{fails} | {num(s['tok_s'])} "
                f"({s['runs']}) | {num(s['decode_tok_s'])} | {num(s['prefill_s'])} | {num(s['peak'])} / {num(s['cap'])} |"
            )
    print()
    print("| model | comparison | ratio of total tok/s |")
    print("|---|---|---|")
    for case, s in sums.items():
        tok = {k: v["tok_s"] for k, v in s.items() if v["ok"]}
        acc = {k: v for k, v in tok.items() if k[0] == "accelerate"}
        best_acc = max(acc.items(), key=lambda kv: kv[1]) if acc else None
        for policy in ("fp16", "comp"):
            if ("flexrun", policy) in tok or ("flexgen", policy) in tok:
                flexrun, flexgen = (
                    tok.get(("flexrun", policy), float("nan")),
                    tok.get(("flexgen", policy), float("nan")),
                )
                print(f"| {case} | flexrun / flexgen, both on FlexGen's {policy} policy | {ratio(flexrun, flexgen)} |")
            if ("flexrun", f"{policy}-nocap") in tok:
                lifted = tok[("flexrun", f"{policy}-nocap")]
                print(
                    f"| {case} | flexrun with the GPU cap lifted / flexgen under it, FlexGen's {policy} policy "
                    f"(not like for like) | {ratio(lifted, tok.get(('flexgen', policy), float('nan')))} |"
                )
        fg = [v for k, v in tok.items() if k[0] == "flexgen"]
        own = tok.get(("flexrun", "own"), float("nan"))
        if fg:
            print(f"| {case} | flexrun's own plan / flexgen's best published policy | {ratio(own, max(fg))} |")
        if best_acc:
            name = best_acc[0][1]
            capped = [v for k, v in tok.items() if k[0] == "flexrun" and not k[1].endswith("-nocap")]
            best_fr = max(capped, default=float("nan"))
            print(
                f"| {case} | flexrun's best / accelerate at its best batch ({name}) | {ratio(best_fr, best_acc[1])} |"
            )
    failed = [(case, k, r) for case, s in sums.items() for k, v in s.items() for r in v["failed"]]
    if failed:
        print()
        for case, (side, policy), r in failed:
            print(f"- failed: {case}, {label(side, policy)}: {r['failed']}")


if __name__ == "__main__":
    main()
