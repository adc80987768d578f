"""Plain regression tests for what differential fuzzing (tests/test_fuzz_vs_hf.py) and issue 18 found: each
one a bug fixed. A new one whose fix lies in another module goes in as xfail(strict=True), the reason naming
the module and the fix, until that fix removes the marker."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers as T

from flexrun.errors import ConfigError
from flexrun.placement import Placement
from flexrun.runtime.encoder import Encoder
from flexrun.runtime.engine import Engine
from flexrun.runtime.sampling import SamplingParams
from flexrun.weights.store import TensorStore
from tests.helpers import place, run, save_and_convert
from tests.hf_decoders import FAMILIES
from tests.hf_encoders import tiny_encoder
from tests.hf_reference import hf_greedy, logits_by_prompt
from tests.test_fuzz_vs_hf import Case, build_model, check_case

# Two prompts of different lengths, so the shorter one is left-padded in a micro-batch of two.
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12]]
NEW = 4


def _gptj_with_gptjs_default_ids(vocab: int = 211) -> T.GPTJForCausalLM:
    """A tiny GPT-J whose config keeps GPTJConfig's default bos/eos 50256 (no pad id) with a small vocabulary,
    as small fine-tunes and test models do: the case of issue 18."""
    _, model_cls, kwargs = FAMILIES["gptj"]
    config = T.GPTJConfig(vocab_size=vocab, initializer_range=0.3, **kwargs)
    assert config.eos_token_id == config.bos_token_id == 50256 and config.pad_token_id is None
    torch.manual_seed(0)
    return model_cls(config).eval()


def test_padding_never_feeds_an_id_outside_the_vocabulary_gptj(tmp_path: Path) -> None:
    """Issue 18: left padding used the config's pad id (falling back to EOS, 50256) as a token, outside the
    211-entry embedding (IndexError in F.embedding). Padding now feeds ``fill_token_id``, an id the table
    holds; it is never attended to, so tokens and logits are HF's."""
    model = _gptj_with_gptjs_default_ids()
    store = save_and_convert(model, tmp_path)
    assert store.config.pad_token_id == 50256 and store.config.fill_token_id == 0
    ref_tokens, ref_logits = hf_greedy(model, PROMPTS, NEW)
    with Engine(store, place(b=2), max_seq_len=16, offload_dir=tmp_path / "off") as engine:
        out, _, logits = engine.generate(
            PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False), return_logits=True
        )
    assert out == ref_tokens
    got = logits_by_prompt(logits, PROMPTS, 2, NEW)
    for n in range(len(PROMPTS)):
        # float32 both sides: summation order only (fused QKV, SDPA, padding columns).
        torch.testing.assert_close(got[n], ref_logits[n], rtol=1e-4, atol=1e-4)


def test_the_issue_18_command_runs(tmp_path: Path) -> None:
    """The issue's report, through the CLI: ``flexrun generate`` of that checkpoint, two prompts of different
    lengths in one micro-batch, exits 0 with HF's tokens."""
    model = _gptj_with_gptjs_default_ids()
    model.save_pretrained(tmp_path / "ckpt")
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": n, "input_ids": p}) + "\n" for n, p in enumerate(PROMPTS)))
    args = ["generate", "-m", str(tmp_path / "ckpt"), "--store-dir", str(tmp_path / "stores"), "-i", str(inp)]
    args += ["--offload-dir", str(tmp_path / "off"), "--placement", "manual", "--gpu-batch-size", "2", "--quiet"]
    r = run(*args, "--max-new-tokens", str(NEW))  # EOS (50256) is past the vocabulary: never generated
    assert r.exit_code == 0 and r.exception is None, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["output_ids"] for row in rows] == hf_greedy(model, PROMPTS, NEW)[0]


SPECIAL_CASES = {
    # family: the config's special ids (HF's OPT and LLaMA embeddings take the pad id as padding_idx, so
    # theirs must index the table or be negative: early LLaMA configs say -1).
    "gpt2": {"bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": None},
    "bloom": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2**31 - 1},
    "gpt_neo": {"bos_token_id": 7, "eos_token_id": 50256, "pad_token_id": 211},
    "gpt_neox": {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 50277},
    "llama": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": -1},
}


@pytest.mark.parametrize("family", sorted(SPECIAL_CASES))
def test_padding_with_special_ids_outside_the_vocabulary_every_family(family: str, tmp_path: Path) -> None:
    """Each family with special ids outside its 211-entry vocabulary (or negative), several micro-batches of
    left-padded prompts, weights and cache split host/disk: HF's tokens and logits."""
    _, _, kwargs = FAMILIES[family]
    hf = {"vocab_size": 211, **kwargs, **SPECIAL_CASES[family]}
    case = Case(family, hf, 3, place("host=50,disk=50", "host=50,disk=50", b=2, n=2), [*PROMPTS, [40], [9, 8, 7]], NEW)
    check_case(case, tmp_path)


def test_a_finished_sequence_feeds_an_id_the_embedding_holds(tmp_path: Path) -> None:
    """A sequence that reached EOS keeps running with its block, fed the padding id: with the pad id outside
    the vocabulary, that id is ``fill_token_id`` too, and the other sequences keep HF's tokens."""
    model = _gptj_with_gptjs_default_ids()
    store = save_and_convert(model, tmp_path)
    ref, _ = hf_greedy(model, PROMPTS, NEW)
    eos = ref[1][0]  # the short prompt ends at once
    store.config = dataclasses.replace(store.config, eos_token_id=eos)
    with Engine(store, place(b=2), max_seq_len=16, offload_dir=tmp_path / "off") as engine:
        out, _, _ = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
    cut = [r[: r.index(eos) + 1] if eos in r else r for r in ref]
    assert out == cut and out[1] == [eos]


