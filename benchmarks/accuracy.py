"""The cost model's prediction against measured runs: `python accuracy.py RUNS.jsonl [HARDWARE]`.

RUNS.jsonl holds `flexrun bench --json` lines (accuracy.sh runs them). Each line carries what the planner
predicted for that run, with the spec it held just before the run (this machine's calibration, as
corrected by the runs recorded until then); given HARDWARE (a preset or a spec file, or `uncorrected`:
this machine's calibration as measured, before any run corrected it), the runs are predicted again with
that spec instead. The table shows predicted and measured total throughput, prefill
time and decode step, and the error (predicted / measured - 1) of each.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's flexrun
from flexrun.costmodel.hardware import load_hardware  # noqa: E402
from flexrun.costmodel.machine import base_spec, machine_calibration  # noqa: E402
from flexrun.costmodel.prediction import predict  # noqa: E402
from flexrun.placement import Placement, Shares  # noqa: E402
from flexrun.resolver import resolve  # noqa: E402

OFFLOAD = "/tmp/flexrun-bench/offload"  # where accuracy.sh's runs offload (the disk they were measured on)


def main() -> None:
    hw = None
    if len(sys.argv) > 2 and sys.argv[2] == "uncorrected":  # this machine's calibration before any run corrected it
        entry = machine_calibration(OFFLOAD, calibrate_missing=False)
        assert entry is not None, "no calibration for this machine in $FLEXRUN_CACHE_DIR"
        hw = base_spec(entry, OFFLOAD)
    elif len(sys.argv) > 2:
        hw = load_hardware(sys.argv[2])
    if hw is not None:
        print(f"hardware: {hw.name}: {hw.source}")
    print(
        "| model | placement | predicted tok/s | measured tok/s | error | prefill s pred/meas | decode s/step pred/meas | bottleneck |"
    )
    print("|---|---|---|---|---|---|---|---|")
    errors, step_errors, sources = [], [], []
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
        roof = run.get("roofline", {})
        if hw is None and "predicted_total_tok_s" in roof:
            total_p, prefill_p = roof["predicted_total_tok_s"], roof["predicted_prefill_s"]
            step_p, bound = roof["predicted_decode_step_s"], roof["bottleneck"]
            sources.append(roof["hardware_source"])
        else:
            pr = predict(cfg, hw or load_hardware("cpu"), placement, prompt_len, gen_len)
            total_p, prefill_p, step_p, bound = (
                pr.throughput,
                pr.prefill_s,
                pr.decode_s / max(gen_len - 1, 1),
                pr.bottleneck,
            )
        err = total_p / run["total_tok_s"] - 1
        step_m = run["decode_s"] / run["decode_steps"]
        errors.append(abs(err))
        step_errors.append(abs(step_p / step_m - 1))
        print(
            f"| {run['model']} {run['dtype']} | {placement.describe().replace(' | ', '; ')} | {total_p:.2f} | {run['total_tok_s']:.2f} | "
            f"{err:+.0%} | {prefill_p:.2f} / {run['prefill_s']:.2f} | {step_p:.3f} / {step_m:.3f} | {bound} |"
        )
    for name, errs in (("total throughput", errors), ("decode step", step_errors)):
        print(
            f"\n|error| of {name}: median {statistics.median(errs):.0%}, max {max(errs):.0%}, "
            f"within 15%: {sum(e <= 0.15 for e in errs)}/{len(errs)}, within 25%: {sum(e <= 0.25 for e in errs)}/{len(errs)}"
        )
    if sources:
        print(f"\nhardware (first run): {sources[0]}\nhardware (last run): {sources[-1]}")


if __name__ == "__main__":
    main()
