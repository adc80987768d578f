"""Plain torch kernels: the source of truth for every fused-layer operation, and the CPU path."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from flexrun.runtime.precision import UPCAST_CHUNK_BYTES


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def rms_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    # Computed in float32 like the reference implementations, then cast back.
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w
    return out if b is None else out + b


NORMS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]] = {
    "layernorm": layer_norm,
    "rmsnorm": rms_norm,
}


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# The activations, writing into their input where torch can (callers pass a fresh matmul output): a new
# (tokens, ffn) tensor per layer costs more than the activation itself on a CPU, the kernel zeroing its
# pages (OPT-1.3B fc1 over 2048 tokens in bfloat16: relu 11.3 ms, relu_ 1.5 ms).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu_,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "silu": lambda x: F.silu(x, inplace=True),
}


# Above this many rows of x (tokens in the micro-batch) a whole-weight matmul is as fast as a chunked one.
_CHUNKED_ROWS = 512


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + b, computed in x's dtype (``b`` must be in it too).

    On a CPU the weight is taken ``UPCAST_CHUNK_BYTES`` of output rows at a time: a weight stored in
    another dtype (bfloat16 weights, float32 activations on a CPU without bf16 matmul hardware) is
    converted chunk by chunk, so the converted chunk is still in cache when the matmul reads it, and even
    in one dtype the chunked product runs 1.2-2x faster at decode shapes (a few rows of x) than one
    ``F.linear`` over the whole weight (measured on the 2-core AVX2 machine: OPT-1.3B's fc1 at batch 16,
    22-25 ms whole, 12 ms chunked; its LM head 190 ms and 80 ms; on the AVX-512 machine 12.3 and 7.8 ms for
    fc1 at batch 8). At prefill shapes (thousands of rows) one ``F.linear`` is as fast or faster, and so it
    is at every shape for a 16-bit x and weight (oneDNN's native bf16 kernels on AVX-512 BF16: fc1 at batch
    8, 1.6 ms whole, 1.9 ms chunked; the LM head 11.2 and 13.7 ms), so those are not chunked.
    """
    k_in, n_out = w.shape[1], w.shape[0]
    rows = max(1, UPCAST_CHUNK_BYTES // (k_in * x.element_size()))
    if w.dtype == x.dtype and (
        x.device.type != "cpu" or x.dtype != torch.float32 or n_out <= 2 * rows or x.numel() > _CHUNKED_ROWS * k_in
    ):
        return F.linear(x, w, b)
    x2 = x.reshape(-1, k_in)  # (m, in)
    m = x2.shape[0]
    out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)  # (m, out)
    for r in range(0, n_out, rows):
        n = min(rows, n_out - r)
        wc = w[r : r + n]  # (n, in)
        if wc.dtype != x.dtype:
            wc = _scratch("weight", n * k_in, x.dtype, x.device).view(n, k_in).copy_(wc)
        part = _scratch("out", m * n, x.dtype, x.device).view(m, n)  # (m, n)
        if b is None:
            torch.mm(x2, wc.t(), out=part)
        else:
            torch.addmm(b[r : r + n], x2, wc.t(), out=part)
        out[:, r : r + n] = part
    return out.view(*x.shape[:-1], n_out)


_scratches = threading.local()


