"""The engine on a CUDA device against Hugging Face (skipped without one; see conftest).

Every tier for weights, KV cache and activations (device / host / disk, and all three mixed), overlap on and
off, host-side attention on and off, uncompressed and compressed (int8/int4 weights, int8/int4 cache): the
CUDA paths of ``runtime.weights``, ``runtime.kvcache``, ``runtime.activations`` and ``runtime.transfer``
(side streams, events, page-locked host buffers) and the device's measured peak. Tiny float32 models, so
HF's greedy tokens are the reference (on the dequantized weights for compressed ones); one GPU, well under
three minutes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from flexrun.errors import BudgetError
from flexrun.placement import Placement
from flexrun.quant.formats import QuantSpec, quantize
from flexrun.runtime.engine import Engine
from flexrun.runtime.sampling import SamplingParams
from flexrun.runtime.tiers import Budgets
from flexrun.weights.convert import convert_checkpoint
from flexrun.weights.store import TensorStore
from tests.helpers import gen, place
from tests.hf_reference import hf_greedy, logits_by_prompt, tiny_opt

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [40, 41]]
NEW = 5
CUDA = torch.device("cuda")

TIERS = {
    "all-device": place("device=100", "device=100", "device=100", b=2, n=2),
    "all-host": place(b=2, n=2),
    "all-disk": place("disk=100", "disk=100", "disk=100", b=2, n=2),
    "mixed": place("device=30,host=30,disk=40", "device=34,host=33,disk=33", "device=50,host=50", b=1, n=4),
}
# (overlap, host-side attention)
MODES = {
    "overlap": (True, False),
    "no-overlap": (False, False),
    "host-attn": (True, True),
    "host-attn-seq": (False, True),
}


def _with(placement: Placement, mode: str, **kw: Any) -> Placement:
    overlap, host_attention = MODES[mode]
    return dataclasses.replace(placement, overlap=overlap, cpu_cache_compute=host_attention, **kw)


def _run(store: TensorStore, placement: Placement, d: Path, **kw: Any) -> tuple[list[list[int]], Any, list]:
    with Engine(store, placement, max_seq_len=16, offload_dir=d / "off", device=CUDA, **kw) as engine:
        return engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False), return_logits=True)


def _assert_matches(logits: list, placement: Placement, ref_logits: list[torch.Tensor], tol: float) -> None:
    got = logits_by_prompt(logits, PROMPTS, placement.block_size, NEW)
    for n in range(len(PROMPTS)):
        torch.testing.assert_close(got[n], ref_logits[n], rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[TensorStore, tuple, Path]:
    _, model = tiny_opt(seed=11, hidden_size=64, n_head=4, ffn_embed_dim=128)
    d = tmp_path_factory.mktemp("gpu-plain")
    model.save_pretrained(d / "ckpt")
    store = TensorStore(convert_checkpoint(d / "ckpt", d / "store", progress=False))
    return store, hf_greedy(model, PROMPTS, NEW), d


@pytest.fixture(scope="module", params=["int8", "int4"])
def packed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A store with compressed weights and HF's greedy output on the same weights dequantized."""
    spec = QuantSpec.of(request.param, 32 if request.param == "int4" else None)
    _, model = tiny_opt(seed=12, hidden_size=64, n_head=4, ffn_embed_dim=128)
    d = tmp_path_factory.mktemp(f"gpu-{request.param}")
    model.save_pretrained(d / "ckpt")
    store = TensorStore(convert_checkpoint(d / "ckpt", d / "store", progress=False, compress=spec))
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.self_attn.out_proj, layer.fc1, layer.fc2):  # fmt: skip
                lin.weight.copy_(quantize(lin.weight, spec).dequantize())
    return spec.kind, store, hf_greedy(model, PROMPTS, NEW), d


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("tiers", sorted(TIERS))
def test_every_tier_and_mode_matches_hf(plain, tiers: str, mode: str) -> None:
    store, (ref_tokens, ref_logits), d = plain
    placement = _with(TIERS[tiers], mode)
    out, stats, logits = _run(store, placement, d)
    assert out == ref_tokens
    # float32 both sides; the device's kernels (cuBLAS, SDPA, Triton) sum in other orders than HF on a CPU.
    _assert_matches(logits, placement, ref_logits, 1e-3)
    assert stats.peak_device > 0


