"""Kernel sets: the operations the fused layer computes with, chosen once per engine.

``select_kernels(device)`` returns the tuned CPU set on a CPU and the plain-torch reference elsewhere
(Triton kernels join as a set of their own). A set's ``linear`` dispatches on the weight's type: a dense
tensor runs the set's matmul; another weight type (a compressed format, say) plugs in with
``register_linear`` and the layer code does not change, as gpt-fast's int4 Linear or vLLM's
``quant_method.apply`` do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from flexrun.errors import FlexrunError
from flexrun.kernels import cpu, quantized, reference
from flexrun.kernels.reference import NormFn
from flexrun.quant.formats import Int4Weight, Int8Weight

#: A matrix slot's value: a dense tensor, or an object of a type registered with ``register_linear``.
Weight = Any
#: x (..., in), a weight of some registered type, an optional bias (out,) -> (..., out)
LinearFn = Callable[[torch.Tensor, Any, "torch.Tensor | None"], torch.Tensor]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

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
    #: and the bytes that layout adds (by encoding and shape), for the ledger.
    prepare: Callable[[Weight], Weight] = lambda w: w
    prepared_extra: Callable[[str, tuple[int, ...]], int] = lambda encoding, shape: 0

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
    linears={
        Int4Weight: quantized.cpu_canonical_int4_linear,
        Int8Weight: quantized.cpu_canonical_int8_linear,
        quantized.CpuInt4Weight: quantized.cpu_int4_linear,
        quantized.CpuInt8Weight: quantized.cpu_int8_linear,
    },
    prepare=quantized.prepare_for_cpu,
    prepared_extra=quantized.prepared_extra_bytes,
)


def select_kernels(device: torch.device) -> KernelSet:
    """The kernel set for ``device``, with the weight types registered for it."""
    base = CPU if device.type == "cpu" else REFERENCE
    registered = {t: fn for (t, dev), fn in _LINEARS.items() if dev in (None, device.type)}
    return dataclasses.replace(base, linears={**base.linears, **registered})
