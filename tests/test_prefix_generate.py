"""Shared prefixes in ``Engine.generate`` (``runtime.prefix``): prompts of a block that share a prefix prefill it
once, and generate the same greedy tokens, with the same logits, as with sharing off and as Hugging Face
transformers generating each prompt alone, for every family and several placements (cache in memory, on disk,
split; micro-batches of one to eight). The prefill computes each distinct prefix of the block once.

Tolerance: float32 on every side; logits differ from HF's and from the unshared run by summation order
only (packed rows against padded ones, masked keys added as exact zeros), about 1e-6 on logits of ~10.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from flexrun.parallel import init_from_env
from flexrun.parallel.launch import run_local
from flexrun.placement import Placement
from flexrun.runtime.engine import Engine
from flexrun.runtime.packing import pack_prompts
from flexrun.runtime.prefix import plan_block
from flexrun.runtime.sampling import SamplingParams
from flexrun.runtime.stats import RunStats
from flexrun.weights.store import TensorStore
from tests.helpers import gen, place, run, save_and_convert
from tests.hf_decoders import FAMILIES, VOCAB, tiny_decoder
from tests.hf_reference import hf_greedy, logits_by_prompt, tiny_opt
from tests.test_families_new import CASES, hf_alone, tiny

NEW = 5
MAX_LEN = 24
PLACEMENTS = {
    "host-one-microbatch": place(b=8, n=1),
    # Rows spanning several micro-batches' cache slots, each slot on disk.
    "weights-and-cache-on-disk": place("host=50,disk=50", "disk=100", b=2, n=4),
    "one-sequence-per-microbatch": place(cache="host=50,disk=50", acts="disk=100", b=1, n=8),
}


def _prompts() -> list[list[int]]:
    """Few-shot-like prompts after one 9-token prefix (longer than every sliding window), one that is the
    prefix itself, one that is a prefix of it, a duplicate, and one sharing only the first two tokens: the
    block's stem, which the windows of later positions no longer see."""
    gen = torch.Generator().manual_seed(2)

    def rnd(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

    a = rnd(9)
    first = a + rnd(3)
    return [first, a + rnd(1), a + rnd(5), a[:6] + rnd(2), a[:2] + rnd(5), list(first), list(a), a[:4]]


PROMPTS = _prompts()


def unique_prefixes(prompts: list[list[int]]) -> int:
    """The tokens a prefix tree of ``prompts`` holds: their distinct non-empty prefixes."""
    return len({tuple(p[:k]) for p in prompts for k in range(1, len(p) + 1)})


_STORES: dict[str, tuple[Any, TensorStore]] = {}


@pytest.fixture
def model_and_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, TensorStore]:
    """The family's HF model and its converted store, built once per test session."""
    family = request.param
    if family not in _STORES:
        model = tiny_opt(seed=3, vocab_size=VOCAB)[1] if family == "opt" else tiny_decoder(family)
        _STORES[family] = (model, save_and_convert(model, tmp_path_factory.mktemp(family)))
    return _STORES[family]


def _generate(
    store: TensorStore, placement: Placement, offload: Path, share: bool, prompts: list[list[int]] = PROMPTS
) -> tuple[list[list[int]], RunStats, dict[int, torch.Tensor]]:
    with Engine(store, placement, max_seq_len=MAX_LEN, offload_dir=offload) as engine:
        params = SamplingParams(max_new_tokens=NEW, stop_at_eos=False)
        out, stats, logits = engine.generate(prompts, params, return_logits=True, share_prefix=share)
    return out, stats, logits_by_prompt(logits, prompts, placement.block_size, NEW)


