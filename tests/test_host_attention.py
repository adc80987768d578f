"""The GPU schedule's CPU-checkable parts against Hugging Face: host-side attention (``cpu_cache_compute``) and
the staging of the cache and activations through "device" buffers, run on a CPU engine.

``transfer.STAGE_ON_CPU`` makes a CPU engine stage its cache and activations as a GPU engine does (the copies
in and out of the device buffers, the turns, the rows written back, the activations' prefetch), so that
everything but the CUDA streams and events runs here; with host-side attention on top, a prefill attends
over the staged "device" buffers and each decode step on the host over the host copy, the split a GPU run
takes. Tokens must equal HF's greedy tokens (float32), whatever the placement.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexrun.runtime import transfer
from flexrun.runtime.engine import Engine
from flexrun.runtime.kvcache import KVCache
from flexrun.runtime.sampling import SamplingParams
from flexrun.runtime.stats import RunStats, device_peak
from flexrun.weights.store import TensorStore
from tests.helpers import place, save_and_convert
from tests.hf_reference import hf_greedy, logits_by_prompt, tiny_opt

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [40, 41]]
NEW = 5


@pytest.fixture(scope="module")
def model_and_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, TensorStore, Path]:
    _, model = tiny_opt(seed=3)
    d = tmp_path_factory.mktemp("hostattn")
    return model, save_and_convert(model, d), d


@pytest.fixture
def staged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer, "STAGE_ON_CPU", True)


def _generate(store: TensorStore, d: Path, placement: object, spy: list[bool] | None = None):
    with Engine(store, placement, max_seq_len=16, offload_dir=d / "off") as engine:  # type: ignore[arg-type]
        if spy is not None:
            where = engine.cache.attends_on_host

            def record(i: int, length: int) -> bool:
                spy.append(where(i, length))
                return spy[-1]

            engine.cache.attends_on_host = record  # type: ignore[method-assign]
        out, stats, logits = engine.generate(
            PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False), return_logits=True
        )
    return out, stats, logits


STAGED = {
    "cache-host": place(b=2, n=2),
    "cache-disk-acts-disk": place(cache="disk=100", acts="disk=100", b=2, n=2),
    "cache-split-acts-split": place(cache="host=50,disk=50", acts="host=50,disk=50", b=1, n=4),
    "no-overlap": place("host=50,disk=50", "disk=100", "disk=100", b=2, n=2, overlap=False),
}


@pytest.mark.parametrize("host_attention", [False, True], ids=["device-attention", "host-attention"])
@pytest.mark.parametrize("name", sorted(STAGED))
def test_staged_schedule_matches_hf(model_and_store, staged: None, name: str, host_attention: bool) -> None:
    import dataclasses

    model, store, d = model_and_store
    placement = dataclasses.replace(STAGED[name], cpu_cache_compute=host_attention)
    ref_tokens, ref_logits = hf_greedy(model, PROMPTS, NEW)
    spy: list[bool] = []
    out, _, logits = _generate(store, d, placement, spy)
    assert out == ref_tokens
    got = logits_by_prompt(logits, PROMPTS, placement.block_size, NEW)
    for n in range(len(PROMPTS)):
        # float32 on both sides: only the summation order differs (padding, fused QKV, SDPA).
        torch.testing.assert_close(got[n], ref_logits[n], rtol=1e-4, atol=1e-4)
    # Host-side attention: every decode step's attention on the host, every prefill's on the "device".
    assert any(spy) == host_attention
    assert not all(spy)


def test_host_attention_on_an_unstaged_cpu_engine_matches_hf(model_and_store) -> None:
    model, store, d = model_and_store
    placement = place(cache="host=50,disk=50", b=2, n=2, cpu_cache_compute=True)
    ref_tokens, _ = hf_greedy(model, PROMPTS, NEW)
    spy: list[bool] = []
    assert _generate(store, d, placement, spy)[0] == ref_tokens
    assert any(spy)


def test_compressed_cache_gives_the_same_tokens_with_host_attention(model_and_store, staged: None) -> None:
    """int8 cache: the host reads the same quantized rows the device would (a format the cache moves as bytes)."""
    _, store, d = model_and_store
    outs = [
        _generate(store, d, place(cache="host=50,disk=50", b=2, n=2, compress_cache="int8", cpu_cache_compute=c))[0]
        for c in (False, True)
    ]
    assert outs[0] == outs[1]


def test_overlap_and_no_overlap_give_identical_tokens_staged(model_and_store, staged: None) -> None:
    _, store, d = model_and_store
    outs = [
        _generate(
            store, d, place("disk=100", "host=50,disk=50", "host=100", b=2, n=2, overlap=o, cpu_cache_compute=True)
        )[0]
        for o in (True, False)
    ]
    assert outs[0] == outs[1]


def test_staging_buffers_are_planned_only_when_staged(model_and_store, staged: None) -> None:
    """A staged engine plans the device's copies of the cache and the activations in flight; they land on the
    host tier on a CPU (the device tier is host RAM)."""
    _, store, d = model_and_store
    with Engine(store, place(cache="host=100", acts="host=100"), max_seq_len=16, offload_dir=d / "off") as engine:
        host = engine.ledger.items["host"]
        assert host["kv staging (device)"] == 4 * engine.cache.slot_bytes
        assert host["activations in flight (device)"] == engine.acts.nbytes


def test_every_transfer_lane_runs_when_staged(model_and_store, staged: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights in, cache in and out, activations out and in: each copy goes through its lane (its CUDA stream on
    a GPU), and the tokens stay HF's."""
    model, store, d = model_and_store
    lanes: list[str] = []
    copy = transfer.Mover.copy

    def record(self: transfer.Mover, lane: str, *args: object) -> object:
        lanes.append(lane)
        return copy(self, lane, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(transfer.Mover, "copy", record)
    placement = place("device=30,host=30,disk=40", "device=34,host=33,disk=33", "device=50,host=50", b=2, n=2)
    assert _generate(store, d, placement)[0] == hf_greedy(model, PROMPTS, NEW)[0]
    assert set(lanes) == set(transfer.LANES)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_staged_compressed_weights_are_decoded_from_the_device_arena(
    kind: str, staged: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Compressed weights streamed as a GPU streams them (their bytes copied into a device arena, decoded there),
    through the reference kernels (float32 dequantize): HF's greedy tokens on the dequantized weights."""
    from flexrun import kernels
    from flexrun.quant.formats import QuantSpec, quantize
    from flexrun.runtime import stack
    from flexrun.weights.convert import convert_checkpoint

    monkeypatch.setattr(stack, "select_kernels", lambda device: kernels.REFERENCE)
    spec = QuantSpec.of(kind, 32 if kind == "int4" else None)
    _, model = tiny_opt(seed=4, hidden_size=64, n_head=4, ffn_embed_dim=128)
    model.save_pretrained(tmp_path / "ckpt")
    store = TensorStore(convert_checkpoint(tmp_path / "ckpt", tmp_path / "store", progress=False, compress=spec))
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.self_attn.out_proj, layer.fc1, layer.fc2):  # fmt: skip
                lin.weight.copy_(quantize(lin.weight, spec).dequantize())
    placement = place("device=30,host=30,disk=40", "host=50,disk=50", b=2, n=2, compress_weight=kind)
    assert _generate(store, tmp_path, placement)[0] == hf_greedy(model, PROMPTS, NEW)[0]


def test_attends_on_host_only_past_the_prefill_and_off_the_device(tmp_path: Path) -> None:
    from flexrun.placement import Shares
    from flexrun.runtime.iopool import IOPool
    from flexrun.runtime.kvformat import kv_format
    from flexrun.runtime.tiers import Ledger

    fmt = kv_format(torch.float32, 2, 4)
    cache = KVCache(
        fmt, 2, Shares(0.5, 0.5, 0), torch.device("cpu"), IOPool(False), Ledger(), tmp_path, 8, 2, 1,
        host_attention=True,
    )  # fmt: skip
    cache.tiers = ["device", "host"]  # as on a GPU: layer 0's cache on the device, layer 1's in host memory
    assert [cache.attends_on_host(1, n) for n in (0, 3)] == [False, True]
    assert not cache.attends_on_host(0, 3)


# ---- the device's measured peak ---------------------------------------------------------------------------
def test_device_peak_reads_cuda_max_memory_allocated_only_on_cuda() -> None:
    asked: list[torch.device] = []

    def fake(device: torch.device) -> int:
        asked.append(device)
        return 3 << 30

    assert device_peak(torch.device("cpu"), fake) == 0 and not asked
    assert device_peak(torch.device("cuda", 0), fake) == 3 << 30
    assert asked == [torch.device("cuda", 0)]


def test_summary_prints_the_device_peak_beside_the_plan() -> None:
    from flexrun.jobs.report import summary_dict, summary_text
    from flexrun.placement import Placement
    from tests.hf_reference import tiny_opt_config

    stats = RunStats(sequences=1, planned={"device": {"weights": 2 << 30, "kv": 1 << 30}, "host": {"w": 1 << 20}})
    stats.budgets = {"device": 14 << 30, "host": 1 << 30, "disk": 1 << 30}
    cfg = tiny_opt_config()
    assert "peak device memory" not in summary_text(cfg, Placement(), stats)  # a CPU run: RSS is the figure
    stats.peak_device = 5 << 29
    line = summary_text(cfg, Placement(), stats).splitlines()[-1]
    assert line == (
        "peak device memory (measured, torch.cuda.max_memory_allocated): 2.5 GiB; planned 3.0 GiB (budget 14.0 GiB)"
    )
    assert summary_dict(cfg, Placement(), stats)["peak_device_bytes"] == 5 << 29
    assert RunStats(peak_device=7).merge(RunStats(peak_device=5)).peak_device == 7


# ---- the command line ---------------------------------------------------------------------------------------
def test_generate_takes_cpu_cache_compute(job_ckpt, stores: Path, tmp_path: Path) -> None:
    """``--cpu-cache-compute on`` reaches the engine's placement (and the summary's JSON); a bad value is a usage
    error; under --placement auto on a CPU the planner leaves it off (the host is the device)."""
    import json

    from tests.helpers import gen, run

    path = job_ckpt.path
    on = gen(job_ckpt, stores, tmp_path, "--cpu-cache-compute", "on", "--prompt", "hello", "--json")
    assert on.exit_code == 0, on.output
    assert json.loads(on.stderr.splitlines()[-1])["placement"]["cpu_cache_compute"] is True
    bad = gen(job_ckpt, stores, tmp_path, "--cpu-cache-compute", "maybe", "--prompt", "hello")
    assert bad.exit_code == 2 and "maybe" in bad.output
    bench = run(
        "bench", "-m", str(path), "--store-dir", str(stores), "--prompt-len", "4", "--gen-len", "2", "--json",
        "--offload-dir", str(tmp_path / "off"),
    )  # fmt: skip
    assert bench.exit_code == 0, bench.output
    assert json.loads(bench.stdout)["placement"]["cpu_cache_compute"] is False
