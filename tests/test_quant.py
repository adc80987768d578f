"""Compressed weights and KV cache: the formats' error bounds, the fused CPU ops against dequantize-then-matmul
on the same compressed weight, the store, and the engine with compressed weights against Hugging Face on
the same (dequantized) values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flexrun.errors import ConfigError, PlacementError
from flexrun.kernels import quantized as Q
from flexrun.kernels import select_kernels
from flexrun.quant.formats import Int4Weight, Int8Weight, QuantSpec, decode, encode, quantize
from flexrun.quant.kv import QuantKV
from flexrun.runtime.engine import Engine
from flexrun.runtime.sampling import SamplingParams
from flexrun.weights.convert import convert_checkpoint
from flexrun.weights.store import TensorStore
from tests.helpers import place, run
from tests.hf_reference import hf_greedy, logits_by_prompt, tiny_opt

SPECS = [QuantSpec.of("int4", g) for g in (32, 64, 128, 256)] + [QuantSpec.of("int8"), QuantSpec.of("int8", 64)]


def _weight(n: int = 48, k: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


# ---- formats -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_round_trip_error_is_within_half_a_step(spec: QuantSpec) -> None:
    w = _weight()
    q = quantize(w, spec)
    back = q.dequantize()
    n, k = w.shape
    g = spec.group_size or k
    scale = q.scale.float().repeat_interleave(g, dim=1)  # (N, K): each value's step
    # Rounding to the nearest code is at most half a step off; the float16 scale and low add float32
    # rounding of the product (~1e-7 relative), far under the slack.
    assert ((back - w).abs() <= scale / 2 + 1e-6).all()
    assert q.shape == (n, k)
    raw = encode(q, spec)
    assert raw.numel() == spec.nbytes((n, k))
    again = decode(raw, spec, (n, k))
    assert torch.equal(again.dequantize(), back)


def test_int4_packs_two_codes_a_byte_and_int8_one() -> None:
    w = _weight(16, 128)
    assert QuantSpec.of("int4", 64).nbytes((16, 128)) < w.numel() * 0.6  # 0.5 + scales
    assert isinstance(quantize(w, QuantSpec.of("int4")), Int4Weight)
    assert isinstance(quantize(w, QuantSpec.of("int8")), Int8Weight)


@pytest.mark.parametrize(
    "kind, group, message",
    [
        ("int4", 48, "int4 group size must be one of 32, 64, 128, 256"),
        ("int8", 3, "int8 group size must be one of 0, 32"),
        ("int2", 64, "compression must be one of int8, int4"),
    ],
)
def test_bad_specs_are_refused_clearly(kind: str, group: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QuantSpec(kind, group)


def test_a_row_length_the_group_does_not_divide_is_refused_naming_the_fix() -> None:
    with pytest.raises(ConfigError, match="80 input columns are not a multiple of the int4 group size 64"):
        quantize(_weight(8, 80), QuantSpec.of("int4", 64))


# ---- kernels -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [QuantSpec.of("int4", 32), QuantSpec.of("int4", 128), QuantSpec.of("int8")])
@pytest.mark.parametrize("rows", [1, 5, 64, 65])
def test_fused_cpu_ops_match_dequantize_then_matmul(spec: QuantSpec, rows: int) -> None:
    w = quantize(_weight(64, 256), spec)
    prepared = Q.prepare_for_cpu(w)
    assert not isinstance(prepared, Int4Weight | Int8Weight)  # the fused layout was derived
    x = torch.randn(2, rows, 256, generator=torch.Generator().manual_seed(1))
    b = torch.randn(64)
    expected = Q.dequantized_linear(x, w, b)
    got = select_kernels(torch.device("cpu")).linear(x, prepared, b)
    assert got.shape == expected.shape and got.dtype == x.dtype
    # Up to 64 rows the fused op multiplies bfloat16 activations (8 mantissa bits: ~0.4% of each input);
    # above, the chunked float32 path is exact up to summation order.
    tol = dict(rtol=2e-2, atol=2e-2) if 2 * rows <= Q.FUSED_MAX_ROWS else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, **tol)


def test_a_misaligned_activation_is_realigned_for_the_int8_op() -> None:
    w = Q.prepare_for_cpu(quantize(_weight(32, 128), QuantSpec.of("int8")))
    assert isinstance(w, Q.CpuInt8Weight)
    buf = torch.randn(4 * 128 + 1, dtype=torch.bfloat16)
    x = buf[1:].view(4, 128)  # 2 bytes past an aligned start: the int8 kernel would read garbage
    assert x.data_ptr() % 64 != 0
    torch.testing.assert_close(
        Q.cpu_int8_linear(x, w, None),
        Q.dequantized_linear(x.float(), w.canonical, None).bfloat16(),
        rtol=2e-2,
        atol=2e-2,
    )


def test_shapes_the_fused_ops_refuse_stay_canonical_and_compute_right() -> None:
    w = quantize(_weight(24, 96), QuantSpec.of("int4", 32))  # N % 16 != 0
    assert Q.prepare_for_cpu(w) is w
    per_group = quantize(_weight(32, 128), QuantSpec.of("int8", 64))  # the int8 op takes one scale a row only
    assert Q.prepare_for_cpu(per_group) is per_group
    x = torch.randn(3, 96)
    torch.testing.assert_close(
        select_kernels(torch.device("cpu")).linear(x, w, None), F.linear(x, w.dequantize()), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("group", [32, 64, 256])
def test_an_int4_weight_read_from_disk_is_repacked_into_torchs_own_layout(group: int) -> None:
    w = quantize(_weight(128, 512), QuantSpec.of("int4", group))  # blocks of 32 (AVX2) or 64 (AVX-512) output rows
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.codes().to(torch.int32), 1)
    packed = Q.prepare_for_cpu(w)
    assert isinstance(packed, Q.CpuInt4Weight)
    assert torch.equal(packed.packed.view(theirs.shape), theirs)  # the byte shuffle, or torch's converter
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(1))
    canonical = select_kernels(torch.device("cpu")).linear(x, w, None)  # as read from disk
    if Q._held_once(w.shape):  # torch's blocked layout (AVX2, AVX-512): a byte shuffle per call, then the fused op
        torch.testing.assert_close(canonical, Q.cpu_int4_linear(x, packed, None))
    else:  # another layout: torch's converter costs more than dequantizing, so it is dequantized
        torch.testing.assert_close(canonical, Q.dequantized_linear(x, w, None))
    torch.testing.assert_close(canonical, F.linear(x, w.dequantize()), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(Q.cpu_int4_linear(x, packed, None), F.linear(x, w.dequantize()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("block", [None, 32, 64])
def test_a_resident_int4_weight_holds_its_codes_once_and_prefills_as_the_canonical_one(
    block: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = quantize(_weight(192, 256), QuantSpec.of("int4", 32))
    if block is None:  # a layout it cannot read back: the canonical codes are kept beside torch's
        monkeypatch.setattr(Q, "_packed_block", lambda: None)
    elif block != Q._packed_block():
        pytest.skip(f"torch writes another int4 layout here than blocks of {block}")
    held = Q.prepare_for_cpu(w)
    assert isinstance(held, Q.CpuInt4Weight)
    assert (held.codes is None) == (block is not None)
    if block is not None:
        assert held.scale.data_ptr() != w.scale.data_ptr()  # copied out: the store's buffer can go
    spec = QuantSpec.of("int4", 32)
    kept = [held.packed, held.scale_zero, held.scale, held.low] + ([] if held.codes is None else [held.codes])
    assert Q.prepared_extra_bytes(spec, w.shape) == sum(t.nbytes for t in kept) - sum(
        t.nbytes for t in (w.q, w.scale, w.low)
    )
    # Prefill rows read the codes back from torch's layout: the same float32 values, so the same products
    # to the bit as the canonical weight's chunked path.
    x = torch.randn(2, 70, 256, generator=torch.Generator().manual_seed(2))
    b = torch.randn(192)
    assert torch.equal(Q.cpu_int4_linear(x, held, b), Q.chunked_dequantized_linear(x, w, b))
    assert torch.equal(held.dequantize(rows=slice(64, 192)), w.dequantize(rows=slice(64, 192)))


# ---- the KV cache --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, bound", [("int8", 1 / 127), ("int4", 1 / 15)])
def test_kv_cache_rows_round_trip_within_a_step(kind: str, bound: float) -> None:
    fmt = QuantKV(kind, n_kv_head=2, head_dim=8)
    slot = fmt.slot(torch.zeros(6 * fmt.row_elems(3), dtype=torch.uint8), 6, 3)
    new = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(2))  # (b, s, kv_dim)
    fmt.append(slot, 0, new[:, :3])
    fmt.append(slot, 3, new[:, 3:])
    got = fmt.read(slot, 4)  # (t, b, nkv, d)
    ref = new.view(3, 4, 2, 8).transpose(0, 1)
    span = ref.amax(-1, keepdim=True) - ref.amin(-1, keepdim=True)  # each (token, head)'s range
    assert ((got - ref).abs() <= bound * span + 1e-3).all()  # half a step, plus float16 scales


def test_int4_cache_needs_an_even_head_dim() -> None:
    with pytest.raises(ConfigError, match="even head_dim"):
        QuantKV("int4", 2, 7)


# ---- the engine against HF on the dequantized weights --------------------------------------------------
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [40, 41]]
NEW = 6


@pytest.fixture(scope="module", params=["int8", "int4"])
def compressed(request, tmp_path_factory):
    """A tiny OPT (dims that the groups divide), its store compressed, and an HF model holding the same
    dequantized weights: the reference for the engine's compressed compute."""
    spec = QuantSpec.of(request.param, 32 if request.param == "int4" else None)
    cfg, model = tiny_opt(seed=3, hidden_size=64, n_head=4, ffn_embed_dim=128)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d / "ckpt")
    store = TensorStore(convert_checkpoint(d / "ckpt", d / "store", progress=False, compress=spec))
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.self_attn.out_proj, layer.fc1, layer.fc2):  # fmt: skip
                lin.weight.copy_(quantize(lin.weight, spec).dequantize())
    return spec, store, model, d


