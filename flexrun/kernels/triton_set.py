"""The Triton kernel set, for a CUDA device: importing it imports Triton, so ``kernels.select_kernels``
imports it lazily and falls back to the reference when Triton is not installed.

Dense matmuls, activations and rotary stay torch's (cuBLAS and its fused elementwise kernels); the set's own
kernels are the norms (alone and fused with the residual add), decode attention over the plain and the
compressed KV cache, and the linears of int4/int8 weights. Each is tested against ``kernels.reference``.
"""

from __future__ import annotations

from flexrun.kernels import KernelSet, reference, triton_attention, triton_norm, triton_quant

TRITON = KernelSet(
    name="triton",
    dense_linear=reference.linear,
    norms=triton_norm.NORMS,
    activations=reference.ACTIVATIONS,
    cached_attention=triton_attention.cached_attention,
    add_norms=triton_norm.ADD_NORMS,
    cache_attentions=triton_attention.CACHE_ATTENTIONS,
    linears=triton_quant.LINEARS,
)
