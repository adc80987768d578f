"""The run summary that ``generate``, ``bench`` and ``embed`` print, as text and as a dict for --json, and
``bench``'s roofline."""

from __future__ import annotations

from typing import Any

from flexrun.config import OptConfig
from flexrun.costmodel.hardware import HardwareSpec
from flexrun.costmodel.prediction import predict
from flexrun.placement import TIERS, Placement
from flexrun.runtime.stats import RunStats
from flexrun.units import format_bytes


def summary_dict(cfg: OptConfig, placement: Placement, stats: RunStats) -> dict[str, Any]:
    return {
        "model": cfg.name,
        "dtype": cfg.dtype,
        "compute_dtype": cfg.run_dtype,
        "model_bytes": cfg.model_bytes(),
        "placement": placement.to_dict(),
        "sequences": stats.sequences,
        "blocks": stats.blocks,
        "prompt_tokens": stats.prompt_tokens,
        "input_tokens": stats.input_tokens,
        "prefilled_tokens": stats.prefilled_tokens,
        "generated_tokens": stats.generated_tokens,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "decode_steps": stats.decode_steps,
        "first_token_s": stats.first_token_s,
        "decode_cpu_s": stats.decode_cpu_s,
        **stats.throughput(),
        "disk_bytes_read": stats.disk_bytes_read,
        "decode_bytes_read": stats.decode_bytes_read,
        **_experts(cfg, stats),
        **_collectives(stats),
        "direct_io": stats.direct_io,
        "peak_rss_bytes": stats.peak_rss,
        "peak_device_bytes": stats.peak_device,
        "base_rss_bytes": stats.base_rss,
        "planned_bytes": {tier: sum(v.values()) for tier, v in stats.planned.items()},
        "budget_bytes": stats.budgets,
        "budget_sources": stats.budget_sources,
        "planned_peak_rss_bytes": stats.planned_peak,
    }


def _collectives(stats: RunStats) -> dict[str, Any]:
    """Tensor parallelism's collectives: their count, seconds and share of the run."""
    if not stats.collectives:
        return {}
    share = stats.collective_s / stats.total_s if stats.total_s > 0 else 0.0
    return {"collectives": stats.collectives, "collective_s": stats.collective_s, "collective_share": share}


def _experts(cfg: OptConfig, stats: RunStats) -> dict[str, Any]:
    """A mixture of experts' experts per layer and those a decode step read per layer, on average."""
    if not cfg.moe:
        return {}
    per_step = stats.experts_read / stats.expert_loads if stats.expert_loads else 0.0
    return {"num_experts": cfg.num_experts, "experts_read_per_layer_step": per_step}


def _shared(stats: RunStats) -> str:
    """The prompt tokens prefilled, where shared prefixes made them fewer than the prompts hold."""
    if stats.prefilled_tokens >= stats.input_tokens:
        return ""
    return f"; {stats.prefilled_tokens} of their {stats.input_tokens} prompt tokens prefilled (shared prefixes once)"


def computed_in(cfg: OptConfig) -> str:
    """ " computed in X" when the arithmetic runs in another dtype than the weights are stored in, else ""."""
    return f" computed in {cfg.run_dtype}" if cfg.run_dtype != cfg.dtype else ""


def summary_line(cfg: OptConfig, placement: Placement, stats: RunStats, new_tokens: int) -> str:
    """One line for a person: the tokens generated, how fast, and where the weights were."""
    rate = new_tokens / stats.total_s if stats.total_s > 0 else 0.0
    where = ", ".join(f"{t} {placement.weights.get(t) * 100:g}%" for t in TIERS if placement.weights.get(t) > 0)
    packed = f" {placement.compress_weight}" if placement.compress_weight else ""
    return (
        f"{new_tokens} tokens in {stats.total_s:.1f} s ({rate:.1f} tok/s) from {cfg.name}; "
        f"weights{packed} on {where} (--verbose for the full report)"
    )