def test_store_records_the_encoding_and_old_stores_still_load(compressed) -> None:
    spec, store, _, d = compressed
    index = json.loads((store.path / "index.json").read_text())
    assert index["version"] == 2
    entry = index["tensors"]["layers.0.fc1_w"]
    assert entry["encoding"] == spec.kind and entry["shape"] == [128, 64] and entry["dtype"] == "float32"
    assert "encoding" not in index["tensors"]["embed_tokens"]  # embeddings stay in the model's dtype
    assert store.weight_compression == spec.kind
    # A version-1 index: no encodings (the uncompressed tensors' entries, which v1 wrote the same way).
    v1 = json.loads((store.path / "index.json").read_text())
    v1["version"] = 1
    v1["tensors"] = {n: e for n, e in v1["tensors"].items() if "encoding" not in e}
    old = d / "v1"
    old.mkdir(exist_ok=True)
    (old / "index.json").write_text(json.dumps(v1))
    assert TensorStore(old).weight_compression == ""


@pytest.mark.parametrize("cache, b, n", [("host=100", 2, 2), ("disk=100", 4, 1), ("host=50,disk=50", 1, 3)])
def test_disk_streamed_compressed_weights_match_hf(compressed, cache: str, b: int, n: int, tmp_path) -> None:
    """Weights read from disk every step go to the fused ops as read (int4 repacked by a byte shuffle,
    per-row int8 as it is): bfloat16 activations, close logits."""
    spec, store, model, _ = compressed
    _, hf_logits = hf_greedy(model, PROMPTS, NEW)
    placement = place("disk=100", cache, b=b, n=n, compress_weight=spec.kind)
    with Engine(store, placement, 16, offload_dir=tmp_path) as engine:
        _, stats, logits = engine.generate(
            PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False), return_logits=True
        )
    assert stats.disk_bytes_read > 0
    ours = logits_by_prompt(logits, PROMPTS, placement.block_size, NEW)
    for k, want in enumerate(hf_logits):
        # As for host-resident weights below: bfloat16 activations, ~0.1 on logits of +-10.
        torch.testing.assert_close(ours[k][0], want[0], rtol=2e-2, atol=0.15)


