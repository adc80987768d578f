"""Mixtral and Qwen2-MoE against Hugging Face transformers: tiny random models from each architecture's real config
class (odd sizes, GQA, top-1 and top-2 routing over 4 to 8 experts, Qwen2-MoE's shared expert, renormalised and
raw top-k weights, sliding windows shorter than the prompts), converted with flexrun's converter and generated in
float32 with left-padded prompts of mixed lengths, in memory and with weights and cache on disk; and the experts a
step reads counted against the union of the experts HF's routers chose for the step's tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as T

from flexrun.costmodel.equations import cost_terms
from flexrun.costmodel.hardware import PRESETS
from flexrun.costmodel.hotset import derived_shares, hot_terms
from flexrun.costmodel.prediction import placement_shares
from flexrun.errors import ConfigError
from flexrun.jobs.report import summary_dict, summary_text
from flexrun.layout import active_layer_bytes, active_params, expected_experts, stack_layout
from flexrun.policies import config_from_hf, policy_for_hf_config, policy_for_layer
from flexrun.resolver import config_from_path
from flexrun.runtime.engine import Engine
from flexrun.runtime.sampling import SamplingParams
from flexrun.weights.convert import convert_model
from flexrun.weights.store import TensorStore
from tests.helpers import place, run, save_and_convert
from tests.hf_reference import hf_greedy, hf_param_bytes, logits_by_prompt

VOCAB = 211
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# Mixed lengths, left-padded in one micro-batch in the first placement; the longest is past every window (4, 5).
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37], [40, 41]]
NEW = 5
MAX_LEN = 17
PLACEMENTS = {
    "host-one-microbatch": place("host=100", "host=100", b=8, n=1),
    "weights-and-cache-on-disk": place("host=50,disk=50", "disk=100", b=2, n=2),
}

# case -> (config class, model class, config kwargs)
CASES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    # Top-2 of 6, GQA 5:1, head dim 8, an odd expert width.
    "mixtral-top2": (
        T.MixtralConfig,
        T.MixtralForCausalLM,
        dict(
            num_hidden_layers=2,
            hidden_size=40,
            num_attention_heads=5,
            num_key_value_heads=1,
            intermediate_size=24,
            num_local_experts=6,
            num_experts_per_tok=2,
            rope_theta=500.0,
        ),
    ),
    # Top-1 of 8 with a sliding window of 4.
    "mixtral-top1-window": (
        T.MixtralConfig,
        T.MixtralForCausalLM,
        dict(
            num_hidden_layers=2,
            hidden_size=48,
            num_attention_heads=3,
            num_key_value_heads=3,
            intermediate_size=20,
            num_local_experts=8,
            num_experts_per_tok=1,
            sliding_window=4,
        ),
    ),
    # Top-2 of 5, raw top-k weights (norm_topk_prob off, Qwen1.5-MoE's setting), a shared expert, q/k/v biases.
    "qwen2_moe-top2-shared": (
        T.Qwen2MoeConfig,
        T.Qwen2MoeForCausalLM,
        dict(
            num_hidden_layers=2,
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=40,
            moe_intermediate_size=20,
            shared_expert_intermediate_size=28,
            num_experts=5,
            num_experts_per_tok=2,
        ),
    ),
    # Top-1 of 4, renormalised, windows in the even layers below max_window_layers (Qwen2-MoE's own rule).
    "qwen2_moe-top1-window": (
        T.Qwen2MoeConfig,
        T.Qwen2MoeForCausalLM,
        dict(
            num_hidden_layers=3,
            hidden_size=40,
            num_attention_heads=5,
            num_key_value_heads=1,
            intermediate_size=40,
            moe_intermediate_size=12,
            shared_expert_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=1,
            norm_topk_prob=True,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=2,
            tie_word_embeddings=True,
        ),
    ),
}


def tiny(name: str, seed: int = 0, **overrides: Any) -> Any:
    """The case's random-initialised model (float32, eval); norm weights and biases random too, so a slot mapped
    to the wrong place cannot hide behind the default 1/0 initialisation."""
    config_cls, model_cls, kwargs = CASES[name]
    config = config_cls(vocab_size=VOCAB, initializer_range=0.3, **IDS, **{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 1:
                p.normal_(1.0, 0.1)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    name = request.param
    model = tiny(name, seed=3)
    d = tmp_path_factory.mktemp(name)
    save_and_convert(model, d)
    tokens, logits = hf_greedy(model, PROMPTS, NEW)
    return {"name": name, "model": model, "dir": d, "tokens": tokens, "logits": logits}


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_greedy_tokens_and_logits_match_hf(case: dict[str, Any], placement: str) -> None:
    pl, d = PLACEMENTS[placement], case["dir"]
    with Engine(TensorStore(d / "store"), pl, max_seq_len=MAX_LEN, offload_dir=d / "off") as engine:
        out, stats, logits = engine.generate(
            PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False), return_logits=True
        )
    assert out == case["tokens"]
    got = logits_by_prompt(logits, PROMPTS, pl.block_size, NEW)
    for n in range(len(PROMPTS)):
        # float32 on both sides: only summation order differs (fused QKV, the experts' index_add in the same
        # ascending expert order as HF's), about 1e-6 relative on logits of magnitude ~10.
        torch.testing.assert_close(got[n], case["logits"][n], rtol=1e-4, atol=1e-4)
    cfg = TensorStore(d / "store").config
    assert stats.expert_loads == cfg.num_hidden_layers * (NEW - 1) * -(-len(PROMPTS) // pl.block_size)  # blocks
    assert 0 < stats.experts_read <= stats.expert_loads * cfg.num_experts
    if "disk" in pl.weights.spec():
        assert stats.disk_bytes_read > 0


def _hf_routes(model: Any, sequence: list[int], k: int) -> list[torch.Tensor]:
    """HF's top-k experts per layer for every position of ``sequence`` run alone: (len, k) per layer."""
    with torch.no_grad():
        out = model(torch.tensor([sequence]), output_router_logits=True)
    return [torch.topk(r.float(), k, dim=-1).indices for r in out.router_logits]