@pytest.mark.parametrize("model_and_store", ["opt", *FAMILIES], indirect=True)
@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_shared_prefill_matches_hf_and_the_unshared_run(
    model_and_store: tuple[Any, TensorStore], name: str, tmp_path: Path
) -> None:
    model, store = model_and_store
    placement = PLACEMENTS[name]
    ref_tokens, ref_logits = hf_greedy(model, PROMPTS, NEW)
    shared, stats, logits = _generate(store, placement, tmp_path, share=True)
    assert shared == ref_tokens
    for n in range(len(PROMPTS)):
        torch.testing.assert_close(logits[n], ref_logits[n], rtol=1e-4, atol=1e-4)
    # Blocks of 8 hold every prompt: each distinct prefix is prefilled once.
    assert stats.prefilled_tokens == unique_prefixes(PROMPTS) < stats.input_tokens == sum(map(len, PROMPTS))
    if name == "host-one-microbatch":  # the unshared run (HF's equal in every placement: test_engine_vs_hf)
        plain, plain_stats, plain_logits = _generate(store, placement, tmp_path, share=False)
        assert plain == shared
        for n in range(len(PROMPTS)):
            torch.testing.assert_close(logits[n], plain_logits[n], rtol=1e-4, atol=1e-4)
        assert plain_stats.prefilled_tokens == plain_stats.input_tokens == stats.input_tokens


@pytest.mark.parametrize("case", sorted(CASES))
def test_windows_and_scaled_ropes_share_as_hf_generates_alone(case: str, tmp_path: Path) -> None:
    """Mistral's and Qwen2's windows, and every scaled rope (those whose frequencies depend on the length,
    dynamic and longrope, prefilled apart), against HF generating each prompt alone."""
    model = tiny(case, seed=3)
    store = save_and_convert(model, tmp_path)
    placement = PLACEMENTS["weights-and-cache-on-disk"]
    out, stats, logits = _generate(store, placement, tmp_path / "off", share=True)
    ref_tokens, ref_logits = hf_alone(model, PROMPTS, NEW)
    assert out == ref_tokens
    for n in range(len(PROMPTS)):
        torch.testing.assert_close(logits[n], ref_logits[n], rtol=1e-4, atol=1e-4)
    length_dependent = CASES[case][2].get("rope_scaling", {}).get("rope_type") in ("dynamic", "longrope")
    assert stats.prefilled_tokens == (stats.input_tokens if length_dependent else unique_prefixes(PROMPTS))


@pytest.mark.parametrize("model_and_store", ["llama"], indirect=True)
@pytest.mark.parametrize("compress", ["int8", "int4"])
def test_a_compressed_cache_gives_the_same_tokens_shared_or_not(
    model_and_store: tuple[Any, TensorStore], compress: str, tmp_path: Path
) -> None:
    """Keys and values are quantized per token, so the shared prefill's cache holds what the plain one's does
    (up to a code at a rounding boundary: logits within 1e-3)."""
    _, store = model_and_store
    placement = place(cache="host=50,disk=50", b=3, n=3, compress_cache=compress)
    shared, stats, logits = _generate(store, placement, tmp_path, share=True)
    plain, _, plain_logits = _generate(store, placement, tmp_path, share=False)
    assert shared == plain
    for n in range(len(PROMPTS)):
        torch.testing.assert_close(logits[n], plain_logits[n], rtol=1e-3, atol=1e-3)
    assert stats.prefilled_tokens == unique_prefixes(PROMPTS)


@pytest.mark.parametrize("model_and_store", ["gpt2"], indirect=True)
def test_sharing_is_per_block(model_and_store: tuple[Any, TensorStore], tmp_path: Path) -> None:
    """Blocks of three (longest prompts first): each block's distinct prefixes are prefilled once."""
    model, store = model_and_store
    placement = place(b=3, n=1)
    out, stats, _ = _generate(store, placement, tmp_path, share=True)
    assert out == hf_greedy(model, PROMPTS, NEW)[0]
    order = sorted(range(len(PROMPTS)), key=lambda n: -len(PROMPTS[n]))
    blocks = [[PROMPTS[n] for n in order[a : a + 3]] for a in range(0, len(order), 3)]
    assert stats.prefilled_tokens == sum(map(unique_prefixes, blocks))