def test_the_dequantizing_path_matches_hf_exactly_in_float32(compressed, tmp_path: Path, monkeypatch) -> None:
    """The reference kernels dequantize each weight into float32: HF's greedy tokens and logits to ~1e-6."""
    from flexrun import kernels
    from flexrun.runtime import stack

    monkeypatch.setattr(stack, "select_kernels", lambda device: kernels.REFERENCE)
    spec, store, model, _ = compressed
    hf_tokens, hf_logits = hf_greedy(model, PROMPTS, NEW)
    placement = place("disk=100", b=2, n=2, compress_weight=spec.kind)
    with Engine(store, placement, 16, offload_dir=tmp_path) as engine:
        tokens, _, logits = engine.generate(
            PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False), return_logits=True
        )
    assert tokens == hf_tokens
    ours = logits_by_prompt(logits, PROMPTS, placement.block_size, NEW)
    for k, want in enumerate(hf_logits):
        torch.testing.assert_close(ours[k], want, rtol=1e-4, atol=1e-4)


def test_host_resident_compressed_weights_run_the_fused_ops_close_to_hf(compressed, tmp_path: Path) -> None:
    spec, store, model, _ = compressed
    _, hf_logits = hf_greedy(model, PROMPTS, NEW)
    placement = place("host=100", b=4, compress_weight=spec.kind)
    with Engine(store, placement, 16, offload_dir=tmp_path) as engine:
        held = engine.weights.resident["layers.0.fc1_w"]
        assert isinstance(held, Q.CpuInt4Weight | Q.CpuInt8Weight)  # prepared once, at load
        _, _, logits = engine.generate(
            PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False), return_logits=True
        )
    ours = logits_by_prompt(logits, PROMPTS, 4, NEW)
    for n, want in enumerate(hf_logits):
        # The fused ops take bfloat16 activations: each matmul input rounded to 8 mantissa bits, on hidden
        # states of tens here (this random model's weights are large), ~0.1 absolute on logits of +-10.
        # The first step's logits are compared; later steps may follow another token where two are this close.
        torch.testing.assert_close(ours[n][0], want[0], rtol=2e-2, atol=0.15)