def test_experts_read_are_the_union_of_routed_experts(case: dict[str, Any], tmp_path: Path) -> None:
    """Every weight on disk: the expert tensors a run reads are exactly, load by load, those of the experts HF's
    routers send the load's tokens to (a prefill micro-batch's real prompt tokens, a decode step's block), each
    once, and never another."""
    model, d = case["model"], case["dir"]
    cfg = TensorStore(d / "store").config
    k, layers = cfg.experts_per_token, cfg.num_hidden_layers
    pl = place("disk=100", "host=100", b=2, n=2, overlap=False)
    store = TensorStore(d / "store")
    read: list[str] = []
    raw = store.read_raw

    def counting(name: str, buf: torch.Tensor | None = None) -> torch.Tensor:
        read.append(name)
        return raw(name, buf)

    store.read_raw = counting  # type: ignore[method-assign]
    log: list[tuple[int, tuple[int, ...]]] = []
    with Engine(store, pl, max_seq_len=MAX_LEN, offload_dir=tmp_path) as engine:
        assert engine.moe is not None
        engine.moe.stream.log = log
        out, stats, _ = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False))
    assert out == case["tokens"]
    # What HF routes: each prompt with its generated tokens (all but the last, never fed back) run alone.
    routes = [_hf_routes(model, p + o[:-1], k) for p, o in zip(PROMPTS, out, strict=True)]
    order = sorted(range(len(PROMPTS)), key=lambda n: -len(PROMPTS[n]))  # the engine's block order
    want: list[tuple[int, tuple[int, ...]]] = []
    decode = 0  # experts the decode steps read
    for start in range(0, len(order), pl.block_size):
        block = order[start : start + pl.block_size]
        mbs = [block[j : j + pl.gpu_batch_size] for j in range(0, len(block), pl.gpu_batch_size)]
        for i in range(layers):  # prefill: layer-major, one load per micro-batch, its prompts' real tokens
            for mb in mbs:
                union = {int(e) for n in mb for e in routes[n][i][: len(PROMPTS[n])].flatten()}
                want.append((i, tuple(sorted(union))))
        for t in range(NEW - 1):  # decode: one load per layer for the whole block
            for i in range(layers):
                union = {int(e) for n in block for e in routes[n][i][len(PROMPTS[n]) + t]}
                want.append((i, tuple(sorted(union))))
                decode += len(union)
    assert log == want
    # The store was read for exactly those experts, each once per load (its three matrices).
    expert_reads = collections.Counter(name.rsplit("_", 2)[0] for name in read if ".expert" in name)
    want_reads = collections.Counter(f"layers.{i}.expert{e}" for i, experts in want for e in experts)
    assert expert_reads == collections.Counter({n: 3 * c for n, c in want_reads.items()})
    # Not every expert every step: the test can tell a union from reading them all.
    assert any(len(experts) < cfg.num_experts for _, experts in want)
    assert stats.experts_read == decode  # the summary's figure: experts read over the decode steps
    assert stats.expert_loads == len(PROMPTS) // pl.block_size * layers * (NEW - 1)
    per_step = decode / stats.expert_loads
    assert summary_dict(cfg, pl, stats)["experts_read_per_layer_step"] == per_step
    assert f"experts: {per_step:.2f} of {cfg.num_experts} read per layer per decode step" in summary_text(
        cfg, pl, stats
    )
    assert 0 < stats.decode_bytes_read < stats.disk_bytes_read