def test_the_block_runs_in_packed_order_and_rows_hold_each_prompt_whole() -> None:
    cfg = tiny_opt(seed=3, vocab_size=VOCAB)[0]
    shared = plan_block(PROMPTS, cfg, MAX_LEN)
    assert shared is not None and sorted(shared.order) == list(range(len(PROMPTS)))
    assert [m for row in shared.rows for m in row.members] == list(range(len(PROMPTS)))  # consecutive
    assert shared.stem == PROMPTS[0][:2]  # what every prompt begins with
    for row in shared.rows:  # each prompt after the stem, whole, on its own path
        for m, path in zip(row.members, row.scored, strict=True):
            assert [row.tokens[node] for node in path] == PROMPTS[shared.order[m]][2:]
            assert [row.positions[node] for node in path] == list(range(len(path)))
    assert shared.tokens == unique_prefixes(PROMPTS)
    # Nothing shared (or one prompt): the plain prefill.
    assert plan_block([[5, 6], [7, 8, 9]], cfg, MAX_LEN) is None
    assert plan_block([[5, 6]], cfg, MAX_LEN) is None
    # A prompt sharing less than half of itself starts a row of its own.
    rows = pack_prompts([[5, 6, 7, 8, 9], [5, 9, 9, 9, 9]], MAX_LEN)
    assert len(rows) == 2


def test_generate_shares_prefixes_unless_told_not_to(job_ckpt: Any, stores: Path, tmp_path: Path) -> None:
    """``flexrun generate``: the same records with --share-prefix (the default) and --no-share-prefix; the
    summary counts the prompt tokens prefilled."""
    head = [4 + k for k in range(12)]  # a few-shot-like prefix every prompt repeats
    rows = [{"id": f"p{k}", "input_ids": head + [100 + k] * (1 + k % 3)} for k in range(5)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = {}
    for flag in ("--share-prefix", "--no-share-prefix"):
        r = gen(
            job_ckpt,
            stores,
            tmp_path,
            "-i",
            str(inp),
            "--json",
            "--gpu-batch-size",
            "2",
            "--num-gpu-batches",
            "3",
            flag,
        )
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stderr.splitlines()[-1])
        got[flag] = ([row["output_ids"] for row in map(json.loads, r.stdout.splitlines())], summary)
    (shared, summary), (plain, plain_summary) = got["--share-prefix"], got["--no-share-prefix"]
    assert shared == plain
    total = sum(len(r["input_ids"]) for r in rows)
    assert summary["input_tokens"] == plain_summary["input_tokens"] == plain_summary["prefilled_tokens"] == total
    assert summary["prefilled_tokens"] == unique_prefixes([r["input_ids"] for r in rows]) < total
    assert "--no-share-prefix" in run("generate", "-h").stdout


def _tp_ranks(root: Path) -> None:
    """One of two tensor-parallel ranks generating PROMPTS with sharing; rank 0 saves what it got."""
    tp = init_from_env(2)
    try:
        placement = place(cache="host=50,disk=50", b=3, n=3)
        with Engine(TensorStore(root / "store"), placement, MAX_LEN, offload_dir=root / f"off{tp.rank}", tp=tp) as e:
            if tp.rank > 0:
                e.follow()
                return
            params = SamplingParams(max_new_tokens=NEW, stop_at_eos=False)
            out, stats, logits = e.generate(PROMPTS, params, return_logits=True)
            tp.broadcast(None)  # no more work
        torch.save(
            (out, logits_by_prompt(logits, PROMPTS, placement.block_size, NEW), stats.prefilled_tokens), root / "tp.pt"
        )
    finally:
        tp.close()


def test_two_tensor_parallel_ranks_share_as_one_process(tmp_path: Path) -> None:
    """BLOOM (ALiBi: each rank's heads keep their slopes) on two ranks: rank 0 shares the prefill as one process
    does, every rank following; the tokens are HF's and the logits one process's."""
    model = tiny_decoder("bloom", seed=3, n_head=4)
    save_and_convert(model, tmp_path)
    env = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK") if k in os.environ}
    try:
        assert run_local(2, lambda argv: _tp_ranks(tmp_path), []) == 0
    finally:
        os.environ.update(env)
    out, logits, prefilled = torch.load(tmp_path / "tp.pt")
    assert out == hf_greedy(model, PROMPTS, NEW)[0]
    assert prefilled == unique_prefixes(PROMPTS)
    alone, _, alone_logits = _generate(
        TensorStore(tmp_path / "store"), place(cache="host=50,disk=50", b=3, n=3), tmp_path, True
    )
    assert out == alone
    for n in range(len(PROMPTS)):
        torch.testing.assert_close(logits[n], alone_logits[n], rtol=1e-4, atol=1e-4)