@pytest.mark.parametrize("kind, tol", [("int8", 0.03), ("int4", 0.25)])
def test_a_compressed_cache_stays_close_to_the_uncompressed_one(kind: str, tol: float, tmp_path: Path) -> None:
    cfg, model = tiny_opt(seed=4, hidden_size=64, n_head=4, ffn_embed_dim=128)
    model.save_pretrained(tmp_path / "ckpt")
    store = TensorStore(convert_checkpoint(tmp_path / "ckpt", tmp_path / "store", progress=False))
    runs = {}
    for cache, compress in (("host=100", ""), ("host=100", kind), ("disk=100", kind)):
        with Engine(store, place("host=100", cache, b=2, n=2, compress_cache=compress), 16, offload_dir=tmp_path) as e:
            _, _, logits = e.generate(PROMPTS, SamplingParams(max_new_tokens=NEW), return_logits=True)
        runs[(cache, compress)] = torch.stack(logits)
    plain = runs[("host=100", "")]
    # The first step (the prompt attending over its own compressed keys and values; later steps may follow
    # another token): keys and values rounded to 255 (int8) or 15 (int4) steps of each token-head's range
    # move the logits by a fraction of that: measured 1.8% (int8) and 17% (int4) of their largest magnitude
    # on this random model, whose 16-wide heads make the int4 step coarse.
    moved = (runs[("host=100", kind)][0] - plain[0]).abs().max() / plain[0].abs().max()
    assert moved <= tol, float(moved)
    assert torch.equal(runs[("host=100", kind)], runs[("disk=100", kind)])  # the same bytes on either tier
    assert not torch.equal(runs[("host=100", kind)], plain)  # it did compress


def test_weights_compressed_otherwise_than_the_store_are_refused(compressed, tmp_path: Path) -> None:
    spec, store, _, _ = compressed
    with pytest.raises(PlacementError, match="holds int"):
        Engine(store, place(), 16, offload_dir=tmp_path)


# ---- the command line ----------------------------------------------------------------------------------
def test_cli_compresses_on_convert_and_on_first_use(compressed, tmp_path: Path) -> None:
    spec, _, model, d = compressed
    out = tmp_path / "store"
    r = run("convert", "-m", str(d / "ckpt"), "-o", str(out), "--compress-weight", "int4", "--group-size", "32")
    assert r.exit_code == 0, r.output
    assert TensorStore(out).weight_compression == "int4"
    r = run(
        "convert", "-m", str(d / "ckpt"), "-o", str(tmp_path / "x"), "--compress-weight", "int4", "--group-size", "128"
    )
    assert r.exit_code == 1 and "not a multiple of the int4 group size 128" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()
    r = run("convert", "-m", str(d / "ckpt"), "-o", str(tmp_path / "y"), "--group-size", "32")
    assert r.exit_code == 2 and "needs --compress-weight" in r.output
    args = ["generate", "-m", str(d / "ckpt"), "--store-dir", str(tmp_path / "stores"), "--offload-dir", str(tmp_path)]
    args += ["--placement", "manual", "--max-new-tokens", "4", "-q", "--json"]
    r = run(*args, "--compress-weight", spec.kind, "--group-size", str(spec.group_size or 32) if spec.kind == "int4" else "64",
            "--compress-cache", "int8", input='{"input_ids": [5, 6, 7]}\n')  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stderr.strip().splitlines()[-1])
    assert summary["placement"]["compress_weight"] == spec.kind and summary["placement"]["compress_cache"] == "int8"
    # A store given directly must hold what is asked.
    r = run("generate", "-m", str(out), "--compress-weight", "int8", "-p", "x", "--offload-dir", str(tmp_path))
    assert r.exit_code == 1 and "holds int4 g32 weights, not int8 per row" in r.output


def test_resuming_with_another_cache_compression_is_refused_naming_it(compressed) -> None:
    from flexrun.jobs.fingerprint import job_differences, job_fingerprint
    from flexrun.jobs.options import JobOptions

    _, store, _, _ = compressed
    job = JobOptions(params=SamplingParams(max_new_tokens=4))
    plain = json.loads(json.dumps(job_fingerprint(store, job)))  # through JSON, as kept on disk
    assert "compress_cache" not in plain  # jobs that never compressed their cache still resume
    assert job_differences(plain, job_fingerprint(store, job, compress_cache="int8")) == [
        "--compress-cache off there, int8 here"
    ]
    assert job_differences(plain, job_fingerprint(store, job)) == []
