"""``runtime.scorer`` against Hugging Face transformers: each request's continuation log-likelihood and
``is_greedy`` equal those of HF's forward pass over context + continuation, in float32, for every family,
several placements and micro-batchings, with prefix sharing on and off; rolling perplexity windows equal
lm-evaluation-harness's.

Tolerance: 1e-4 on log-probabilities summed over at most a few tokens, float32 on both sides; the
engine's matmuls are chunked and its attention runs over packed rows (masked keys added as exact zeros),
so sums differ from HF's by rounding only (about 1e-6 here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as T

from flexrun.jobs.score_input import rolling_windows
from flexrun.runtime.packing import ScoreRequest, pack
from flexrun.runtime.scorer import Scorer
from flexrun.weights.store import TensorStore
from tests.helpers import place, save_and_convert
from tests.hf_decoders import FAMILIES, IDS, VOCAB, tiny_decoder
from tests.hf_reference import tiny_opt

MAX_LEN = 40
PLACEMENTS = {
    "host-one-microbatch": place(b=8, n=1),
    # The scorer keeps no KV cache (keys and values live one layer long), so what can leave memory are the
    # weights and the activations between layers.
    "weights-and-activations-on-disk": place("host=50,disk=50", acts="disk=100", b=2, n=2),
    "one-row-per-microbatch": place("disk=100", b=1, n=3),
}


def _mixtral() -> Any:
    fields: dict[str, Any] = dict(
        vocab_size=VOCAB,
        initializer_range=0.3,
        num_hidden_layers=2,
        hidden_size=40,
        num_attention_heads=5,
        num_key_value_heads=1,
        intermediate_size=24,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_theta=500.0,
        max_position_embeddings=64,
        **IDS,
    )
    config = T.MixtralConfig(**fields)
    torch.manual_seed(0)
    return T.MixtralForCausalLM(config).eval()


def _model(family: str) -> Any:
    if family == "opt":
        return tiny_opt(seed=3, vocab_size=VOCAB)[1]
    if family == "mixtral" and family not in FAMILIES:
        return _mixtral()
    return tiny_decoder(family)


_STORES: dict[str, tuple[Any, TensorStore]] = {}


@pytest.fixture
def model_and_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, TensorStore]:
    """The family's HF model and its converted store, built once per test session."""
    family = request.param
    if family not in _STORES:
        model = _model(family)
        _STORES[family] = (model, save_and_convert(model, tmp_path_factory.mktemp(family)))
    return _STORES[family]


def hf_scores(model: Any, requests: list[ScoreRequest]) -> list[tuple[float, bool]]:
    """HF's log-likelihood and is_greedy for each request, from one forward pass over its tokens."""
    out = []
    with torch.no_grad():
        for r in requests:
            logits = model(torch.tensor([r.tokens])).logits[0].float()  # (len, vocab)
            lp = torch.log_softmax(logits, dim=-1)
            c = len(r.context)
            rows = torch.arange(c - 1, len(r.tokens) - 1)
            target = torch.tensor(r.continuation)
            out.append((float(lp[rows, target].sum()), bool((lp[rows].argmax(-1) == target).all())))
    return out