@pytest.mark.parametrize("mode", ["overlap", "host-attn", "host-attn-seq"])
@pytest.mark.parametrize("tiers", ["all-device", "all-host", "mixed"])
def test_compressed_weights_match_hf_on_their_dequantized_values(packed, tiers: str, mode: str) -> None:
    kind, store, (ref_tokens, ref_logits), d = packed
    placement = _with(TIERS[tiers], mode, compress_weight=kind)
    out, _, logits = _run(store, placement, d)
    assert out == ref_tokens
    _assert_matches(logits, placement, ref_logits, 1e-3)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("tiers", ["all-host", "all-disk", "mixed"])
def test_a_compressed_cache_attends_alike_on_the_device_and_on_the_host(plain, kind: str, tiers: str) -> None:
    """The same quantized rows, attended over on the device or (host-side attention) on the CPU: the all-device
    run with that cache is the reference; rounding may differ by a quantization step, hence the tolerance."""
    store, _, d = plain
    _, _, ref = _run(store, _with(TIERS["all-device"], "overlap", compress_cache=kind), d)
    ref_logits = logits_by_prompt(ref, PROMPTS, TIERS["all-device"].block_size, NEW)
    for mode in ("overlap", "host-attn"):
        placement = _with(TIERS[tiers], mode, compress_cache=kind)
        _, _, logits = _run(store, placement, d)
        _assert_matches(logits, placement, [ref_logits[n] for n in range(len(PROMPTS))], 5e-2)


def test_staged_buffers_are_page_locked_and_every_lane_ran(plain) -> None:
    store, _, d = plain
    with Engine(store, TIERS["mixed"], max_seq_len=16, offload_dir=d / "off", device=CUDA) as engine:
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False))
        assert set(engine.mover._streams) == {"cache_in", "cache_out", "acts_in", "acts_out"}
        assert engine.mover._registered  # cudaHostRegister took
        host_slots = [kv for (i, _), kv in engine.cache._resident.items() if engine.cache.tiers[i] == "host"]
        assert host_slots and all(k.is_pinned() and v.is_pinned() for k, v in host_slots)
    assert not engine.mover._registered  # unlocked on close


def test_device_budget_is_what_the_ledger_checks_and_the_peak_is_measured(plain) -> None:
    store, _, d = plain
    with pytest.raises(BudgetError, match="the device tier needs"):
        _run(store, TIERS["all-device"], d, budgets=Budgets(device=64 << 10))
    with Engine(store, TIERS["all-device"], 16, budgets=Budgets(device=1 << 30), offload_dir=d / "off") as engine:
        _, stats, _ = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False))
        planned = engine.ledger.total("device")
    assert stats.budgets["device"] == 1 << 30 and stats.budget_sources["device"] == "--device-mem"
    # Everything the plan holds on the device is allocated, so the measured peak is at least the plan's
    # resident weights and cache; the plan's working memory is an upper bound on the temporaries.
    resident = stats.planned["device"]["weights"] + stats.planned["device"]["kv cache"]
    assert resident <= stats.peak_device <= 2 * planned


def test_generate_prints_the_device_peak_beside_the_plan(job_ckpt, stores: Path, tmp_path: Path) -> None:
    result = gen(
        job_ckpt, stores, tmp_path, "--prompt", "hello", "--json", "--cpu-cache-compute", "on",
        "--weights", "device=50,host=50", "--cache", "host=100", "--device-mem", "1GiB",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stderr.splitlines()[-1])
    assert summary["peak_device_bytes"] > 0 and summary["placement"]["cpu_cache_compute"] is True
    assert summary["budget_bytes"]["device"] == 1 << 30
    text = gen(job_ckpt, stores, tmp_path, "--prompt", "hello", "--verbose")
    assert "peak device memory (measured, torch.cuda.max_memory_allocated)" in text.stderr
