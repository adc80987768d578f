"""Property-based differential tests: random small Hugging Face decoders of every supported family, random
placements and random prompt sets, flexrun's greedy tokens and logits against HF's (float32).

A case is drawn whole (``cases()``): the family's real config class with random valid dims and flags (odd
hidden sizes and head counts, GQA ratios, partial rotary, tied and untied heads, pre/post layer norm, special
ids anywhere, inside the vocabulary, outside it, negative or absent), a placement (shares on every tier, the
micro-batch shape, overlap, host-side attention), prompts (lengths 1..what the positions allow, duplicates,
tokens equal to the special ids) and a new-token count, sometimes with one of HF's greedy tokens as EOS.

Two profiles: the CI one runs a fixed, derandomized set of examples (``FUZZ_CI_EXAMPLES``) in about a
minute; the long one (``pytest -m slow tests/test_fuzz_vs_hf.py`` or ``FLEXRUN_FUZZ_MINUTES=30``) draws fresh
examples for ``FLEXRUN_FUZZ_MINUTES`` (default 30) and prints how many it ran. A failure hypothesis finds is
shrunk and printed as a ``Case``; it becomes a plain test in tests/test_fuzz_regressions.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as T
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from flexrun.placement import Placement, Shares
from flexrun.runtime.engine import Engine
from flexrun.runtime.sampling import SamplingParams
from flexrun.weights.store import TensorStore
from tests.helpers import save_and_convert
from tests.hf_reference import logits_by_prompt

FAMILIES = ("opt", "gpt2", "bloom", "gptj", "gpt_neo", "gpt_neox", "llama", "mistral", "qwen2", "mixtral", "qwen2_moe")
MODEL_CLASSES: dict[str, tuple[Any, Any]] = {
    "opt": (T.OPTConfig, T.OPTForCausalLM),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel),
    "bloom": (T.BloomConfig, T.BloomForCausalLM),
    "gptj": (T.GPTJConfig, T.GPTJForCausalLM),
    "gpt_neo": (T.GPTNeoConfig, T.GPTNeoForCausalLM),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM),
    "llama": (T.LlamaConfig, T.LlamaForCausalLM),
    "mistral": (T.MistralConfig, T.MistralForCausalLM),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM),
    "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM),
}
# float32 on both sides: logits differ only by summation order (fused QKV, SDPA vs HF's eager kernels,
# padding columns, one matmul over a block's rows), ~1e-6 relative; 1e-4 of the largest logit leaves room
# for a random model whose logits reach the hundreds.
LOGIT_TOL = 1e-4
FUZZ_CI_EXAMPLES = 120


@dataclass(frozen=True)
class Case:
    """One drawn example: everything needed to rebuild it (printed by hypothesis when it fails)."""

    family: str
    hf: dict[str, Any]  # the config class's kwargs
    seed: int
    placement: Placement
    prompts: list[list[int]]
    new: int
    slack: int = 0  # positions the engine is sized for beyond the longest prompt + new
    eos_pick: tuple[int, int] | None = None  # (prompt, step) of HF's greedy token that becomes EOS
    init_range: float = 0.3


# ---- models ----------------------------------------------------------------------------------------------
def build_model(case: Case) -> Any:
    """The case's random-initialised HF model (float32, eval), norms and biases random too, so a slot mapped
    to the wrong place cannot hide behind the default 1/0 initialisation."""
    config_cls, model_cls = MODEL_CLASSES[case.family]
    config = config_cls(initializer_range=case.init_range, **case.hf)
    torch.manual_seed(case.seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 1:  # norm weights
                p.normal_(1.0, 0.1)
    return model


def hf_greedy_tokens(model: Any, prompts: list[list[int]], new: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """HF's greedy continuation of each prompt alone (no padding, every token attended to): exactly ``new``
    tokens each and the per-step logits (new, vocab)."""
    tokens, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                # Not the config's pad id: HF's generate refuses a negative one; nothing is padded here.
                pad_token_id=0,
                eos_token_id=None,
                output_logits=True,
                return_dict_in_generate=True,
            )
            tokens.append(out.sequences[0, len(prompt) :].tolist())
            logits.append(torch.stack([step[0] for step in out.logits]).float())
    return tokens, logits


def _upto_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def _near_tie(logits: torch.Tensor, tol: float) -> bool:
    """Whether the top two logits of a step are within ``tol``: a greedy choice summation order may flip."""
    top = logits.topk(2).values
    return bool(top[0] - top[1] <= tol)


def check_case(case: Case, workdir: Path) -> None:
    """flexrun's greedy tokens and logits equal HF's for the case (see the module docstring)."""
    model = build_model(case)
    save_and_convert(model, workdir)
    store = TensorStore(workdir / "store")
    ref_tokens, ref_logits = hf_greedy_tokens(model, case.prompts, case.new)
    scale = max(1.0, max(float(t.abs().max()) for t in ref_logits))
    tol = LOGIT_TOL * scale
    stop = case.eos_pick is not None
    if case.eos_pick is not None:
        p, step = case.eos_pick
        eos = ref_tokens[p % len(ref_tokens)][step % case.new]
        store.config = dataclasses.replace(store.config, eos_token_id=eos)
        ref_tokens = [_upto_eos(t, eos) for t in ref_tokens]
    max_len = max(map(len, case.prompts)) + case.new + case.slack
    params = SamplingParams(max_new_tokens=case.new, stop_at_eos=stop)
    with Engine(store, case.placement, max_seq_len=max_len, offload_dir=workdir / "offload") as engine:
        out, stats, logits = engine.generate(case.prompts, params, return_logits=not stop)
    assert stats.generated_tokens >= sum(map(len, out))
    for n, (got, want) in enumerate(zip(out, ref_tokens, strict=True)):
        k = _first_difference(got, want)
        if k is None:
            continue
        # A flipped near-tie is summation order, not a bug: the tokens agree up to it.
        tie = k < min(len(got), len(want)) and _near_tie(ref_logits[n][k], 2 * tol)
        assert tie, f"prompt {n}: flexrun {got} != HF {want} (first difference at step {k})"
        note(f"prompt {n}: near-tie at step {k}")
    if stop:
        return
    got_logits = logits_by_prompt(logits, case.prompts, case.placement.block_size, case.new)
    for n in range(len(case.prompts)):
        # Up to the first step a near-tie flipped, where both sides still saw the same tokens.
        k = _first_difference(out[n], ref_tokens[n])
        upto = case.new if k is None else k + 1
        torch.testing.assert_close(got_logits[n][:upto], ref_logits[n][:upto], rtol=LOGIT_TOL, atol=tol)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    """The first step at which two token lists differ (a length difference counts), or None."""
    k = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return None if k == len(a) == len(b) else k


# ---- strategies ------------------------------------------------------------------------------------------
def special_id(vocab: int, allow_outside: bool = True, allow_negative: bool = False) -> st.SearchStrategy[Any]:
    """A config's bos/eos/pad id: absent, inside the vocabulary, or outside it (GPT-J's 50256 in a small one)."""
    inside = st.integers(0, vocab - 1)
    options = [st.none(), inside]
    if allow_outside:
        options.append(st.sampled_from([vocab, vocab + 7, 50256, 2**31 - 1]))
    if allow_negative:
        options.append(st.just(-1))  # early LLaMA configs
    return st.one_of(*options)


@st.composite
def heads_and_dim(draw: st.DrawFn, even_dim: bool, max_hidden: int = 64) -> tuple[int, int]:
    heads = draw(st.integers(1, 4))
    top = max_hidden // heads
    head_dim = 2 * draw(st.integers(1, top // 2)) if even_dim else draw(st.integers(2, top))
    return heads, head_dim


@st.composite
def hf_config(draw: st.DrawFn, family: str, positions: int) -> dict[str, Any]:
    """Random valid kwargs of ``family``'s HF config class; ``positions`` is the context the case needs."""
    vocab = draw(st.integers(3, 299))
    layers = draw(st.integers(1, 2))
    ffn = draw(st.integers(1, 96))
    tie = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-6, 1e-3]))
    n_pos = positions + draw(st.integers(0, 8))
    ids: dict[str, Any] = {
        "vocab_size": vocab,
        "bos_token_id": draw(special_id(vocab)),
        "eos_token_id": draw(st.one_of(special_id(vocab), st.lists(st.integers(0, vocab - 1), min_size=1, max_size=2))),
        "tie_word_embeddings": tie,
    }
    if family == "opt":
        heads, hd = draw(heads_and_dim(even_dim=False))
        hidden = heads * hd
        pre = draw(st.booleans())
        proj = draw(st.sampled_from([hidden, hidden, draw(st.integers(2, 48))]))
        return {
            **ids,
            # HF's embedding takes the pad id as padding_idx, which must index the table.
            "pad_token_id": draw(special_id(vocab, allow_outside=False)),
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "ffn_dim": ffn,
            "max_position_embeddings": n_pos,
            "do_layer_norm_before": pre,
            "_remove_final_layer_norm": pre and draw(st.booleans()),
            "word_embed_proj_dim": proj,
            "activation_function": draw(st.sampled_from(["relu", "gelu", "gelu_new"])),
            "enable_bias": draw(st.booleans()),
            "dropout": 0.0,
        }
    if family == "gpt2":
        heads, hd = draw(heads_and_dim(even_dim=False))
        return {
            **ids,
            "pad_token_id": draw(special_id(vocab)),
            "n_embd": heads * hd,
            "n_head": heads,
            "n_layer": layers,
            "n_inner": draw(st.one_of(st.none(), st.just(ffn))),
            "n_positions": n_pos,
            "activation_function": draw(st.sampled_from(["relu", "gelu", "gelu_new", "gelu_pytorch_tanh"])),
            "scale_attn_weights": draw(st.booleans()),
            "scale_attn_by_inverse_layer_idx": draw(st.booleans()),
            "layer_norm_epsilon": eps,
        }
    if family == "bloom":
        heads, hd = draw(heads_and_dim(even_dim=False, max_hidden=48))
        return {
            **ids,
            "pad_token_id": draw(special_id(vocab)),
            "hidden_size": heads * hd,
            "n_head": heads,
            "n_layer": layers,
            "layer_norm_epsilon": eps,
        }
    if family == "gptj":
        heads, hd = draw(heads_and_dim(even_dim=False))
        return {
            **ids,
            "pad_token_id": draw(special_id(vocab)),
            "n_embd": heads * hd,
            "n_head": heads,
            "n_layer": layers,
            "n_inner": draw(st.one_of(st.none(), st.just(ffn))),
            "n_positions": n_pos,
            "rotary_dim": 2 * draw(st.integers(1, hd // 2)) if hd >= 2 else 2,
            "activation_function": draw(st.sampled_from(["relu", "gelu", "gelu_new"])),
            "layer_norm_epsilon": eps,
        }
    if family == "gpt_neo":
        heads, hd = draw(heads_and_dim(even_dim=False))
        kinds = draw(st.lists(st.sampled_from(["global", "local"]), min_size=layers, max_size=layers))
        return {
            **ids,
            "pad_token_id": draw(special_id(vocab)),
            "hidden_size": heads * hd,
            "num_heads": heads,
            "num_layers": layers,
            "attention_types": [[kinds, 1]],
            "window_size": draw(st.integers(1, 8)),
            "intermediate_size": draw(st.one_of(st.none(), st.just(ffn))),
            "max_position_embeddings": n_pos,
            "activation_function": draw(st.sampled_from(["relu", "gelu", "gelu_new"])),
            "layer_norm_epsilon": eps,
        }
    if family == "gpt_neox":
        heads, hd = draw(heads_and_dim(even_dim=True))
        rot = 2 * draw(st.integers(1, hd // 2))  # rotary dims on each head: partial or whole, always even
        return {
            **ids,
            "pad_token_id": draw(special_id(vocab)),
            "hidden_size": heads * hd,
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "intermediate_size": ffn,
            "rotary_pct": rotary_fraction(rot, hd),
            "rotary_emb_base": draw(st.sampled_from([10000.0, 500.0, 37.5])),
            "use_parallel_residual": draw(st.booleans()),
            "attention_bias": draw(st.booleans()),
            "hidden_act": draw(st.sampled_from(["gelu", "relu", "gelu_new", "silu"])),
            "max_position_embeddings": n_pos,
            "layer_norm_eps": eps,
        }
    if family == "llama":
        heads, hd = draw(heads_and_dim(even_dim=True))
        kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
        return {
            **ids,
            "pad_token_id": draw(special_id(vocab, allow_outside=False, allow_negative=True)),
            "hidden_size": heads * hd,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "num_hidden_layers": layers,
            "intermediate_size": ffn,
            "rope_theta": draw(st.sampled_from([10000.0, 500.0, 37.5])),
            "attention_bias": draw(st.booleans()),
            "mlp_bias": draw(st.booleans()),
            "max_position_embeddings": n_pos,
            "rms_norm_eps": eps,
        }
    return _llama_like(draw, family, ids, layers, ffn, n_pos, eps)


def _llama_like(
    draw: st.DrawFn, family: str, ids: dict[str, Any], layers: int, ffn: int, n_pos: int, eps: float
) -> dict[str, Any]:
    """Mistral, Qwen2, Mixtral, Qwen2-MoE: LLaMA's layer with sliding windows (every layer, or the layers
    Qwen2's rules pick) and, for the last two, a mixture of 4-8 experts routing each token to 1 or 2."""
    heads, hd = draw(heads_and_dim(even_dim=True))
    kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    # From 2: at a window of 1 HF's sliding-window cache keeps no past token and its cached decode disagrees
    # with its own full forward pass (checked on transformers 5.24), so HF is no reference there.
    window = draw(st.integers(2, 8))
    out = {
        **ids,
        "pad_token_id": draw(special_id(ids["vocab_size"], allow_outside=False)),
        "hidden_size": heads * hd,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_hidden_layers": layers,
        "intermediate_size": ffn,
        "rope_theta": draw(st.sampled_from([10000.0, 500.0, 37.5])),
        "max_position_embeddings": n_pos,
        "rms_norm_eps": eps,
    }
    if family in ("mistral", "mixtral"):
        out["sliding_window"] = draw(st.one_of(st.none(), st.just(window)))
    else:  # Qwen2's windows: only with use_sliding_window, in the layers max_window_layers / layer_types pick
        out |= {
            "use_sliding_window": draw(st.booleans()),
            "sliding_window": window,
            "max_window_layers": draw(st.integers(0, layers)),
        }
    if family in ("mixtral", "qwen2_moe"):
        experts = draw(st.integers(4, 8))
        # HF's default experts kernel (torch._grouped_mm) needs 16-byte strides, which odd sizes break; its
        # eager loop is the reference.
        out |= {"num_experts_per_tok": draw(st.integers(1, 2)), "experts_implementation": "eager"}
        if family == "mixtral":
            out["num_local_experts"] = experts
        else:
            out |= {
                "num_experts": experts,
                "moe_intermediate_size": draw(st.integers(1, 32)),
                "shared_expert_intermediate_size": draw(st.integers(1, 32)),
                "norm_topk_prob": draw(st.booleans()),
                "qkv_bias": draw(st.booleans()),
            }
    return out


def rotary_fraction(rot: int, head_dim: int) -> float:
    """The rotary_pct whose product with ``head_dim`` truncates to ``rot`` (as HF and flexrun both compute
    int(head_dim * pct)): 30 / 52 * 52 is 29.999..., which both would take as 29."""
    pct = rot / head_dim
    while int(head_dim * pct) < rot:
        pct = math.nextafter(pct, 2.0)
    return pct


@st.composite
def shares(draw: st.DrawFn) -> Shares:
    """Percentages on device / host / disk summing to 100 (device folds into host on a CPU)."""
    a = draw(st.integers(0, 100))
    b = draw(st.integers(0, 100 - a))
    return Shares(device=a / 100, host=b / 100, disk=(100 - a - b) / 100)


@st.composite
def placements(draw: st.DrawFn) -> Placement:
    return Placement(
        draw(shares()),
        draw(shares()),
        draw(shares()),
        gpu_batch_size=draw(st.integers(1, 4)),
        num_gpu_batches=draw(st.integers(1, 3)),
        cpu_cache_compute=draw(st.booleans()),
        overlap=draw(st.booleans()),
    )


@st.composite
def prompt_sets(draw: st.DrawFn, vocab: int, longest: int, specials: list[int]) -> list[list[int]]:
    """1..7 prompts of 1..``longest`` tokens, some repeated, tokens sometimes equal to the special ids."""
    token = st.one_of(st.integers(0, vocab - 1), st.sampled_from(specials)) if specials else st.integers(0, vocab - 1)
    one = st.lists(token, min_size=1, max_size=longest)
    prompts = draw(st.lists(one, min_size=1, max_size=7))
    for _ in range(draw(st.integers(0, 2))):  # duplicates
        prompts.append(list(draw(st.sampled_from(prompts))))
    return prompts


def _specials(hf: dict[str, Any]) -> list[int]:
    found = []
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = hf.get(key)
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, int) and 0 <= x < hf["vocab_size"]:
                found.append(x)
    return sorted(set(found))


@st.composite
def cases(draw: st.DrawFn, families: tuple[str, ...] = FAMILIES) -> Case:
    family = draw(st.sampled_from(families))
    longest = draw(st.integers(1, 12))
    new = draw(st.integers(1, 5))
    slack = draw(st.integers(0, 3))
    hf = draw(hf_config(family, positions=longest + new + slack))
    prompts = draw(prompt_sets(hf["vocab_size"], longest, _specials(hf)))
    eos_pick = draw(st.one_of(st.none(), st.tuples(st.integers(0, 8), st.integers(0, 4))))
    return Case(
        family=family,
        hf=hf,
        seed=draw(st.integers(0, 2**16)),
        placement=draw(placements()),
        prompts=prompts,
        new=new,
        slack=slack,
        eos_pick=eos_pick,
        init_range=draw(st.sampled_from([0.02, 0.3, 0.6])),
    )


# ---- the profiles ----------------------------------------------------------------------------------------
def _run(case: Case) -> None:
    note(repr(case))
    with tempfile.TemporaryDirectory(prefix="fuzz-") as d:
        check_case(case, Path(d))


CI = settings(
    max_examples=FUZZ_CI_EXAMPLES,
    derandomize=True,  # the same examples on every run: a CI failure reproduces
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@CI
@given(cases())
def test_engine_matches_hf_on_random_models_placements_and_prompts(case: Case) -> None:
    _run(case)


def _long_requested(config: pytest.Config) -> float:
    """Minutes the long profile runs for: FLEXRUN_FUZZ_MINUTES, else 30 when ``-m slow`` selected it, else 0."""
    if os.environ.get("FLEXRUN_FUZZ_MINUTES"):
        return float(os.environ["FLEXRUN_FUZZ_MINUTES"])
    expr = config.getoption("markexpr") or ""
    return 30.0 if "slow" in expr and "not slow" not in expr else 0.0


@pytest.mark.slow
def test_engine_matches_hf_long_profile(request: pytest.FixtureRequest) -> None:
    """Fresh random examples for the requested minutes, in rounds of 25 (each round's seed random, its
    failures saved in hypothesis's example database for the next run); prints the count."""
    minutes = _long_requested(request.config)
    if not minutes:
        pytest.skip("the long fuzz profile runs with -m slow or FLEXRUN_FUZZ_MINUTES=N")
    count = {"examples": 0}

    @settings(
        max_examples=25,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(cases())
    def round_(case: Case) -> None:
        count["examples"] += 1
        _run(case)

    start = time.monotonic()
    rounds = 0
    failures: list[str] = []  # a failing round is recorded and the profile goes on, to find more than one bug
    while time.monotonic() - start < minutes * 60:
        try:
            round_()
        except Exception as exc:  # the shrunk example is in the exception's notes
            failures.append("".join(traceback.format_exception(exc)[-3:]) + "\n".join(getattr(exc, "__notes__", [])))
            print(f"\nround {rounds}: FAILED\n{failures[-1]}", flush=True)
        rounds += 1
        print(
            f"fuzz: {count['examples']} examples, {rounds} rounds, {(time.monotonic() - start) / 60:.1f} min",
            flush=True,
        )
    elapsed = time.monotonic() - start
    print(
        f"\nlong fuzz profile: {count['examples']} examples in {rounds} rounds, {elapsed / 60:.1f} min, {len(failures)} failed"
    )
    assert not failures, "\n\n".join(failures)
