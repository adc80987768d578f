"""Evaluating the cost model: the predicted times, throughput and peak memory of one placement.

``cost_terms`` (``costmodel.equations``) gives every figure as an affine function of the nine shares; this
module evaluates them at a placement's shares, exactly as the LP in ``costmodel.search`` constrains them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flexrun.config import OptConfig
from flexrun.costmodel.equations import KINDS, CostTerms, Key, PhaseTerms, compressed_fraction, compression, cost_terms
from flexrun.costmodel.hardware import HardwareSpec
from flexrun.costmodel.hotset import derived_shares
from flexrun.placement import TIERS, Placement


@dataclass(frozen=True)
class PhaseTime:
    """One phase's seconds per layer: the total, each link, compute, and what bounds it."""

    seconds: float
    links: dict[str, float]
    compute: float
    host_compute: float
    bottleneck: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds_per_layer": self.seconds,
            "links": self.links,
            "compute": self.compute,
            "host_compute": self.host_compute,
            "bottleneck": self.bottleneck,
        }


@dataclass(frozen=True)
class Prediction:
    """Predicted times, throughput and peak memory of one placement."""

    prefill: PhaseTime
    decode: PhaseTime
    prefill_s: float  # the block's prefill: layers x seconds per layer
    decode_s: float  # the block's gen_len - 1 decode steps
    peak: dict[str, int]  # bytes per tier (disk: the offload dir)
    disk_weight_bytes: int  # weights read in place from the tensor store
    step_weight_reads: int  # of them, the bytes a decode step reads (the hot set resident, tables by rows)
    block_size: int
    prompt_len: int
    gen_len: int

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def throughput(self) -> float:
        """Generated tokens per second over the whole generation, FlexGen's headline figure; of a scorer's pass
        (``gen_len`` 0), the tokens read per second."""
        tokens = self.gen_len or self.prompt_len
        return tokens * self.block_size / self.total_s if self.total_s > 0 else 0.0

    @property
    def prefill_throughput(self) -> float:
        return self.prompt_len * self.block_size / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_throughput(self) -> float:
        """Tokens per second of the decode steps (0 when ``gen_len`` is 1: there are none)."""
        steps = self.gen_len - 1
        return steps * self.block_size / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def bottleneck(self) -> str:
        """What bounds the phase that takes longer overall, e.g. ``decode: disk->host``."""
        phase, t = ("decode", self.decode) if self.decode_s >= self.prefill_s else ("prefill", self.prefill)
        return f"{phase}: {t.bottleneck}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "total_s": self.total_s,
            "throughput_tok_s": self.throughput,
            "prefill_throughput_tok_s": self.prefill_throughput,
            "decode_throughput_tok_s": self.decode_throughput,
            "bottleneck": self.bottleneck,
            "prefill_per_layer": self.prefill.to_dict(),
            "decode_per_layer": self.decode.to_dict(),
            "peak_bytes": self.peak,
            "disk_weight_bytes": self.disk_weight_bytes,
            "step_weight_read_bytes": self.step_weight_reads,
        }


def _phase_time(terms: PhaseTerms, shares: Mapping[Key, float], overlap: bool) -> PhaseTime:
    links = {name: a.value(shares) for name, a in terms.links.items()}
    compute, host_compute = terms.compute.value(shares), terms.host_compute.value(shares)
    paths = {
        "read": links["disk->host"] + links["host->device"],
        "write": links["device->host"] + links["host->disk"],
        "compute": compute + host_compute,
    }
    seconds = max(paths.values()) if overlap else sum(paths.values())
    worst = max(paths, key=lambda k: paths[k])
    if worst == "read":
        name = max(("disk->host", "host->device"), key=lambda k: links[k])
    elif worst == "write":
        name = max(("device->host", "host->disk"), key=lambda k: links[k])
    else:
        name = "host attention" if host_compute > compute else "compute"
    return PhaseTime(seconds, links, compute, host_compute, name)


def evaluate(terms: CostTerms, shares: Mapping[Key, float], overlap: bool = True) -> Prediction:
    """The prediction of ``terms`` at these shares."""
    shares = derived_shares(terms.derived, shares)
    pre = _phase_time(terms.prefill, shares, overlap)
    dec = _phase_time(terms.decode, shares, overlap)
    l = terms.num_layers
    return Prediction(
        prefill=pre,
        decode=dec,
        prefill_s=l * pre.seconds,
        decode_s=l * terms.decode_steps * dec.seconds,
        peak={tier: int(round(a.value(shares))) for tier, a in terms.memory.items()},
        disk_weight_bytes=int(round(terms.disk_weights.value(shares))),
        step_weight_reads=int(round(terms.step_reads.value(shares))),
        block_size=terms.block_size,
        prompt_len=terms.prompt_len,
        gen_len=terms.gen_len,
    )


def kind_bytes(
    cfg: OptConfig,
    block_size: int,
    prompt_len: int,
    gen_len: int,
    compress_weight: bool | str,
    compress_cache: bool | str,
) -> dict[str, int]:
    """Bytes of all weights, of the block's KV cache and of one layer boundary's activations."""
    cw, cc = compression(compress_weight), compression(compress_cache)
    seq = prompt_len + gen_len
    return {
        "weights": int(cfg.model_bytes() * (compressed_fraction(cfg.dtype_bytes, cw) if cw else 1.0)),
        "cache": int(cfg.cache_bytes(block_size, seq) * (compressed_fraction(cfg.dtype_bytes, cc) if cc else 1.0)),
        "activations": cfg.hidden_bytes(block_size, seq),
    }


def placement_shares(placement: Placement, device_is_host: bool = False) -> dict[Key, float]:
    """The nine shares of ``placement``; on a CPU-only machine device shares count as host (as the runtime)."""
    shares: dict[Key, float] = {}
    for kind in KINDS:
        s = getattr(placement, kind)
        for tier in TIERS:
            shares[(kind, tier)] = s.get(tier)
        if device_is_host:
            shares[(kind, "host")] += shares[(kind, "device")]
            shares[(kind, "device")] = 0.0
    return shares


def predict(cfg: OptConfig, hw: HardwareSpec, placement: Placement, prompt_len: int, gen_len: int) -> Prediction:
    """Predicted prefill/decode time, throughput and peak memory per tier of ``placement``."""
    terms = cost_terms(
        cfg,
        hw,
        placement.gpu_batch_size,
        placement.num_gpu_batches,
        prompt_len,
        gen_len,
        compress_weight=placement.compress_weight,
        compress_cache=placement.compress_cache,
        cpu_cache_compute=placement.cpu_cache_compute,
    )
    return evaluate(terms, placement_shares(placement, hw.device_is_host), overlap=placement.overlap)
