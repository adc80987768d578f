"""Throughput vs latency from a sweep CSV (sweep.sh): `python plot_frontier.py SWEEP.csv OUT.png`.

One series per placement, each point labelled with its block size; the dashed line is the Pareto frontier
over all points (no other point has both lower latency and higher throughput).
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        rows = list(csv.DictReader(f))
    series: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for r in rows:
        series[r["placement"]].append((float(r["latency_s"]), float(r["total_tok_s"]), int(r["block"])))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, pts in series.items():
        pts.sort(key=lambda p: p[2])  # along the block size
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        for lat, tput, block in pts:
            ax.annotate(str(block), (lat, tput), textcoords="offset points", xytext=(4, 4), fontsize=8)
    frontier, best = [], 0.0
    for lat, tput, _ in sorted(p for pts in series.values() for p in pts):
        if tput > best:
            frontier.append((lat, tput))
            best = tput
    ax.plot([p[0] for p in frontier], [p[1] for p in frontier], "k--", lw=1, label="frontier")
    r0 = rows[0]
    ax.set_title(
        f"flexrun {r0['model']} ({r0['dtype']}), prompt {r0['prompt_len']}, gen {r0['gen_len']}: block size at each point"
    )
    ax.set_xlabel("latency of one block (s)")
    ax.set_ylabel("throughput (generated tokens/s)")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    main()
