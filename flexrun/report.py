"""The FlexGen-style summary that ``generate`` and ``bench`` print, as text and as a dict for --json."""

from __future__ import annotations

from typing import Any

from flexrun.config import OptConfig
from flexrun.placement import Placement
from flexrun.runtime.engine import RunStats
from flexrun.units import format_bytes


def summary_dict(cfg: OptConfig, placement: Placement, stats: RunStats) -> dict[str, Any]:
    return {
        "model": cfg.name,
        "dtype": cfg.dtype,
        "model_bytes": cfg.model_bytes(),
        "placement": placement.to_dict(),
        "sequences": stats.sequences,
        "blocks": stats.blocks,
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "decode_steps": stats.decode_steps,
        **stats.throughput(),
        "disk_bytes_read": stats.disk_bytes_read,
        "direct_io": stats.direct_io,
        "peak_rss_bytes": stats.peak_rss,
        "planned_bytes": {tier: sum(v.values()) for tier, v in stats.planned.items()},
        "budget_bytes": stats.budgets,
    }


def summary_text(cfg: OptConfig, placement: Placement, stats: RunStats) -> str:
    t = stats.throughput()
    planned = {tier: sum(v.values()) for tier, v in stats.planned.items()}
    per_step = stats.decode_s / stats.decode_steps if stats.decode_steps else 0.0
    io = {True: "O_DIRECT", False: "buffered (page cache may flatter it)", None: "none"}[stats.direct_io]
    lines = [
        f"model: {cfg.name} ({cfg.dtype}, {format_bytes(cfg.model_bytes())})",
        f"placement: {placement.describe()}",
        f"sequences: {stats.sequences} in {stats.blocks} block(s)",
        f"prefill latency: {stats.prefill_s:.3f} s  prefill throughput: {t['prefill_tok_s']:.2f} token/s",
        f"decode latency: {stats.decode_s:.3f} s ({per_step:.3f} s/step)  decode throughput: {t['decode_tok_s']:.2f} token/s",
        f"total latency: {stats.total_s:.3f} s  total throughput: {t['total_tok_s']:.2f} token/s",
        f"disk read: {format_bytes(stats.disk_bytes_read)} ({io})",
        "planned memory: " + ", ".join(f"{tier} {format_bytes(b)}" for tier, b in planned.items() if b),
        f"peak resident memory (measured): {format_bytes(stats.peak_rss)}",
    ]
    return "\n".join(lines)
