"""The dtype the engine computes in, which may differ from the dtype the weights are stored in.

Weights and the KV cache keep the stored dtype (the bytes that cross the memory hierarchy); hidden states
and intermediates use the compute dtype, and a 16-bit weight is converted a cache-sized chunk at a time
inside each matmul (``kernels.cpu.linear``). On a CPU without bfloat16 or float16 matmul hardware
(AVX2, or AVX-512 without the BF16/FP16 extensions) PyTorch emulates the 16-bit matmul several times
slower than float32, so there ``auto`` computes a 16-bit model in float32: half the weight bytes of a
float32 model at float32's arithmetic rate. GPUs compute in the stored dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from flexrun.config import OptConfig

# x86 feature flags (Linux /proc/cpuinfo) that give PyTorch native matmuls in a 16-bit dtype. Other
# CPUs are taken to have none: float32 is never slower than an emulated 16-bit matmul.
_NATIVE_FLAGS = {
    "bfloat16": {"avx512_bf16", "amx_bf16"},
    "float16": {"avx512_fp16", "amx_fp16"},
}
CHOICES = ("auto", "float32", "float16", "bfloat16")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, empty when the system does not list them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_has_native(dtype: str) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware (float32 always does)."""
    return dtype == "float32" or bool(_NATIVE_FLAGS.get(dtype, set()) & _cpu_flags())


def resolve_compute_dtype(requested: str | None, stored: str, device: torch.device) -> str:
    """The dtype to compute in: ``requested`` unless it is "auto" (or None), which means ``stored`` on a GPU
    and on a CPU with native matmuls in it, else float32."""
    if requested and requested != "auto":
        return requested
    if device.type != "cpu" or cpu_has_native(stored):
        return stored
    return "float32"


def compute_candidates(stored: str) -> tuple[str, ...]:
    """The dtypes a ``stored`` model may compute in, for the planner to weigh when the choice is left open:
    the stored one, float32, and bfloat16 for a 16-bit store."""
    sixteen = ("bfloat16",) if stored in ("float16", "bfloat16") else ()
    return tuple(dict.fromkeys((stored, "float32", *sixteen)))


def with_compute_dtype(cfg: OptConfig, requested: str | None, device: torch.device) -> OptConfig:
    """``cfg`` with the compute dtype ``resolve_compute_dtype`` chooses (left unset when it is the stored one)."""
    compute = resolve_compute_dtype(requested, cfg.dtype, device)
    return dataclasses.replace(cfg, compute_dtype="" if compute == cfg.dtype else compute)
