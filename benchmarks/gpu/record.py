"""`python record.py RUNS.jsonl CASE SIDE POLICY STATUS STDOUT STDERR PEAK.json`: append one run to RUNS.jsonl.

The run's result is the last line of STDOUT that is a JSON object (flexgen prints its own progress on
stdout too); it is tagged with CASE, SIDE and POLICY and given capped.py's GPU figures from PEAK.json.
A run that exited non-zero or printed no result is recorded as failed, with its exit status and the last
line of STDERR, so the table lists it and counts it nowhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def main() -> None:
    runs, case, side, policy, status, out, err, peak = sys.argv[1:9]
    result = last_json(Path(out).read_text(errors="replace"))
    tags = {"case": case, "side": side, "policy": policy}
    gpu = json.loads(Path(peak).read_text()) if Path(peak).is_file() else {}
    if status != "0" or result is None or "total_tok_s" not in result:
        lines = [x for x in Path(err).read_text(errors="replace").splitlines() if x.strip()]
        why = lines[-1].strip() if lines else "no output"
        result = {"failed": f"exit {status}: {why[:300]}"}
    with open(runs, "a") as f:
        f.write(json.dumps({**result, **gpu, **tags}) + "\n")
    print(f"  {side} {policy}: " + (result["failed"] if "failed" in result else f"{result['total_tok_s']:.2f} tok/s"))


if __name__ == "__main__":
    main()