def summary_text(cfg: OptConfig, placement: Placement, stats: RunStats, pooling: str | None = None) -> str:
    """The summary as lines of text. With ``pooling``, of an encode (``embed``): one pass, no KV cache."""
    io = {True: "O_DIRECT", False: "buffered (page cache may flatter it)", None: "none"}[stats.direct_io]
    planned = {tier: sum(v.values()) for tier, v in stats.planned.items()}
    size = format_bytes(cfg.model_bytes())
    if pooling is None:
        t = stats.throughput()
        per_step = stats.decode_s / stats.decode_steps if stats.decode_steps else 0.0
        lines = [
            f"model: {cfg.name} ({cfg.dtype}{computed_in(cfg)}, {size})",
            f"placement: {placement.describe()}",
            f"sequences: {stats.sequences} in {stats.blocks} block(s)" + _shared(stats),
            f"time to first token: {stats.first_token_s:.3f} s",
            f"prefill latency: {stats.prefill_s:.3f} s  prefill throughput: {t['prefill_tok_s']:.2f} token/s",
            f"decode latency: {stats.decode_s:.3f} s ({per_step:.3f} s/step)  decode throughput: "
            f"{t['decode_tok_s']:.2f} token/s",
            f"total latency: {stats.total_s:.3f} s  total throughput: {t['total_tok_s']:.2f} token/s",
        ]
    else:
        rate = stats.input_tokens / stats.prefill_s if stats.prefill_s > 0 else 0.0
        lines = [
            f"model: {cfg.name} ({cfg.arch}, {cfg.dtype}{computed_in(cfg)}, {size}); pooling: {pooling}",
            # An encoder keeps no KV cache: its placement is the weights, the activations and the batching.
            f"placement: weights {placement.weights.spec()} | activations {placement.activations.spec()} | "
            f"batch {placement.gpu_batch_size} x {placement.num_gpu_batches}"
            + ("" if placement.overlap else " | no-overlap"),
            f"sequences: {stats.sequences} in {stats.blocks} block(s), {stats.input_tokens} tokens "
            f"({stats.prompt_tokens} with padding)",
            f"latency: {stats.prefill_s:.3f} s  throughput: {rate:.2f} token/s",
        ]
    if stats.collectives:
        lines.append(
            f"tensor parallel: {stats.collectives} collectives, {stats.collective_s:.3f} s "
            f"({_collectives(stats)['collective_share']:.0%} of the run)"
        )
    if cfg.moe and pooling is None:
        per_step = _experts(cfg, stats)["experts_read_per_layer_step"]
        lines.append(f"experts: {per_step:.2f} of {cfg.num_experts} read per layer per decode step")
    lines += [
        f"disk read: {format_bytes(stats.disk_bytes_read)} ({io})"
        + (
            f", {format_bytes(stats.decode_bytes_read // stats.decode_steps)} per decode step"
            if stats.decode_steps and stats.decode_bytes_read
            else ""
        ),
        "planned memory: " + ", ".join(_planned(tier, b, stats) for tier, b in planned.items() if b),
        f"planned peak resident memory: {format_bytes(stats.planned_peak)} (the process's baseline "
        f"{format_bytes(max(stats.planned_peak - planned.get('host', 0), 0))} and the host tier's plan)",
        f"peak resident memory (measured): {format_bytes(stats.peak_rss)}, "
        f"{format_bytes(max(stats.peak_rss - stats.base_rss, 0))} over the {format_bytes(stats.base_rss)} "
        "held before the engine (interpreter, libraries)",
    ]
    if stats.peak_device:
        lines.append(device_peak_line(stats))
    return "\n".join(lines)


def device_peak_line(stats: RunStats) -> str:
    """The device's measured peak beside the device tier's plan and budget (a GPU run)."""
    planned = sum(stats.planned.get("device", {}).values())
    budget = stats.budgets.get("device")
    of = f" (budget {format_bytes(budget)})" if budget else ""
    return (
        f"peak device memory (measured, torch.cuda.max_memory_allocated): {format_bytes(stats.peak_device)}; "
        f"planned {format_bytes(planned)}{of}"
    )


def _planned(tier: str, nbytes: int, stats: RunStats) -> str:
    """A tier's planned bytes, its budget and where that came from."""
    if tier not in stats.budgets:
        return f"{tier} {format_bytes(nbytes)}"
    source = stats.budget_sources.get(tier)
    return f"{tier} {format_bytes(nbytes)} of {format_bytes(stats.budgets[tier])}" + (f" ({source})" if source else "")


def roofline(
    cfg: OptConfig, placement: Placement, stats: RunStats, hw: HardwareSpec, prompt_len: int, gen_len: int
) -> dict[str, Any]:
    """The lower bound on a decode step for this placement, from measured bandwidths and FLOP/s, and how
    far the measured step is from it.

    ``bound_s``: the cost model's decode step (the slowest of the read path, the write path and compute,
    or their sum without overlap). ``disk_bound_s``: the bytes this run read from disk per pass over the
    stack (measured) over the disk's read bandwidth: what weights and cache on disk cost at the very least.
    ``disk_read_bw``: the rate this run read them at over a decode step (bytes/s), to set beside the
    calibrated ``disk_to_host_bw`` the bound uses (a virtual disk's rate moves between the two).
    """
    pred = predict(cfg, hw, placement, prompt_len, gen_len)
    passes = stats.decode_steps + stats.blocks  # each block's prefill reads the stack once too
    disk_step = stats.disk_bytes_read // passes if passes else 0
    disk_bound = disk_step / hw.disk_to_host_bw
    bound = max(pred.decode.seconds * cfg.num_hidden_layers, disk_bound)
    measured = stats.decode_s / stats.decode_steps if stats.decode_steps else 0.0
    return {
        "hardware": hw.name,
        "bound_s": bound,
        "bottleneck": pred.decode.bottleneck if bound > disk_bound else "disk->host",
        "compute_s": (pred.decode.compute + pred.decode.host_compute) * cfg.num_hidden_layers,
        "disk_bytes_per_step": disk_step,
        "disk_bound_s": disk_bound,
        "disk_read_bw": disk_step / measured if measured > 0 else 0.0,
        "calibrated_disk_bw": hw.disk_to_host_bw,
        "measured_s": measured,
        "measured_over_bound": measured / bound if bound > 0 else 0.0,
        # What the planner predicted for this run (its spec as it stood before the run was recorded).
        "hardware_source": hw.source,
        "predicted_total_tok_s": pred.throughput,
        "predicted_prefill_s": pred.prefill_s,
        "predicted_decode_step_s": pred.decode_s / max(gen_len - 1, 1),
    }


def roofline_text(r: dict[str, Any]) -> str:
    text = (
        f"roofline ({r['hardware']}): decode step >= {r['bound_s']:.3f} s, bound by {r['bottleneck']} "
        f"(disk {format_bytes(r['disk_bytes_per_step'])}/step -> {r['disk_bound_s']:.3f} s; "
        f"compute {r['compute_s']:.3f} s); measured {r['measured_s']:.3f} s/step = "
        f"{r['measured_over_bound']:.2f}x the bound"
    )
    if r["disk_bytes_per_step"] and r["disk_read_bw"]:
        text += (
            f"; disk read at {format_bytes(int(r['disk_read_bw']))}/s in decode "
            f"(calibrated: {format_bytes(int(r['calibrated_disk_bw']))}/s)"
        )
    return text
