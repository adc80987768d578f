"""The cost model's prediction against measured runs: `python accuracy.py RUNS.jsonl [HARDWARE.json]`.

RUNS.jsonl holds `flexrun bench --json` lines (accuracy.sh runs them). For each, flexrun's cost model
(flexrun.costmodel.equations.predict, with the calibrated hardware spec and the compute rates of the
model's dtype) predicts the same placement; the table shows predicted and measured total throughput,
prefill time and decode step, and the error (predicted / measured - 1).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's flexrun
from flexrun.costmodel.hardware import load_hardware  # noqa: E402
from flexrun.costmodel.prediction import predict  # noqa: E402
from flexrun.placement import Placement, Shares  # noqa: E402
from flexrun.resolver import resolve  # noqa: E402


def main() -> None:
    hw = load_hardware(sys.argv[2] if len(sys.argv) > 2 else None)
    print(f"hardware: {hw.name}: {hw.source}")
    print(
        "| model | placement | predicted tok/s | measured tok/s | error | prefill s pred/meas | decode s/step pred/meas | bottleneck |"
    )
    print("|---|---|---|---|---|---|---|---|")
    errors = []
    with open(sys.argv[1]) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    for run in runs:
        pd = run["placement"]
        placement = Placement(
            **{k: Shares(**pd[k]) for k in ("weights", "cache", "activations")},
            **{k: v for k, v in pd.items() if k not in ("weights", "cache", "activations")},
        )
        cfg = resolve(run["model"], dtype=run["dtype"])
        prompt_len = run["prompt_tokens"] // run["sequences"]
        gen_len = run["generated_tokens"] // run["sequences"]
        pr = predict(cfg, hw, placement, prompt_len, gen_len)
        err = pr.throughput / run["total_tok_s"] - 1
        errors.append(abs(err))
        step_p = pr.decode_s / max(gen_len - 1, 1)
        step_m = run["decode_s"] / run["decode_steps"]
        print(
            f"| {run['model']} {run['dtype']} | {placement.describe().replace(' | ', '; ')} | {pr.throughput:.2f} | {run['total_tok_s']:.2f} | "
            f"{err:+.0%} | {pr.prefill_s:.2f} / {run['prefill_s']:.2f} | {step_p:.3f} / {step_m:.3f} | {pr.bottleneck} |"
        )
    print(
        f"\n|error| of total throughput: median {statistics.median(errors):.0%}, max {max(errors):.0%}, "
        f"within 25%: {sum(e <= 0.25 for e in errors)}/{len(errors)}"
    )


if __name__ == "__main__":
    main()