def test_encoder_padding_with_a_pad_id_outside_the_vocabulary(tmp_path: Path) -> None:
    """The encoder pads on the right with ``fill_token_id`` as well; a pad id past the table gives the same
    embeddings as one inside it (padding is masked), where it used to index past the table."""
    model = tiny_encoder("bert", seed=2)
    store = save_and_convert(model, tmp_path)
    seqs = [[2, 30, 31, 32, 3], [2, 40, 3], [2, 50, 51, 3]]
    results = []
    for pad in (store.config.pad_token_id, 10**6):
        store.config = dataclasses.replace(store.config, pad_token_id=pad)
        with Encoder(store, place(b=3), 8, offload_dir=tmp_path / "off") as enc:
            results.append(enc.encode(seqs, pooling="mean")[0])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- found by the fuzzer ----------------------------------------------------------------------------------
def test_partial_rotary_with_an_odd_dim_is_refused_naming_rotary_dim(tmp_path: Path) -> None:
    """Fuzzer, gpt_neox: rotary_pct 30/52 times head_dim 52 is 29.999..., which HF and flexrun both truncate
    to 29 rotary dims. HF then rotates 30 dims at frequencies of a 29-dim rotation; flexrun rotates even dims
    only, and refuses the config with one line rather than compute something else."""
    hf = dict(vocab_size=3, hidden_size=52, num_attention_heads=1, num_hidden_layers=1, intermediate_size=1)
    hf |= dict(rotary_pct=30 / 52, max_position_embeddings=4)
    model = build_model(Case("gpt_neox", hf, 0, Placement(), [[0]], 1))
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="rotary_dim 29 must be even and at most head_dim 52"):
        save_and_convert(model, tmp_path)
    r = run("config", str(tmp_path / "ckpt"))
    assert r.exit_code == 1 and type(r.exception) is SystemExit
    assert r.output == "Error: rotary_dim 29 must be even and at most head_dim 52\n"


# Fixed in policies/base.py rope_fields: a factor that leaves 0 rotary dimensions (HF rotates nothing) is
# refused, instead of rotary_dim 0, which OptConfig reads as "the whole head".
def test_partial_rotary_that_rounds_to_zero_dims_matches_hf_or_is_refused(tmp_path: Path) -> None:
    """Fuzzer, gpt_neox: rotary_pct 0.1 of an 8-dim head is 0 rotary dims for HF (no rotation), all 8 for
    flexrun: silently different tokens."""
    hf = dict(vocab_size=50, hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=16)
    hf |= dict(rotary_pct=0.1, max_position_embeddings=32)
    try:
        check_case(Case("gpt_neox", hf, 0, place(), [[1, 2, 3, 4, 5]], NEW), tmp_path)
    except ConfigError as exc:
        assert "rotary" in str(exc)


def test_the_engine_stops_at_every_eos_id(tmp_path: Path) -> None:
    """Several EOS ids (config.json's list, as Llama 3.1's end_of_text / eom / eot): a sequence ends at
    whichever comes first, as HF's generate does."""
    model = _gptj_with_gptjs_default_ids()
    store = save_and_convert(model, tmp_path)
    ref, _ = hf_greedy(model, PROMPTS, NEW)
    second = ref[0][1]
    store.config = dataclasses.replace(store.config, eos_token_id=50256, eos_token_ids=(50256, second))
    assert store.config.stop_token_ids == {50256, second}
    with Engine(store, place(b=2), max_seq_len=16, offload_dir=tmp_path / "off") as engine:
        out, _, _ = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
    assert out == [r[: r.index(second) + 1] if second in r else r for r in ref]
    # The list survives the store's index (a JSON round trip) and is left out of it when empty.
    assert dataclasses.replace(store.config, eos_token_ids=[1, 2]).eos_token_ids == (1, 2)
    assert "eos_token_ids" not in dataclasses.replace(store.config, eos_token_ids=()).to_dict()


# Fixed in policies/base.py token_ids (and opt.py): eos_token_ids holds every id config.json lists, and
# jobs/generate.py labels finish_reason "eos" for any of config.stop_token_ids.
def test_a_checkpoint_with_several_eos_ids_stops_at_each_like_hf(tmp_path: Path) -> None:
    """Fuzzer, any family: config.json's eos_token_id [a, b] makes HF stop at a or b; flexrun stopped only at
    a, and ran on past b (a Llama 3.1 chat would run past its end-of-turn)."""
    _, _, kwargs = FAMILIES["gpt2"]
    case = Case("gpt2", {"vocab_size": 211, **kwargs}, 1, place(b=2), PROMPTS, NEW)
    ref, _ = hf_greedy(build_model(case), PROMPTS, NEW)
    hf = {**case.hf, "eos_token_id": [210, ref[0][1]]}
    model = build_model(dataclasses.replace(case, hf=hf))
    store: TensorStore = save_and_convert(model, tmp_path)
    with Engine(store, place(b=2), max_seq_len=16, offload_dir=tmp_path / "off") as engine:
        out, _, _ = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
    assert out == hf_greedy(model, PROMPTS, NEW, stop_at_eos=True)[0]
