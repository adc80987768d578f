"""The tuned CPU kernels: chunked matmuls, float32 attention over 16-bit caches, activations in place.

Each one computes what its ``kernels.reference`` counterpart does (tests hold them to it); why each is
shaped the way it is, with the measurements, is in benchmarks/README.md ("Why the CPU kernels look the
way they do").
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from flexrun.config import UPCAST_CHUNK_BYTES
from flexrun.kernels import reference

# The activations write into their input (callers pass a fresh matmul output): on a CPU a new
# (tokens, ffn) tensor per layer costs more than the activation itself, the kernel zeroing its pages.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu_,
    "gelu": F.gelu,
    "gelu_new": reference.gelu_new,
    "silu": lambda x: F.silu(x, inplace=True),
}


def rms_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``reference.rms_norm`` as torch's one fused op in float32 (the same values to the bit, one kernel
    instead of six); other dtypes keep the reference's float32 arithmetic and its casts."""
    if x.dtype != torch.float32 or w.dtype != torch.float32:
        return reference.rms_norm(x, w, b, eps)
    out = F.rms_norm(x, (x.shape[-1],), w, eps)
    return out if b is None else out.add_(b)


NORMS: dict[str, reference.NormFn] = {**reference.NORMS, "rmsnorm": rms_norm}


def _add_then_(norm: reference.NormFn) -> reference.AddNormFn:
    """The add-norm of ``norm`` with the sum written into delta (a fresh projection output): no temporary."""

    def add_norm_(
        x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        total = delta.add_(x)
        return total, norm(total, w, b, eps)

    return add_norm_


ADD_NORMS: dict[str, reference.AddNormFn] = {kind: _add_then_(norm) for kind, norm in NORMS.items()}

# Above this many rows of x (tokens in the micro-batch) a whole-weight matmul is as fast as a chunked one.
_CHUNKED_ROWS = 512


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + b, computed in x's dtype (``b`` must be in it too).

    The weight is taken ``UPCAST_CHUNK_BYTES`` of output rows at a time when it is stored in another
    dtype (converted chunk by chunk, each chunk still in cache when the matmul reads it), and for float32
    at decode shapes (a few rows of x), where chunked products beat one whole-weight matmul. Prefill
    shapes and 16-bit x 16-bit products run as one ``F.linear``, which is as fast or faster there.
    """
    k_in, n_out = w.shape[1], w.shape[0]
    rows = max(1, UPCAST_CHUNK_BYTES // (k_in * x.element_size()))
    if w.dtype == x.dtype and (x.dtype != torch.float32 or n_out <= 2 * rows or x.numel() > _CHUNKED_ROWS * k_in):
        return F.linear(x, w, b)

    def rows_of(r: int, n: int) -> torch.Tensor:
        wc = w[r : r + n]  # (n, in)
        return wc if wc.dtype == x.dtype else scratch("weight", n * k_in, x.dtype, x.device).view(n, k_in).copy_(wc)

    return chunked_matmul(x, n_out, rows, rows_of, b)


def chunked_matmul(
    x: torch.Tensor,
    n_out: int,
    rows: int,
    weight_rows: Callable[[int, int], torch.Tensor],
    b: torch.Tensor | None,
) -> torch.Tensor:
    """x @ W.T + b with W supplied ``rows`` output rows at a time: ``weight_rows(r, n)`` gives rows [r, r + n)
    in x's dtype (a view, or a chunk converted into scratch), each multiplied while it is in cache."""
    k_in = x.shape[-1]
    x2 = x.reshape(-1, k_in)  # (m, in)
    m = x2.shape[0]
    out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)  # (m, out)
    for r in range(0, n_out, rows):
        n = min(rows, n_out - r)
        wc = weight_rows(r, n)  # (n, in)
        part = scratch("out", m * n, x.dtype, x.device).view(m, n)  # (m, n)
        if b is None:
            torch.mm(x2, wc.t(), out=part)
        else:
            torch.addmm(b[r : r + n], x2, wc.t(), out=part)
        out[:, r : r + n] = part
    return out.view(*x.shape[:-1], n_out)


_scratches = threading.local()


def scratch(slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused buffer of ``numel`` elements, per thread: fresh multi-MiB temporaries at every call would
    make glibc's malloc either page-fault on each (mmap'd) or keep hundreds of MiB resident (heap)."""
    bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = _scratches.__dict__.setdefault("bufs", {})
    key = (slot, dtype, device)
    buf = bufs.get(key)
    # One made under inference mode cannot be written outside it: remade there.
    if buf is None or buf.numel() < numel or (buf.is_inference() and not torch.is_inference_mode_enabled()):
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def cached_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """``reference.cached_attention``, run in float32 when q or the cache is 16-bit.

    Keys and values are converted into float32 scratch buffers in their own layout (one contiguous pass
    each) and the result cast back to q's dtype: PyTorch's CPU attention over strided 16-bit views is
    several times slower than the conversion plus a float32 one.
    """
    if q.dtype == torch.float32 and keys.dtype == torch.float32:
        return reference.cached_attention(q, keys, values, mask, scale)
    f32 = torch.float32
    kf = scratch("attn_k", keys.numel(), f32, q.device).view(keys.shape).copy_(keys)  # (t, b, nkv, d)
    vf = scratch("attn_v", values.numel(), f32, q.device).view(values.shape).copy_(values)
    out = reference.attention(q.float(), kf.permute(1, 2, 0, 3), vf.permute(1, 2, 0, 3), mask.float(), scale)
    return out.to(q.dtype)  # (b, nh, s, d)


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``reference.apply_rotary`` written into x (b, s, heads, d) and returned: four ops for all heads, q's
    and k's together, each value the same sum of the same two products as the reference's."""
    rd = cos.shape[-1]
    rot = x[..., :rd]  # (b, s, heads, rd), a view into x
    turned = rot * sin  # rot's halves (or pairs) times sin, before rot changes
    rot.mul_(cos)
    if interleaved:
        pairs, tp = rot.unflatten(-1, (rd // 2, 2)), turned.unflatten(-1, (rd // 2, 2))
        pairs[..., 0].sub_(tp[..., 1])
        pairs[..., 1].add_(tp[..., 0])
    else:
        half = rd // 2
        rot[..., :half].sub_(turned[..., half:])
        rot[..., half:].add_(turned[..., :half])
    return x
