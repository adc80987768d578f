"""Every Triton kernel (flexrun.kernels.triton_*) against its plain-torch oracle, and the Triton kernel set
through the fused layer against the reference set.

Without a CUDA device the kernels run under Triton's interpreter on CPU tensors: tests/conftest.py sets
TRITON_INTERPRET=1 then, before anything imports Triton. It has to be that early and process-wide: Triton
reads the variable when ``@triton.jit`` decorates a function, and its own ``tl.sum``/``tl.max`` are
decorated when ``triton`` is first imported, so a variable set later (around this module's imports, say)
leaves them compiled-only and the kernels fail. Nothing else in the suite imports Triton, so nothing else
sees the variable's effect. With a CUDA device the same tests run the compiled kernels on it. The
interpreter computes float32 as numpy does, but mishandles bfloat16 ``tl.dot`` and rounds bfloat16 casts by
truncation, so here everything is float32; the 16-bit comparisons are the ``gpu``-marked tests at the end.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed: pip install -e '.[dev]' (or '.[cuda]')")

import flexrun.kernels as K  # noqa: E402
from flexrun.kernels import positions as P  # noqa: E402
from flexrun.kernels import quantized, reference  # noqa: E402
from flexrun.quant.formats import QuantSpec, quantize  # noqa: E402
from flexrun.quant.kv import QuantKV  # noqa: E402
from flexrun.runtime.kvformat import kv_format  # noqa: E402
from flexrun.runtime.layer import FusedLayer, LayerSpec, LayerWeights  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("without CUDA these tests need TRITON_INTERPRET=1 before triton is imported (conftest)")

from flexrun.kernels import triton_attention as TA  # noqa: E402
from flexrun.kernels import triton_norm as TN  # noqa: E402
from flexrun.kernels import triton_quant as TQ  # noqa: E402
from flexrun.kernels import triton_set as TS  # noqa: E402

# float32 tolerances: the kernels sum in another order than torch's CPU kernels (a dot product over K, the
# mean over a row, the softmax over splits), a few float32 ulps of the result.
F32 = {"rtol": 2e-5, "atol": 2e-5}
WEIGHT_SPECS = [("int4", 32), ("int4", 64), ("int4", 128), ("int8", 0), ("int8", 64)]


def _weight(kind: str, group: int, n: int, k: int, seed: int = 0) -> object:
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(n, k, generator=g), QuantSpec(kind, group))


def _to(w: object, device: torch.device) -> object:
    return type(w)(*(getattr(w, f).to(device) if f != "group_size" else w.group_size for f in w.__dataclass_fields__))


@pytest.mark.parametrize(("kind", "group"), WEIGHT_SPECS)
def test_dequantize_is_the_formats_own_to_the_bit(kind: str, group: int) -> None:
    # 37 rows and 3 groups (or 100 columns a row): neither a multiple of the kernel's 64 x 64 tile.
    w = _to(_weight(kind, group, 37, 3 * group if group else 100), DEV)
    # q * scale (+ low) is exact in float32 for 4- and 8-bit codes and float16 scales: equal to the bit.
    torch.testing.assert_close(TQ.dequantize(w), w.dequantize(torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "group"), WEIGHT_SPECS)
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_fused_dequantize_matmul_equals_the_reference_linear(kind: str, group: int, rows: int) -> None:
    n, k = 45, (3 * group if group else 80)
    w = _to(_weight(kind, group, n, k), DEV)
    x, b = torch.randn(rows, k, device=DEV), torch.randn(n, device=DEV)
    want = quantized.dequantized_linear(x, w, b)
    torch.testing.assert_close(TQ.quant_matmul(x, w, b), want, **F32)
    torch.testing.assert_close(TQ.quant_linear(x.view(1, rows, k), w, None), want.view(1, rows, n) - b, **F32)


def test_prefill_rows_take_the_dequantize_then_matmul_path() -> None:
    w = _to(_weight("int4", 32, 40, 64), DEV)
    x = torch.randn(2, TQ.FUSED_MAX_ROWS, 64, device=DEV)  # 32 rows: past the fused kernel's
    torch.testing.assert_close(TQ.quant_linear(x, w, None), quantized.dequantized_linear(x, w, None), **F32)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("hidden", [48, 100])  # 100: not a power of two, the row's tile partly masked
@pytest.mark.parametrize("bias", [False, True])
def test_norms_alone_and_fused_with_the_residual_add(kind: str, hidden: int, bias: bool) -> None:
    torch.manual_seed(0)
    x, delta = torch.randn(3, 2, hidden, device=DEV) * 3, torch.randn(3, 2, hidden, device=DEV)
    w, b = torch.randn(hidden, device=DEV), (torch.randn(hidden, device=DEV) if bias else None)
    torch.testing.assert_close(TN.NORMS[kind](x, w, b, 1e-5), reference.NORMS[kind](x, w, b, 1e-5), **F32)
    total, normed = TN.ADD_NORMS[kind](x, delta, w, b, 1e-5)
    want_total, want_normed = reference.ADD_NORMS[kind](x, delta.clone(), w, b, 1e-5)
    torch.testing.assert_close(total, want_total, rtol=0, atol=0)  # one float32 add, the same in both
    torch.testing.assert_close(normed, want_normed, **F32)


def _mask(b: int, nh: int, s: int, t: int, per_head: bool) -> torch.Tensor:
    """Causal over the last s keys, the first sequence left-padded by 7; per head: a random extra bias."""
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, : min(7, t - s)] = False
    mask = P.additive_mask(valid, s, torch.float32)  # (b, 1, s, t)
    if per_head:
        mask = mask + torch.randn(b, nh, s, t).clamp(max=0)  # (b, nh, s, t), like an ALiBi bias
    return mask.to(DEV)


def _query(b: int, nh: int, nkv: int, s: int, d: int) -> torch.Tensor:
    """q (b, nh, s, d) as the fused layer hands it over: a transposed view into the qkv output."""
    return torch.randn(b, s, nh + nkv, d, device=DEV)[:, :, :nh].transpose(1, 2)


# (b, query heads, KV heads, new tokens, cached positions, head dim, splits): GQA ratios 1, 3 and 4, lengths
# not a multiple of the 32-position block, head dims not a power of two, one split or several (None: chosen).
ATTN_CASES = [
    (2, 4, 4, 1, 45, 16, 1),
    (2, 6, 2, 1, 70, 12, 3),
    (1, 8, 2, 3, 33, 16, 2),
    (3, 4, 1, 1, 9, 8, None),
    (1, 2, 1, 16, 100, 24, 4),
]


@pytest.mark.parametrize(("b", "nh", "nkv", "s", "t", "d", "splits"), ATTN_CASES)
@pytest.mark.parametrize("per_head", [False, True])
def test_decode_attention_over_the_plain_cache(
    b: int, nh: int, nkv: int, s: int, t: int, d: int, splits: int | None, per_head: bool
) -> None:
    torch.manual_seed(1)
    q, mask = _query(b, nh, nkv, s, d), _mask(b, nh, s, t, per_head)
    # The cache kept in float16 while attention runs in float32, as a stored-dtype cache is.
    keys, values = (torch.randn(t, b, nkv, d, device=DEV).half() for _ in range(2))  # (t, b, nkv, d)
    want = reference.cached_attention(q, keys, values, mask, 0.3)
    torch.testing.assert_close(TA.cached_attention(q, keys, values, mask, 0.3, splits=splits), want, **F32)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize(("b", "nh", "nkv", "s", "t", "d", "splits"), ATTN_CASES[1:4])
def test_decode_attention_over_the_compressed_cache(
    kind: str, b: int, nh: int, nkv: int, s: int, t: int, d: int, splits: int | None
) -> None:
    torch.manual_seed(2)
    fmt = QuantKV(kind, nkv, d)
    q, mask = _query(b, nh, nkv, s, d), _mask(b, nh, s, t, per_head=False)
    # Slots longer than the cached length, the rows past it garbage: the kernel must not read them.
    k_slot, v_slot = (torch.randint(0, 256, (t + 9, b, nkv, fmt.head_bytes), dtype=torch.uint8) for _ in range(2))
    fmt.append(k_slot, 0, torch.randn(b, t, nkv * d))
    fmt.append(v_slot, 0, torch.randn(b, t, nkv * d))
    k_slot, v_slot = k_slot.to(DEV), v_slot.to(DEV)
    want = reference.cached_attention(q, fmt.read(k_slot, t), fmt.read(v_slot, t), mask, 0.25)
    got = TA.quant_cache_attention(fmt, q, k_slot, v_slot, t, mask, 0.25, splits=splits)
    torch.testing.assert_close(got, want, **F32)


def test_a_long_cache_is_split_and_a_prompt_goes_to_the_reference() -> None:
    assert TA.choose_splits(600, programs=2) == 3  # 600 positions, 2 (sequence, KV head) pairs
    assert TA.choose_splits(100, programs=2) == 1  # short: one split
    torch.manual_seed(3)
    q, mask = _query(1, 4, 2, 1, 16), _mask(1, 4, 1, 600, per_head=False)
    keys, values = torch.randn(600, 1, 2, 16, device=DEV), torch.randn(600, 1, 2, 16, device=DEV)
    want = reference.cached_attention(q, keys, values, mask, 0.25)
    torch.testing.assert_close(TA.cached_attention(q, keys, values, mask, 0.25), want, **F32)
    # More new tokens than a decode step: the reference itself, to the bit.
    s = TA.DECODE_MAX_QUERIES + 1
    q, mask = _query(1, 4, 2, s, 16), _mask(1, 4, s, 40, per_head=False)
    keys, values = keys[:40], values[:40]
    got = TA.cached_attention(q, keys, values, mask, 0.25)
    torch.testing.assert_close(got, reference.cached_attention(q, keys, values, mask, 0.25), rtol=0, atol=0)


def _layer_weights(h: int, ffn: int, nh: int, nkv: int, d: int, quant: bool, norm: str) -> LayerWeights:
    g = torch.Generator().manual_seed(4)

    def mat(n: int, k: int) -> object:
        w = torch.randn(n, k, generator=g) / k**0.5
        return _to(quantize(w, QuantSpec("int4", 32)), DEV) if quant else w.to(DEV)

    def vec(n: int, base: float) -> torch.Tensor:
        return (base + 0.1 * torch.randn(n, generator=g)).to(DEV)

    biased = norm == "layernorm"
    return LayerWeights(
        ln1_w=vec(h, 1.0),
        ln1_b=vec(h, 0.0) if biased else None,
        qkv_w=mat((nh + 2 * nkv) * d, h),
        out_w=mat(h, nh * d),
        fc1_w=mat(ffn, h),
        fc2_w=mat(h, ffn),
        gate_w=mat(ffn, h) if not biased else None,
        ln2_w=vec(h, 1.0),
        ln2_b=vec(h, 0.0) if biased else None,
    )


@pytest.mark.parametrize(
    ("norm", "pre_norm", "quant", "cache"),
    [("rmsnorm", True, True, "int4"), ("rmsnorm", True, False, ""), ("layernorm", False, True, "int8")],
)
def test_the_triton_set_runs_the_fused_layer_as_the_reference_set_does(
    norm: str, pre_norm: bool, quant: bool, cache: str
) -> None:
    """A prefill of 5 tokens then two decode steps through ``FusedLayer``: the Triton set (its norms fused
    with the residual add, attention over the cache as it is kept, int4 linears) against the reference's."""
    h, ffn, nh, nkv, d, b = 64, 96, 4, 2, 16, 2
    gated = norm == "rmsnorm"
    spec = LayerSpec(nh, nkv, d, pre_norm, "silu" if gated else "relu", norm, 1e-5, gated, d**-0.5)
    w = _layer_weights(h, ffn, nh, nkv, d, quant, norm)
    fmt = kv_format(torch.float32, nkv, d, cache)
    read_compressed = []  # the steps whose attention read the compressed cache in its own bytes

    def quant_attention(*args: object) -> torch.Tensor:
        read_compressed.append(args[0])
        return TA.quant_cache_attention(*args)

    triton_set = dataclasses.replace(TS.TRITON, cache_attentions={QuantKV: quant_attention})
    outs: dict[str, list[torch.Tensor]] = {}
    for ks in (K.REFERENCE, triton_set):
        layer = FusedLayer(spec, ks, fmt)
        slots = [fmt.slot(torch.zeros(8 * fmt.row_elems(b), dtype=fmt.dtype, device=DEV), 8, b) for _ in range(2)]
        torch.manual_seed(5)
        valid, past, outs[ks.name] = torch.ones(b, 0, dtype=torch.bool), 0, []
        for s in (5, 1, 1):
            valid = torch.cat([valid, torch.ones(b, s, dtype=torch.bool)], dim=1)
            valid[0, :2] = False  # the first sequence left-padded by 2
            mask = P.additive_mask(valid, s, torch.float32).to(DEV)
            x = torch.randn(b, s, h, device=DEV)
            outs[ks.name].append(layer(w, x, layer.cached_core(*slots, past, mask)))
            past += s
    for got, want in zip(outs["triton"], outs["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # a layer's worth of float32 reorderings
    assert read_compressed == ([fmt] * 3 if cache else [])


def test_every_kernel_set_has_a_fused_norm_for_every_norm() -> None:
    for ks in (K.REFERENCE, K.CPU, TS.TRITON):
        assert set(ks.add_norms) == set(reference.NORMS), ks.name


def test_select_kernels_takes_triton_for_cuda_and_the_reference_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Choosing a set touches no device, so a CUDA device's choice can be made here.
    assert K.select_kernels(torch.device("cuda")).name == "triton"
    assert K.select_kernels(torch.device("cpu")).name == "cpu"
    monkeypatch.setitem(sys.modules, "flexrun.kernels.triton_set", None)  # as if Triton would not import
    K._triton.cache_clear()
    try:
        assert K.select_kernels(torch.device("cuda")).name == "reference"
    finally:
        K._triton.cache_clear()


def test_flexrun_imports_and_runs_its_reference_kernels_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now fails, as when it is not installed
        "import torch, flexrun.runtime.engine\n"
        "from flexrun.kernels import select_kernels\n"
        "print(select_kernels(torch.device('cuda')).name, 'triton' in sys.modules and sys.modules['triton'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["reference", "None"]


@pytest.mark.slow
def test_every_kernel_compiles_for_ampere_and_hopper(request: pytest.FixtureRequest) -> None:
    """What the interpreter cannot check: that each kernel variant compiles (Triton's front end and ptxas,
    to a cubin for sm_80 and sm_90, no GPU needed). A few minutes on this machine: run with -m slow."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: select with -m slow")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    out = subprocess.run([sys.executable, script, "80", "90"], env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    compiled = sum(line.startswith("ok ") for line in out.stdout.splitlines())
    assert compiled == 2 * 3 * 17  # targets x dtypes x kernel variants


# On a CUDA device: the same comparisons in 16-bit, and the engine's choice of set.
GPU16 = [
    pytest.param(torch.bfloat16, {"rtol": 2e-2, "atol": 2e-2}, id="bf16"),
    pytest.param(torch.float16, {"rtol": 2e-3, "atol": 2e-3}, id="fp16"),
]


@pytest.mark.gpu
def test_gpu_select_kernels_picks_the_triton_set() -> None:
    assert K.select_kernels(torch.device("cuda", torch.cuda.current_device())).name == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "tol"), GPU16)
@pytest.mark.parametrize(("kind", "group"), WEIGHT_SPECS)
def test_gpu_quant_kernels_in_16_bit(dtype: torch.dtype, tol: dict[str, float], kind: str, group: int) -> None:
    w = _to(_weight(kind, group, 300, 4 * (group or 64)), DEV)
    # The float32 value rounded once to the dtype, as the reference's cast does: equal to the bit.
    torch.testing.assert_close(TQ.dequantize(w, dtype), w.dequantize(dtype), rtol=0, atol=0)
    for rows in (1, 8, 40):
        x = torch.randn(rows, w.shape[1], device=DEV, dtype=dtype)
        b = torch.randn(w.shape[0], device=DEV, dtype=dtype)
        torch.testing.assert_close(TQ.quant_linear(x, w, b), quantized.dequantized_linear(x, w, b), **tol)


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "tol"), GPU16)
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_gpu_norms_in_16_bit(dtype: torch.dtype, tol: dict[str, float], kind: str) -> None:
    x, delta = (torch.randn(7, 4096, device=DEV, dtype=dtype) for _ in range(2))
    w, b = torch.randn(4096, device=DEV, dtype=dtype), torch.randn(4096, device=DEV, dtype=dtype)
    torch.testing.assert_close(TN.NORMS[kind](x, w, b, 1e-5), reference.NORMS[kind](x, w, b, 1e-5), **tol)
    got, want = TN.ADD_NORMS[kind](x, delta, w, None, 1e-5), reference.ADD_NORMS[kind](x, delta, w, None, 1e-5)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # one rounding of a float32 sum in both
    torch.testing.assert_close(got[1], want[1], **tol)


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "tol"), GPU16)
@pytest.mark.parametrize("cache", ["", "int8", "int4"])
def test_gpu_decode_attention_in_16_bit(dtype: torch.dtype, tol: dict[str, float], cache: str) -> None:
    b, nh, nkv, s, t, d = 4, 32, 8, 1, 3000, 128  # a long cache: several splits
    q, mask = _query(b, nh, nkv, s, d).to(dtype), _mask(b, nh, s, t, per_head=False).to(dtype)
    kv = torch.randn(b, t, nkv * d, device=DEV, dtype=dtype)
    fmt = kv_format(dtype, nkv, d, cache)
    k_slot = fmt.slot(torch.empty(t * fmt.row_elems(b), dtype=fmt.dtype, device=DEV), t, b)
    v_slot = torch.empty_like(k_slot)
    fmt.append(k_slot, 0, kv)
    fmt.append(v_slot, 0, kv.flip(1))
    want = reference.cached_attention(q, fmt.read(k_slot, t), fmt.read(v_slot, t), mask, d**-0.5)
    got = TS.TRITON.attend_cache(fmt, q, k_slot, v_slot, t, mask, d**-0.5)
    torch.testing.assert_close(got, want, **tol)
    assert F.cosine_similarity(got.float().flatten(), want.float().flatten(), dim=0) > 0.999