def _requests(model: Any) -> list[ScoreRequest]:
    """Three questions of three choices each, contexts of mixed lengths; a context that is a prefix of
    another's; and each question's greedy continuation, so is_greedy is true for some."""
    gen = torch.Generator().manual_seed(1)

    def rnd(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, VOCAB, (n,), generator=gen).tolist())

    contexts = [rnd(9), rnd(4), rnd(15)]
    requests = [ScoreRequest(c, rnd(k)) for c in contexts for k in (1, 3, 2)]
    requests.append(ScoreRequest(contexts[0][:6], rnd(2)))
    with torch.no_grad():
        for c in contexts:
            greedy = model.generate(
                torch.tensor([c]), attention_mask=torch.ones(1, len(c), dtype=torch.long), max_new_tokens=3,
                do_sample=False, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
            requests.append(ScoreRequest(c, tuple(greedy[0, len(c) :].tolist())))
    return requests


def unique_inputs(requests: list[ScoreRequest]) -> int:
    """The tokens a prefix tree of the requests' inputs holds: their distinct non-empty prefixes."""
    return len({r.inputs[:k] for r in requests for k in range(1, len(r.inputs) + 1)})


def _check(model: Any, store: TensorStore, placement: Any, tmp_path: Path) -> None:
    requests = _requests(model)
    want = hf_scores(model, requests)
    assert any(g for _, g in want) and not all(g for _, g in want)
    got = {}
    for share in (True, False):
        with Scorer(store, placement, MAX_LEN, offload_dir=tmp_path) as scorer:
            got[share], stats = scorer.score(requests, share)
        for n, (sc, (logprob, greedy)) in enumerate(zip(got[share], want, strict=True)):
            assert sc.logprob == pytest.approx(logprob, abs=1e-4), (share, n)
            assert sc.is_greedy == greedy, (share, n)
            assert sum(sc.token_logprobs) == pytest.approx(sc.logprob, abs=1e-6)
        # With sharing, every distinct prefix is read once; without, every request's tokens are.
        expected = unique_inputs(requests) if share else sum(len(r) for r in requests)
        assert stats.input_tokens == expected
        # The LM head runs once at each distinct scored position (a question's choices share the first).
        scored = {r.tokens[:k] for r in requests for k in range(len(r.context), len(r.tokens))}
        every = sum(len(r.continuation) for r in requests)
        assert scorer.head_positions == (len(scored) if share else every) and len(scored) < every
    assert unique_inputs(requests) < sum(len(r) for r in requests)
    for a, b in zip(got[True], got[False], strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and a.is_greedy == b.is_greedy


FAMILY_NAMES = ["opt", *FAMILIES] + ([] if "mixtral" in FAMILIES else ["mixtral"])


@pytest.mark.parametrize("model_and_store", FAMILY_NAMES, indirect=True)
def test_every_family_matches_hf(model_and_store: tuple[Any, TensorStore], tmp_path: Path) -> None:
    _check(*model_and_store, PLACEMENTS["host-one-microbatch"], tmp_path)


@pytest.mark.parametrize("placement", [p for p in PLACEMENTS if p != "host-one-microbatch"])
@pytest.mark.parametrize("model_and_store", ["opt", "llama"], indirect=True)
def test_placements_and_microbatches_match_hf(
    model_and_store: tuple[Any, TensorStore], placement: str, tmp_path: Path
) -> None:
    _check(*model_and_store, PLACEMENTS[placement], tmp_path)


def test_rolling_windows_are_lm_evals() -> None:
    utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(10, 10 + 97))
    for size in (1, 5, 32, 96, 97, 200):
        want = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(tokens, 7, size, context_len=1)]
        got = [(list(r.context), list(r.continuation)) for r in rolling_windows(tokens, 7, size)]
        assert got == want, size


@pytest.mark.parametrize("model_and_store", ["llama", "gpt2"], indirect=True)
def test_rolling_perplexity_over_several_windows_matches_hf(
    model_and_store: tuple[Any, TensorStore], tmp_path: Path
) -> None:
    model, store = model_and_store
    tokens = torch.randint(3, VOCAB, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    windows = rolling_windows(tokens, IDS["bos_token_id"], 24)
    assert len(windows) == 3 and sum(len(w.continuation) for w in windows) == len(tokens)
    with Scorer(store, place(b=2, n=1), 24, offload_dir=tmp_path) as scorer:
        got, _ = scorer.score(windows)
    want = hf_scores(model, windows)
    assert sum(s.logprob for s in got) == pytest.approx(sum(lp for lp, _ in want), abs=1e-4)


def test_rows_keep_to_the_limit_and_group_shared_contexts() -> None:
    context = tuple(range(5, 25))
    requests = [ScoreRequest(context, (k, k + 1)) for k in range(30, 60)] + [ScoreRequest((1, 2), (3,))]
    rows = pack(requests, limit=60)
    assert all(len(row) <= 60 for row in rows)
    assert sorted(m for row in rows for m in row.members) == list(range(len(requests)))
    # The unrelated request is a row of its own; the others share their context within each row.
    assert [len(row.members) for row in rows if len(requests) - 1 in row.members] == [1]
    assert sum(len(row) for row in rows) < sum(len(r) for r in requests) / 3