def _scratch(slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused buffer of ``numel`` elements, per thread: the chunked matmul's converted weights and
    output rows, attention's float32 keys and values. Fresh multi-MiB temporaries at every call would make
    glibc's malloc either page-fault on each (mmap'd) or keep hundreds of MiB resident (heap), depending
    on its adaptive threshold; measured on OPT-1.3B, the latter took peak RSS 0.75 GiB over the plan."""
    bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = _scratches.__dict__.setdefault("bufs", {})
    key = (slot, dtype, device)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Masked attention with grouped heads.

    q: (b, nh, s, d); k, v: (b, nkv, t, d); mask: additive float (b, 1, s, t). Returns (b, nh, s, d).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def cached_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """``attention`` of q (b, nh, s, d) over a position-major cache: keys, values (t, b, nkv, d).

    On a CPU, when q or the cache is 16-bit, keys and values are first converted into float32 scratch
    buffers in their own layout (one contiguous pass each) and attention runs in float32, the result
    cast back to q's dtype. PyTorch's CPU attention over these strided 16-bit views is several times
    slower than the conversion plus a float32 one: OPT-1.3B decode, 16 sequences over 140 positions,
    16.3 ms per layer in bfloat16 against 5.3 ms converted, on the AVX-512 BF16 machine.
    """
    if q.device.type != "cpu" or (q.dtype == torch.float32 and keys.dtype == torch.float32):
        k, v = keys.permute(1, 2, 0, 3).to(q.dtype), values.permute(1, 2, 0, 3).to(q.dtype)  # (b, nkv, t, d)
        return attention(q, k, v, mask, scale)
    f32 = torch.float32
    kf = _scratch("attn_k", keys.numel(), f32, q.device).view(keys.shape).copy_(keys)  # (t, b, nkv, d)
    vf = _scratch("attn_v", values.numel(), f32, q.device).view(values.shape).copy_(values)
    out = attention(q.float(), kf.permute(1, 2, 0, 3), vf.permute(1, 2, 0, 3), mask.float(), scale)
    return out.to(q.dtype)  # (b, nh, s, d)


def additive_mask(valid: torch.Tensor, query_len: int, dtype: torch.dtype, window: int = 0) -> torch.Tensor:
    """An additive attention mask from key validity, causal over the last ``query_len`` keys.

    valid: bool (b, t), True where the key is a real token. Returns (b, 1, query_len, t) with 0 where
    attention is allowed and the dtype's most negative value elsewhere (not -inf, so that a fully masked
    row, a padding query, gives finite garbage instead of NaN). With ``window`` > 0 a query sees only the
    ``window`` most recent keys, itself included (local attention); padding is all on the left, so
    distances between real tokens are the same in buffer rows as in positions.
    """
    b, t = valid.shape
    past = t - query_len
    q_pos = torch.arange(past, t, device=valid.device).view(query_len, 1)
    k_pos = torch.arange(t, device=valid.device).view(1, t)
    causal = k_pos <= q_pos
    if window > 0:
        causal &= q_pos - k_pos < window
    allowed = causal.view(1, 1, query_len, t) & valid.view(b, 1, 1, t)
    mask = torch.zeros(b, 1, query_len, t, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


# ---- positions --------------------------------------------------------------------------------------
def rotary_cos_sin(
    positions: torch.Tensor, dim: int, theta: float, interleaved: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for ``positions`` (b, s), each (b, 1, s, dim), computed in float32.

    Frequency j (of dim / 2) is theta^(-2j / dim). Interleaved style (GPT-J) rotates pairs (2j, 2j + 1),
    so each angle is repeated in place; half style (GPT-NeoX, LLaMA) rotates (j, j + dim / 2), so the
    angles are tiled.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq  # (b, s, dim / 2)
    angles = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of each head of x (b, nh, s, d); the rest pass through."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    if interleaved:
        pairs = rot.unflatten(-1, (rd // 2, 2))  # (b, nh, s, rd / 2, 2)
        turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    else:
        first, second = rot.chunk(2, dim=-1)
        turned = torch.cat([-second, first], dim=-1)
    return torch.cat([rot * cos + turned * sin, rest], dim=-1)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): a geometric sequence from 2^(-8 / n) for the largest
    power of two n <= n_head, the remaining heads taking every other slope of the sequence for 2n."""
    n = 2 ** math.floor(math.log2(n_head))

    def geometric(count: int) -> list[float]:
        start = 2.0 ** (-8.0 / count)
        return [start ** (k + 1) for k in range(count)]

    slopes = geometric(n) + geometric(2 * n)[0::2][: n_head - n]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(key_positions: torch.Tensor, n_head: int, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi's additive bias, slope x key position: (b, nh, 1, t) from key_positions (b, t).

    Softmax ignores a constant per query, so biasing by the key's position equals biasing by the
    distance to the query. Positions are taken relative to the newest key, so the recent keys, which
    weigh most, get the smallest biases and keep their precision in float16.
    """
    slopes = alibi_slopes(n_head).to(key_positions.device)
    rel = key_positions - key_positions.max(dim=1, keepdim=True).values  # (b, t), <= 0
    return (slopes.view(1, n_head, 1, 1) * rel.float()[:, None, None, :]).to(dtype)
