"""16-bit weights computed in float32: the chunked mixed-dtype matmul, the compute-dtype choice, and the
engine against Hugging Face run on the same bfloat16-rounded weights and KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flexrun.kernels.cpu as C
import flexrun.kernels.positions as P
import flexrun.kernels.reference as R
from flexrun import precision
from flexrun.precision import resolve_compute_dtype
from flexrun.runtime.engine import Engine
from flexrun.runtime.sampling import SamplingParams
from tests.helpers import place, run, save_and_convert
from tests.hf_reference import hf_greedy, logits_by_prompt, tiny_opt

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [40, 41]]
NEW = 6


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_linear_takes_the_weight_chunk_by_chunk_and_matches_one_matmul(monkeypatch, rows: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(rows, 24)  # (b, in)
    w = torch.randn(70, 24)  # (out, in): 70 rows in chunks of 8, the last one short
    b = torch.randn(70)
    monkeypatch.setattr(C, "UPCAST_CHUNK_BYTES", 8 * 24 * 4)
    # bfloat16 weights, float32 activations: the same as converting the whole weight first. The BLAS may
    # sum a 24-term dot product in another order for another shape: ~1e-7 relative on values of ~5.
    expected = F.linear(x, w.bfloat16().float(), b)
    torch.testing.assert_close(C.linear(x, w.bfloat16(), b), expected, rtol=1e-5, atol=1e-5)
    # One dtype at decode shapes is chunked too (faster on a CPU), with the same result.
    torch.testing.assert_close(C.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    batched = x.view(1, rows, 24)  # (b, s, in)
    torch.testing.assert_close(C.linear(batched, w.bfloat16(), None), F.linear(batched, w.bfloat16().float()))


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])  # (query heads, kv heads): plain and grouped
def test_attention_over_a_16_bit_cache_runs_in_float32_and_matches_the_reference(q_dtype, heads) -> None:
    torch.manual_seed(0)
    (nh, nkv), b, s, t, d = heads, 3, 2, 9, 8
    q = torch.randn(b, nh, s, d).to(q_dtype)
    keys, values = torch.randn(t, b, nkv, d).bfloat16(), torch.randn(t, b, nkv, d).bfloat16()  # position-major
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, :4] = False  # a left-padded row
    mask = P.additive_mask(valid, s, q_dtype)
    got = C.cached_attention(q, keys, values, mask, 0.3)
    assert got.dtype == q_dtype and got.shape == (b, nh, s, d)
    # The reference: float32 attention on the same (rounded) inputs, in the (b, nkv, t, d) layout. Both
    # compute in float32; the only rounding is the output's cast back to q's dtype.
    ref = R.attention(
        q.float(), keys.float().permute(1, 2, 0, 3), values.float().permute(1, 2, 0, 3), mask.float(), 0.3
    )
    torch.testing.assert_close(got, ref.to(q_dtype), rtol=0, atol=1e-6 if q_dtype == torch.float32 else 1e-2)
    # A float32 cache with float32 queries takes the reference path itself.
    f32 = C.cached_attention(q.float(), keys.float(), values.float(), mask.float(), 0.3)
    torch.testing.assert_close(f32, ref, rtol=0, atol=1e-6)


def test_auto_computes_16_bit_weights_in_float32_on_a_cpu_without_16_bit_matmuls(monkeypatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert resolve_compute_dtype("auto", "bfloat16", cpu) == "float32"
    assert resolve_compute_dtype(None, "float16", cpu) == "float32"
    assert resolve_compute_dtype("auto", "float32", cpu) == "float32"
    assert resolve_compute_dtype("auto", "bfloat16", gpu) == "bfloat16"
    assert resolve_compute_dtype("bfloat16", "bfloat16", cpu) == "bfloat16"  # asked for: done, if slow
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert resolve_compute_dtype("auto", "bfloat16", cpu) == "bfloat16"
    assert resolve_compute_dtype("auto", "float16", cpu) == "float32"


@pytest.fixture(scope="module", params=["pre-ln", "post-ln-proj"])
def bf16_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A tiny OPT stored in bfloat16, and the float32 HF model with exactly those (rounded) weights."""
    fields = {} if request.param == "pre-ln" else {"do_layer_norm_before": False, "word_embed_proj_dim": 32}
    _, model = tiny_opt(seed=3, **fields)
    d = tmp_path_factory.mktemp(request.param)
    store = save_and_convert(model, d, dtype="bfloat16")
    model = model.to(torch.bfloat16).to(torch.float32)
    return model, store, d


