"""Kernel sets: the operations the fused layer computes with, chosen once per engine.

``select_kernels(device)`` returns the tuned CPU set on a CPU, the Triton set on a CUDA device when Triton
imports (``kernels.triton_set``, imported only then: Triton is an optional dependency), and the plain-torch
reference otherwise. A set's ``linear`` dispatches on the weight's type: a dense
tensor runs the set's matmul; another weight type (a compressed format, say) plugs in with
``register_linear`` and the layer code does not change, as gpt-fast's int4 Linear or vLLM's
``quant_method.apply`` do.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from flexrun.errors import FlexrunError
from flexrun.kernels import cpu, quantized, reference
from flexrun.kernels.reference import AddNormFn, NormFn
from flexrun.quant.formats import Int4Weight, Int8Weight, QuantSpec

#: A matrix slot's value: a dense tensor, or an object of a type registered with ``register_linear``.
Weight = Any
#: x (..., in), a weight of some registered type, an optional bias (out,) -> (..., out)
LinearFn = Callable[[torch.Tensor, Any, "torch.Tensor | None"], torch.Tensor]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
#: format, q (b, nh, s, d), key slot, value slot, length, mask, scale -> (b, nh, s, d): attention over rows
#: [0, length) of a KV format's slots, read in the format's own bytes
CacheAttentionFn = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor, float], torch.Tensor]

log = logging.getLogger(__name__)

# Linear implementations for weight types other than a dense tensor, by (type, device type); None: any.
_LINEARS: dict[tuple[type, str | None], LinearFn] = {}


def register_linear(weight_type: type, fn: LinearFn, device_type: str | None = None) -> None:
    """Make ``KernelSet.linear`` compute ``fn(x, w, b)`` for weights of ``weight_type`` (on ``device_type``
    devices only, or on all). Kernel sets selected afterwards pick it up."""
    _LINEARS[(weight_type, device_type)] = fn


@dataclass(frozen=True)
class KernelSet:
    """The operations one engine computes with; every set gives the reference's results."""

    name: str
    dense_linear: LinearFn
    norms: Mapping[str, NormFn]
    activations: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]
    cached_attention: AttentionFn
    #: x (b, s, heads, d), cos, sin (b, s, 1, rotary dims), interleaved -> x rotated (a set may write into x)
    apply_rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor] = reference.apply_rotary
    linears: Mapping[type, LinearFn] = field(default_factory=dict)
    #: A resident compressed weight in the layout this set computes it fastest in, derived once at load,
    #: and the bytes that layout adds over the canonical ones (by compression and shape), for the ledger.
    prepare: Callable[[Weight], Weight] = lambda w: w
    prepared_extra: Callable[[QuantSpec, tuple[int, ...]], int] = lambda spec, shape: 0
    #: the residual add and the norm after it, by norm kind: (x, delta, w, b, eps) -> (x + delta, its norm)
    add_norms: Mapping[str, AddNormFn] = field(default_factory=lambda: dict(reference.ADD_NORMS))
    #: attention over a KV format's slots, by format type; other formats: ``cached_attention`` over their read
    cache_attentions: Mapping[type, CacheAttentionFn] = field(default_factory=dict)

    def attend_cache(
        self,
        fmt: Any,
        q: torch.Tensor,
        k_slot: torch.Tensor,
        v_slot: torch.Tensor,
        length: int,
        mask: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Attention of q (b, nh, s, d) over rows [0, length) of the slots of ``fmt`` (a ``KVFormat``): the
        set's kernel for the format's type when it has one (a compressed cache read compressed), else
        ``cached_attention`` over what ``fmt.read`` gives."""
        impl = self.cache_attentions.get(type(fmt))
        if impl is not None:
            return impl(fmt, q, k_slot, v_slot, length, mask, scale)
        return self.cached_attention(q, fmt.read(k_slot, length), fmt.read(v_slot, length), mask, scale)

    def linear(self, x: torch.Tensor, w: Any, b: torch.Tensor | None) -> torch.Tensor:
        """x @ w.T + b for a dense weight, else the implementation registered for ``type(w)``."""
        impl = self.linears.get(type(w))
        if impl is not None:
            return impl(x, w, b)
        if isinstance(w, torch.Tensor):
            return self.dense_linear(x, w, b)
        raise FlexrunError(f"no {self.name} linear kernel for {type(w).__name__} weights")


REFERENCE = KernelSet(
    name="reference",
    dense_linear=reference.linear,
    norms=reference.NORMS,
    activations=reference.ACTIVATIONS,
    cached_attention=reference.cached_attention,
    linears={Int4Weight: quantized.dequantized_linear, Int8Weight: quantized.dequantized_linear},
)
CPU = KernelSet(
    name="cpu",
    dense_linear=cpu.linear,
    norms=cpu.NORMS,
    activations=cpu.ACTIVATIONS,
    cached_attention=cpu.cached_attention,
    apply_rotary=cpu.apply_rotary_,
    add_norms=cpu.ADD_NORMS,
    linears={
        Int4Weight: quantized.cpu_canonical_int4_linear,
        Int8Weight: quantized.cpu_canonical_int8_linear,
        quantized.CpuInt4Weight: quantized.cpu_int4_linear,
        quantized.CpuInt8Weight: quantized.cpu_int8_linear,
    },
    prepare=quantized.prepare_for_cpu,
    prepared_extra=quantized.prepared_extra_bytes,
)


@functools.cache
def _triton() -> KernelSet | None:
    """The Triton set, or None when Triton does not import (it is the ``cuda`` extra, not a dependency)."""
    try:
        from flexrun.kernels.triton_set import TRITON
    except ImportError as e:
        log.info("Triton kernels unavailable (%s): the reference kernels run on the GPU", e)
        return None
    return TRITON


def select_kernels(device: torch.device) -> KernelSet:
    """The kernel set for ``device``, with the weight types registered for it."""
    base = CPU if device.type == "cpu" else (_triton() if device.type == "cuda" else None) or REFERENCE
    registered = {t: fn for (t, dev), fn in _LINEARS.items() if dev in (None, device.type)}
    return dataclasses.replace(base, linears={**base.linears, **registered})