def test_live_model_converts_like_its_checkpoint(case: dict[str, Any], tmp_path: Path) -> None:
    """A live model's fused (E, 2f, h) gate_up_proj / down_proj give the same store as the saved checkpoint's
    per-expert tensors."""
    live = TensorStore(convert_model(case["model"], tmp_path / "live", progress=False))
    saved = TensorStore(case["dir"] / "store")
    assert live.config.num_experts == saved.config.num_experts
    for name in stack_layout(saved.config).store_order:
        assert torch.equal(live.read_raw(name), saved.read_raw(name)), name


def test_model_bytes_and_config_equal_hf(case: dict[str, Any]) -> None:
    cfg = config_from_path(case["dir"] / "ckpt")
    model = case["model"]
    assert cfg.model_bytes() * 4 // cfg.dtype_bytes == hf_param_bytes(model, 4)
    hf = model.config
    assert cfg.num_experts == getattr(hf, "num_local_experts", None) or hf.num_experts
    assert cfg.experts_per_token == hf.num_experts_per_tok
    # Qwen2-MoE's sliding layers carry their window; Mixtral masks every layer with config.sliding_window.
    mixtral = isinstance(model, T.MixtralForCausalLM)
    windows = [
        hf.sliding_window if mixtral else getattr(m.self_attn, "sliding_window", None) for m in model.model.layers
    ]
    assert [cfg.attention_window(i) or None for i in range(cfg.num_hidden_layers)] == windows
    assert TensorStore(case["dir"] / "store").config == cfg
    arch = json.loads((case["dir"] / "store" / "index.json").read_text())["config"]["arch"]
    assert arch == case["name"].split("-")[0]


@pytest.mark.parametrize(
    ("name", "plain"),
    [
        ("mixtral-top1-window", {"sliding_window": None}),
        ("qwen2_moe-top1-window", {"use_sliding_window": False, "layer_types": None}),
        ("qwen2_moe-top2-shared", {"norm_topk_prob": True}),
    ],
)
def test_windows_and_renormalisation_change_hf_logits(name: str, plain: dict[str, Any]) -> None:
    """The comparisons above mean something: without its window, or with the other top-k normalisation, the
    same HF model gives other logits for the longest prompt."""
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        a, b = tiny(name, seed=3)(ids).logits, tiny(name, seed=3, **plain)(ids).logits
    assert (a - b).abs().max() > 1e-3


# ---- configs ------------------------------------------------------------------------------------------
def _hf(name: str, **overrides: Any) -> dict[str, Any]:
    model = tiny(name, **overrides)
    return {**model.config.to_dict(), "architectures": [type(model).__name__]}


@pytest.mark.parametrize(
    ("name", "family", "layer"),
    [
        ("mixtral-top2", "mixtral", "MixtralDecoderLayer"),
        ("qwen2_moe-top2-shared", "qwen2_moe", "Qwen2MoeDecoderLayer"),
    ],
)
def test_registry_matches_architecture_model_type_and_layer_class(name: str, family: str, layer: str) -> None:
    model = tiny(name)
    assert policy_for_hf_config(_hf(name)).name == family
    assert policy_for_hf_config({"model_type": family}).name == family
    assert policy_for_layer(next(m for m in model.modules() if type(m).__name__ == layer)).name == family