def hf_with_bf16_cache(model, monkeypatch) -> tuple[list[list[int]], list[torch.Tensor]]:
    """HF generating each prompt alone in float32, with each new key and value rounded to bfloat16 as it
    enters the cache (flexrun keeps the cache in the weights' dtype and attends over it in float32)."""
    from transformers.cache_utils import DynamicLayer

    update = DynamicLayer.update

    def rounded(self, k: torch.Tensor, v: torch.Tensor, *args, **kwargs):
        return update(self, k.bfloat16().float(), v.bfloat16().float(), *args, **kwargs)

    monkeypatch.setattr(DynamicLayer, "update", rounded)
    return hf_greedy(model, PROMPTS, NEW)


@pytest.mark.parametrize(
    ("weights", "cache", "b", "n"),
    [("host=100", "host=100", 8, 1), ("disk=100", "host=100", 2, 2), ("host=50,disk=50", "disk=100", 1, 3)],
)
def test_bf16_weights_computed_in_float32_match_hf(bf16_model, monkeypatch, weights, cache, b, n) -> None:
    model, store, d = bf16_model
    ref_tokens, ref_logits = hf_with_bf16_cache(model, monkeypatch)
    placement = place(weights, cache, b=b, n=n)
    with Engine(store, placement, max_seq_len=16, offload_dir=d / "off", compute_dtype="float32") as engine:
        assert engine.cfg.run_dtype == "float32" and engine.cfg.dtype == "bfloat16"
        out, _, logits = engine.generate(
            PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False), return_logits=True
        )
    assert out == ref_tokens
    got = logits_by_prompt(logits, PROMPTS, placement.block_size, NEW)
    for k in range(len(PROMPTS)):
        # The same bfloat16 values and float32 arithmetic on both sides: only the summation order differs
        # (chunked matmuls, padding, SDPA), about 1e-6 relative on logits of magnitude ~10.
        torch.testing.assert_close(got[k], ref_logits[k], rtol=1e-4, atol=1e-4)


def test_bf16_engine_in_bfloat16_stays_close_to_float32_compute(bf16_model) -> None:
    """--compute-dtype bfloat16 runs the native 16-bit path: the same model within bfloat16's precision."""
    _, store, d = bf16_model
    placement = place(b=4)
    logits = {}
    for compute in ("float32", "bfloat16"):
        with Engine(store, placement, max_seq_len=16, offload_dir=d / "off", compute_dtype=compute) as engine:
            _, _, steps = engine.generate(
                PROMPTS, SamplingParams(max_new_tokens=1, stop_at_eos=False), return_logits=True
            )
        logits[compute] = steps[0]
    # bfloat16 keeps 8 bits of mantissa: activations differ by ~0.4% per rounding, over 3 layers.
    scale = logits["float32"].abs().max()
    assert (logits["bfloat16"] - logits["float32"]).abs().max() < 0.05 * scale
    assert not torch.equal(logits["bfloat16"], logits["float32"])  # the two paths really differ


def test_cli_reports_the_compute_dtype_and_a_resume_with_another_is_refused(bf16_model, tmp_path: Path) -> None:
    _, store, _ = bf16_model
    out = tmp_path / "out.jsonl"
    base = ["generate", "-m", str(store.path), "--offload-dir", str(tmp_path / "off"), "--max-new-tokens", "3"]
    base += ["--placement", "manual", "--quiet", "-o", str(out), "--json"]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    r = run(*base, "-i", str(inp), "--compute-dtype", "float32")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stderr.strip().splitlines()[-1])
    assert summary["dtype"] == "bfloat16" and summary["compute_dtype"] == "float32"
    before = out.read_bytes()
    inp.write_text(inp.read_text() + json.dumps({"input_ids": [9, 9, 9]}) + "\n")
    r = run(*base, "-i", str(inp), "--compute-dtype", "bfloat16")
    assert r.exit_code == 1
    assert "--compute-dtype float32 there, bfloat16 here" in r.output
    assert out.read_bytes() == before


def test_plan_uses_the_compute_dtype(monkeypatch) -> None:
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx2"}))
    args = ["plan", "-m", "opt-1.3b", "--dtype", "bfloat16", "--hardware", "cpu", "--host-mem", "4GiB", "--json"]
    plans = {}
    for compute in ("auto", "bfloat16"):
        r = run(*args, "--compute-dtype", compute)
        assert r.exit_code == 0, r.output
        plans[compute] = json.loads(r.stdout)
    assert plans["auto"]["compute_dtype"] == "float32" and plans["bfloat16"]["compute_dtype"] == "bfloat16"
    # The cpu preset's float32 matmuls are several times faster than its bfloat16 ones.
    assert plans["auto"]["prediction"]["throughput_tok_s"] > plans["bfloat16"]["prediction"]["throughput_tok_s"]
