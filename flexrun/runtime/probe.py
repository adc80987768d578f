"""Timing one real decoder layer of a model, the figure the planner's first-use correction of its compute
rests on (``costmodel.layerprobe``, cached by ``jobs.layerprobe``).

The layer is the engine's: a ``FusedLayer`` with the engine's kernel set and KV format on the compute device,
its matrices random in the stored dtype and its vectors in the compute dtype (as the engine holds them), run
under inference mode as the engine runs a step. Masks and rotary angles are made once outside the clock (the
engine makes them once a step for every layer).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexrun.config import OptConfig
from flexrun.costmodel.layerprobe import ProbeShape
from flexrun.errors import ConfigError
from flexrun.kernels import positions as P
from flexrun.kernels import select_kernels
from flexrun.runtime.kvformat import kv_format
from flexrun.runtime.layer import FusedLayer, LayerSpec, LayerWeights, Rotary
from flexrun.runtime.tiers import compute_device
from flexrun.weights.store import TORCH_DTYPES

# Calls timed after the warm-up: at least MIN_CALLS, more while they add up to less than SPEND_S (then the median).
MIN_CALLS = 2
SPEND_S = 0.3
MAX_CALLS = 20
_TILE = 1 << 16  # random values generated per tensor; the rest repeats them (filling GiBs stays a copy)


@dataclass(frozen=True)
class LayerTimes:
    """Seconds of one probed layer call (the median of the timed calls) and of the whole probe."""

    prefill_s: float
    decode_s: float  # 0.0: no decode step probed
    total_s: float


def time_layer(cfg: OptConfig, shape: ProbeShape, device: torch.device | None = None) -> LayerTimes:
    """Time layer 0 of ``cfg`` (its compute dtype resolved) at ``shape`` on ``device`` (the compute device).
    A mixture-of-experts layer is refused: its experts stream through the engine's own arenas."""
    if cfg.moe:
        raise ConfigError(f"{cfg.name}: a mixture-of-experts layer is not probed")
    start = time.perf_counter()
    device = device or compute_device()
    dtype, stored = TORCH_DTYPES[cfg.run_dtype], TORCH_DTYPES[cfg.dtype]
    kv = kv_format(stored, cfg.n_kv_head, cfg.head_dim)
    layer = FusedLayer(LayerSpec.from_config(cfg, 0), select_kernels(device), kv)
    gen = torch.Generator().manual_seed(0)
    weights = LayerWeights.from_slots(
        {
            name: _random(shape_, stored, device, gen, scale=shape_[1] ** -0.5)
            if len(shape_) == 2
            else torch.ones(shape_, dtype=dtype, device=device)
            for name, shape_ in cfg.layer_shapes().items()
        }
    )
    rope = P.Rope(cfg) if cfg.position == "rotary" else None
    with torch.inference_mode():
        prefill = _call(cfg, layer, weights, rope, shape.rows, shape.prompt_len, 0, device, gen)
        prefill_s = _median_time(prefill, device)
        decode_s = 0.0
        if shape.decode_rows:
            decode = _call(cfg, layer, weights, rope, shape.decode_rows, 1, shape.context, device, gen)
            decode_s = _median_time(decode, device)
    return LayerTimes(prefill_s, decode_s, time.perf_counter() - start)


def _call(
    cfg: OptConfig,
    layer: FusedLayer,
    weights: LayerWeights,
    rope: P.Rope | None,
    rows: int,
    new: int,
    past: int,
    device: torch.device,
    gen: torch.Generator,
) -> Callable[[], torch.Tensor]:
    """One layer call over ``rows`` sequences of ``new`` tokens after ``past`` cached ones, ready to repeat
    (each repeat writes the same cache rows)."""
    dtype = TORCH_DTYPES[cfg.run_dtype]
    t = past + new
    k_slot = layer.kv.slot(_random((t * layer.kv.row_elems(rows),), layer.kv.dtype, device, gen), t, rows)
    v_slot = layer.kv.slot(_random((t * layer.kv.row_elems(rows),), layer.kv.dtype, device, gen), t, rows)
    valid = torch.ones(rows, t, dtype=torch.bool, device=device)
    positions = torch.arange(t, device=device).expand(rows, t)  # (b, t)
    mask = P.additive_mask(valid, new, dtype, layer.spec.window)  # (b, 1, new, t)
    if cfg.position == "alibi":
        mask = mask + P.alibi_bias(positions, cfg.n_head, dtype)  # (b, nh, new, t)
    rotary: Rotary | None = rope.cos_sin(positions[:, past:], dtype) if rope is not None else None  # (b, 1, new, r)
    x = _random((rows, new, cfg.hidden_size), dtype, device, gen)  # (b, new, h)
    return lambda: layer(weights, x, layer.cached_core(k_slot, v_slot, past, mask), rotary)


def _random(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator, scale: float = 1.0
) -> torch.Tensor:
    """A tensor of normal values x ``scale``: ``_TILE`` of them drawn, repeated over the rest (a layer's
    weights are GiBs for the largest models; drawing each value would take longer than the probe)."""
    n = math.prod(shape)
    tile = (torch.randn(min(n, _TILE), generator=gen) * scale).to(device, dtype)
    out = torch.empty(n, dtype=dtype, device=device)
    whole = n // tile.numel() * tile.numel()
    out[:whole].view(-1, tile.numel()).copy_(tile.expand(whole // tile.numel(), -1))
    out[whole:].copy_(tile[: n - whole])
    return out.view(shape)


def _median_time(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``: the median of ``MIN_CALLS`` or more timed calls after a warm-up."""

    def timed() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()
    times = [timed() for _ in range(MIN_CALLS)]
    while sum(times) < SPEND_S and len(times) < MAX_CALLS:
        times.append(timed())
    return statistics.median(times)
