"""flexrun's engine against Hugging Face transformers on tiny random OPT models, for a placement matrix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexrun.runtime.engine import Engine
from flexrun.runtime.sampling import SamplingParams
from flexrun.weights.store import TensorStore
from tests.helpers import place, save_and_convert
from tests.hf_reference import hf_greedy, logits_by_prompt, tiny_opt

# Mixed lengths, so blocks are left-padded.
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [40, 41], [7, 8, 9, 10, 11, 12]]
NEW = 6

CONFIGS = {
    "pre-ln": {},
    "post-ln-proj": {"do_layer_norm_before": False, "word_embed_proj_dim": 32, "final_layer_norm": False},
}


PLACEMENTS = {
    "all-host": place(),
    "weights-disk": place(weights="disk=100", b=2, n=3),
    "weights-split": place(weights="host=40,disk=60", b=3, n=2),
    "cache-disk": place(cache="disk=100", b=2, n=2),
    "cache-split": place(cache="host=50,disk=50", b=1, n=5),
    "acts-disk": place(acts="disk=100", b=2, n=2),
    "all-disk-no-overlap": place("disk=100", "disk=100", "disk=100", b=2, n=2, overlap=False),
    "device-share": place(weights="device=30,host=30,disk=40", cache="device=50,disk=50"),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_and_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    _, model = tiny_opt(seed=1, **CONFIGS[request.param])
    d = tmp_path_factory.mktemp(request.param)
    return model, save_and_convert(model, d), d


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_greedy_tokens_and_logits_match_hf(model_and_store, name: str) -> None:
    model, store, d = model_and_store
    ref_tokens, ref_logits = hf_greedy(model, PROMPTS, NEW)
    placement = PLACEMENTS[name]
    with Engine(store, placement, max_seq_len=16, offload_dir=d / "offload") as engine:
        out, stats, logits = engine.generate(
            PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False), return_logits=True
        )
    assert out == ref_tokens
    got = logits_by_prompt(logits, PROMPTS, placement.block_size, NEW)
    for n in range(len(PROMPTS)):
        # float32 on both sides; differences come only from summation order (padding, fused QKV, SDPA
        # vs HF's kernels), about 1e-6 relative on logits of magnitude ~10.
        torch.testing.assert_close(got[n], ref_logits[n], rtol=1e-4, atol=1e-4)
    assert stats.generated_tokens >= len(PROMPTS) * NEW
    if "disk" in placement.weights.spec():
        assert stats.disk_bytes_read > 0


def test_overlap_and_no_overlap_give_identical_tokens(model_and_store) -> None:
    _, store, d = model_and_store
    outs = []
    for overlap in (True, False):
        pl = place("host=50,disk=50", "host=50,disk=50", b=2, n=2, overlap=overlap)
        with Engine(store, pl, max_seq_len=16, offload_dir=d / "offload") as engine:
            outs.append(engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False))[0])
    assert outs[0] == outs[1]


def test_eos_stops_a_sequence(model_and_store) -> None:
    model, store, d = model_and_store
    ref, _ = hf_greedy(model, PROMPTS[:1], NEW)
    eos = ref[0][2]  # pretend the third greedy token is EOS
    import dataclasses

    store.config = dataclasses.replace(store.config, eos_token_id=eos)
    try:
        with Engine(store, place(), max_seq_len=16, offload_dir=d / "offload") as engine:
            out, _, _ = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=NEW))
    finally:
        store.config = dataclasses.replace(store.config, eos_token_id=2)
    assert out[0] == ref[0][: ref[0].index(eos) + 1]


def test_seeded_sampling_is_reproducible_across_batch_shapes(model_and_store) -> None:
    _, store, d = model_and_store
    params = SamplingParams(max_new_tokens=NEW, temperature=0.8, top_p=0.9, top_k=20, seed=7, stop_at_eos=False)
    outs = []
    for b, n in ((1, 1), (2, 3), (8, 1)):
        with Engine(store, place(b=b, n=n), max_seq_len=16, offload_dir=d / "offload") as engine:
            outs.append(engine.generate(PROMPTS, params)[0])
    assert outs[0] == outs[1] == outs[2]
    with Engine(store, place(), max_seq_len=16, offload_dir=d / "offload") as engine:
        other = engine.generate(PROMPTS, SamplingParams(**{**params.__dict__, "seed": 8}))[0]
    assert other != outs[0]


def test_budget_too_small_is_refused_naming_the_tier(model_and_store, tmp_path: Path) -> None:
    from flexrun.errors import PlacementError
    from flexrun.runtime.tiers import Budgets

    _, store, d = model_and_store
    with pytest.raises(PlacementError, match=r"the host tier needs .* short by"):
        Engine(store, place(), max_seq_len=16, budgets=Budgets(host=10_000), offload_dir=tmp_path)
    # The same budget fits once the weights and cache go to disk.
    with Engine(
        store, place("disk=100", "disk=100", b=1), max_seq_len=16, budgets=Budgets(host=400_000), offload_dir=tmp_path
    ) as e:
        assert e.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))[0]


def test_corrupted_tensor_file_is_a_checksum_error(model_and_store, tmp_path: Path) -> None:
    import shutil

    from flexrun.errors import CheckpointError

    _, store, _ = model_and_store
    copy = tmp_path / "store"
    shutil.copytree(store.path, copy)
    f = copy / "layers.1.fc1_w.bin"
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="layers.1.fc1_w.bin: checksum mismatch"):
        with Engine(TensorStore(copy), place("disk=100"), max_seq_len=16, offload_dir=tmp_path) as engine:
            engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
    f.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="truncated"):
        with Engine(TensorStore(copy), place("disk=100"), max_seq_len=16, offload_dir=tmp_path) as engine:
            engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