@pytest.mark.parametrize("bad", [{"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}])
def test_qwen2_moe_dense_layers_refused_in_one_line(bad: dict[str, Any]) -> None:
    hf = {**_hf("qwen2_moe-top2-shared"), **bad}
    with pytest.raises(ConfigError, match="every layer must be a mixture of experts"):
        config_from_hf(hf, "m")


def test_more_experts_per_token_than_experts_refused() -> None:
    hf = {**_hf("mixtral-top2"), "num_experts_per_tok": 7}
    with pytest.raises(ConfigError, match="experts_per_token must be in 1..num_experts 6"):
        config_from_hf(hf, "m")


def test_expected_experts_and_active_parameters() -> None:
    cfg = config_from_hf(_hf("mixtral-top2"), "m")  # 6 experts, top 2
    assert expected_experts(cfg, 1) == pytest.approx(2.0)
    assert expected_experts(cfg, 2) == pytest.approx(6 * (1 - (4 / 6) ** 2))
    assert expected_experts(cfg, 1000) == pytest.approx(6.0)
    assert active_layer_bytes(cfg, 1000) == pytest.approx(cfg.layer_bytes())
    expert = 3 * 40 * 24 * cfg.dtype_bytes
    assert active_layer_bytes(cfg, 1) == pytest.approx(cfg.layer_bytes() - 4 * expert)
    assert active_params(cfg) == (cfg.model_bytes() - 2 * 4 * expert) // cfg.dtype_bytes


def test_cost_model_reads_the_expected_routed_experts() -> None:
    """Weights on disk: a decode step's disk reads per layer are the expert-free part plus the expected union of
    the block's routed experts, a prefill's once per micro-batch over its tokens; the matmul FLOPs count the
    k routed experts only."""
    cfg = dataclasses.replace(config_from_hf(_hf("mixtral-top2"), "m"), dtype="float32")  # 6 experts, top 2
    hw = dataclasses.replace(PRESETS["cpu"], disk_to_host_bw=1e8)
    pl = place("disk=100", "host=100", b=2, n=3)
    terms = cost_terms(cfg, hw, 2, 3, prompt_len=4, gen_len=3)
    glob = (cfg.model_bytes() - cfg.num_hidden_layers * cfg.layer_bytes()) / cfg.num_hidden_layers
    expert = 3 * 40 * 24 * 4
    dense = cfg.layer_bytes() - 6 * expert
    # The hot set: the input embeddings are read by rows (a decode step's 6 tokens, a prefill's 3 x 8), the
    # rest whole.
    shares, hot, layers = derived_shares(terms.derived, placement_shares(pl)), hot_terms(cfg), cfg.num_hidden_layers
    whole = glob - hot.hot.gathered / layers + dense
    decode = terms.decode.links["disk->host"].value(shares)
    assert decode == pytest.approx((whole + expected_experts(cfg, 6) * expert + hot.rows_bytes(6) / layers) / 1e8)
    prefill = terms.prefill.links["disk->host"].value(shares)
    rows = hot.rows_bytes(3 * 8) / layers
    assert prefill == pytest.approx((whole + 3 * expected_experts(cfg, 8) * expert + rows) / 1e8)
    assert 2 < expected_experts(cfg, 6) < 6


def test_flexrun_config_prints_total_and_active_parameters(tmp_path: Path) -> None:
    model = tiny("qwen2_moe-top2-shared")
    model.config.save_pretrained(tmp_path / "cfg")
    info = json.loads(run("config", str(tmp_path / "cfg"), "--json").stdout)
    total = sum(p.numel() for p in model.parameters())
    unrouted = 2 * (5 - 2) * 3 * 48 * 20  # 3 experts of 3 (20 x 48) matrices in each of 2 layers
    assert (info["params"], info["active_params"]) == (total, total - unrouted)
    assert info["config"]["num_experts"] == 5 and info["config"]["shared_expert_dim"] == 28
    text = run("config", str(tmp_path / "cfg")).stdout
    assert f"{(total - unrouted) / 1e6:,.2f}M active per token" in text
