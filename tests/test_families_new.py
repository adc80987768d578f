"""Mistral, Qwen2 and the scaled rope variants (linear, dynamic NTK, yarn, llama3, longrope) against Hugging Face
transformers: tiny random models from each architecture's real config class, converted with flexrun's converter
and generated in float32 with left-padded prompts of mixed lengths, in memory and with weights and cache on disk.

The prompts (and the tokens generated after them) are longer than every sliding window and every original
context, so windows and scaling change the result (``test_windows_and_scaling_change_hf_logits`` checks that).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as T

from flexrun.config import DTYPE_BYTES, OptConfig
from flexrun.errors import ConfigError
from flexrun.kernels.positions import Rope
from flexrun.policies import policy_for_hf_config, policy_for_layer
from flexrun.policies.base import rope_fields
from flexrun.resolver import config_from_path
from flexrun.runtime.engine import Engine
from flexrun.runtime.sampling import SamplingParams
from flexrun.weights.store import TensorStore
from tests.helpers import place, run, save_and_convert
from tests.hf_reference import hf_greedy, hf_param_bytes, logits_by_prompt

VOCAB = 211
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# Mixed lengths, all in one micro-batch in the first placement (left-padded); the longest, 12 + NEW tokens, is
# past every window (3 to 5) and every original context (8).
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37], [40, 41]]
NEW = 6
MAX_LEN = 18
PLACEMENTS = {
    "host-one-microbatch": place("host=100", "host=100", b=8, n=1),
    "weights-and-cache-on-disk": place("host=50,disk=50", "disk=100", b=2, n=2),
}
LLAMA = dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=3, num_key_value_heads=1, intermediate_size=80)
ROPES: dict[str, dict[str, Any]] = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    # transformers' dynamic NTK scales up from max_position_embeddings (8 here); flexrun runs to 3 x 8 tokens.
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    "longrope": {
        "rope_type": "longrope",
        "long_factor": [1.0, 1.5, 2.0, 4.0, 6.0, 8.0, 9.0, 10.0],
        "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
        "original_max_position_embeddings": 8,
    },
}

# case -> (config class, model class, config kwargs)
CASES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(LLAMA, sliding_window=4, rope_theta=500.0)),
    # Windows in layers 1 and 2 only (max_window_layers), odd head count and head dim 8, an untied head.
    "qwen2": (
        T.Qwen2Config,
        T.Qwen2ForCausalLM,
        dict(
            num_hidden_layers=3,
            hidden_size=40,
            num_attention_heads=5,
            num_key_value_heads=1,
            intermediate_size=72,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
            tie_word_embeddings=False,
        ),
    ),
    # Qwen2.5-0.5B's shape of things: a tied head, no windows (use_sliding_window off), GQA 4:2.
    "qwen2-tied": (
        T.Qwen2Config,
        T.Qwen2ForCausalLM,
        dict(
            num_hidden_layers=2,
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=56,
            sliding_window=3,
            max_window_layers=0,
            tie_word_embeddings=True,
        ),
    ),
    # Windows where layer_types says, and a Qwen2.5-style yarn rope.
    "qwen2-layer-types-yarn": (
        T.Qwen2Config,
        T.Qwen2ForCausalLM,
        dict(
            num_hidden_layers=2,
            hidden_size=40,
            num_attention_heads=5,
            num_key_value_heads=5,
            intermediate_size=72,
            use_sliding_window=True,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8},
        ),
    ),
    **{
        f"llama-{kind}": (
            T.LlamaConfig,
            T.LlamaForCausalLM,
            dict(LLAMA, rope_theta=500.0, rope_scaling=rope, max_position_embeddings=8 if kind == "dynamic" else 64),
        )
        for kind, rope in ROPES.items()
    },
    # Partial rotary (half of each head) with dynamic NTK on a parallel-residual layer.
    "gpt_neox-dynamic": (
        T.GPTNeoXConfig,
        T.GPTNeoXForCausalLM,
        dict(
            num_hidden_layers=2,
            hidden_size=48,
            num_attention_heads=3,
            intermediate_size=80,
            rotary_pct=0.5,
            max_position_embeddings=8,
            rope_scaling={"rope_type": "dynamic", "factor": 3.0},
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


def hf_alone(model: Any, prompts: list[list[int]], new: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """HF's greedy tokens and logits of each prompt generated alone by a fresh copy of ``model``: a dynamic rope
    keeps the longest length it has seen across calls, which would leak one prompt's scaling into the next."""
    tokens, logits = [], []
    for prompt in prompts:
        t, lg = hf_greedy(copy.deepcopy(model), [prompt], new)
        tokens += t
        logits += lg
    return tokens, logits


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    name = request.param
    model = tiny(name, seed=3)
    d = tmp_path_factory.mktemp(name)
    save_and_convert(model, d)
    tokens, logits = hf_alone(model, PROMPTS, NEW)
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
        # float32 on both sides: only summation order differs (fused QKV, SDPA vs HF's kernels, padding
        # columns), about 1e-6 relative on logits of magnitude ~10.
        torch.testing.assert_close(got[n], case["logits"][n], rtol=1e-4, atol=1e-4)
    if "disk" in pl.weights.spec():
        assert stats.disk_bytes_read > 0


def test_model_and_cache_bytes_equal_hf(case: dict[str, Any]) -> None:
    cfg = dataclasses.replace(config_from_path(case["dir"] / "ckpt"), dtype="float32")
    # HF counts a tied LM head once, as model_bytes does; Qwen2's q/k/v biases are in both.
    assert cfg.model_bytes() == hf_param_bytes(case["model"], 4)
    kv_heads = getattr(case["model"].config, "num_key_value_heads", None) or cfg.n_head
    assert cfg.cache_bytes(2, 10) == 2 * cfg.num_hidden_layers * 2 * 10 * kv_heads * cfg.head_dim * 4


def test_store_config_round_trips(case: dict[str, Any]) -> None:
    store = TensorStore(case["dir"] / "store")
    assert store.config == config_from_path(case["dir"] / "ckpt")
    arch = json.loads((case["dir"] / "store" / "index.json").read_text())["config"]["arch"]
    assert arch == case["name"].split("-")[0]


PLAIN = {"mistral": {"sliding_window": None}, "qwen2": {"use_sliding_window": False, "layer_types": None}}


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen2-layer-types-yarn", "llama-llama3"])
def test_windows_and_scaling_change_hf_logits(name: str) -> None:
    """The comparisons above mean something: without its window or its rope scaling, the same HF model gives
    other logits for the longest prompt."""
    model = tiny(name, seed=3)
    plain = tiny(name, seed=3, rope_scaling=None, **PLAIN.get(name.split("-")[0], {}))
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        a, b = model(ids).logits, plain(ids).logits
    assert (a - b).abs().max() > 1e-2


# ---- configs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "family", "layer"),
    [("MistralForCausalLM", "mistral", "MistralDecoderLayer"), ("Qwen2ForCausalLM", "qwen2", "Qwen2DecoderLayer")],
)
def test_registry_matches_architecture_model_type_and_layer_class(arch: str, family: str, layer: str) -> None:
    model = tiny(family)
    hf = {**model.config.to_dict(), "architectures": [arch]}
    assert policy_for_hf_config(hf).name == family
    assert policy_for_hf_config({"model_type": family}).name == family
    assert policy_for_layer(next(m for m in model.modules() if type(m).__name__ == layer)).name == family


def _config(name: str, **overrides: Any) -> OptConfig:
    model = tiny(name, **overrides)
    hf = {**model.config.to_dict(), "architectures": [type(model).__name__]}
    return policy_for_hf_config(hf).config_from_hf(hf, name=name, dtype="float32")


@pytest.mark.parametrize(
    ("overrides", "layers"),
    [
        ({}, ("global", "local", "local")),  # from max_window_layers = 1 on
        ({"max_window_layers": 2}, ("global", "global", "local")),
        ({"max_window_layers": 3}, ()),  # no layer windowed: none recorded
        ({"use_sliding_window": False}, ()),  # transformers drops the window without use_sliding_window
        ({"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}, ("local", "global", "local")),
    ],
)
def test_qwen2_windows_follow_transformers(overrides: dict[str, Any], layers: tuple[str, ...]) -> None:
    cfg = _config("qwen2", **overrides)
    model = tiny("qwen2", **overrides)
    hf_layers = [m.self_attn.sliding_window for m in model.model.layers]
    assert [cfg.attention_window(i) or None for i in range(3)] == hf_layers
    assert cfg.attention_layers == layers and cfg.window_size == (5 if layers else 0)
    assert (cfg.qkv_bias, cfg.attn_out_bias, cfg.enable_bias) == (True, False, False)


def test_mistral_window_default_and_null() -> None:
    cfg = _config("mistral")
    assert (cfg.attention_layers, cfg.window_size, cfg.attention_window(1)) == (("local",), 4, 4)
    assert _config("mistral", sliding_window=None).attention_layers == ()
    hf = {k: v for k, v in tiny("mistral").config.to_dict().items() if k != "sliding_window"}
    fields = policy_for_hf_config(hf).config_from_hf(hf, name="m", dtype="float32")
    assert fields.window_size == T.MistralConfig().sliding_window  # transformers' default when the key is absent


def test_flexrun_config_prints_the_new_families(tmp_path: Path) -> None:
    for name in ("mistral", "qwen2"):
        model = tiny(name)
        model.config.save_pretrained(tmp_path / name)
        result = run("config", str(tmp_path / name), "--json")
        assert result.exit_code == 0, result.output
        info = json.loads(result.stdout)
        assert info["config"]["arch"] == name and info["config"]["window_size"] in (4, 5)
        assert info["model_bytes"] == hf_param_bytes(model, DTYPE_BYTES[info["config"]["dtype"]])
        assert run("config", str(tmp_path / name)).exit_code == 0


# ---- rope scaling -------------------------------------------------------------------------------------
def _rope_config(rope: dict[str, Any], max_positions: int, legacy: bool = False, **hf_extra: Any) -> OptConfig:
    """The flexrun config of a LLaMA whose config.json carries ``rope`` (as rope_scaling with the old "type" key
    when ``legacy``)."""
    hf = {**LLAMA, "max_position_embeddings": max_positions, "rope_theta": 500.0, **hf_extra}
    if legacy:
        hf["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in rope.items()}
    else:
        hf["rope_parameters"] = {**rope, "rope_theta": 500.0}
    fields = rope_fields(hf, 16, "tiny", max_positions)
    return OptConfig(
        name="tiny", num_hidden_layers=2, hidden_size=48, n_head=3, ffn_embed_dim=80, position="rotary", **fields
    )


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rope_angles_equal_transformers_step_by_step(kind: str) -> None:
    """Rope's cos and sin against transformers' rotary embedding, for a prefill and each decode step after it
    (a dynamic rope recomputed at every forward from the sequence's length), several sequences in one batch
    each getting the angles transformers gives it alone."""
    max_positions = 8 if kind == "dynamic" else 64
    hf_config = T.LlamaConfig(
        **LLAMA, rope_theta=500.0, max_position_embeddings=max_positions, rope_scaling=ROPES[kind]
    )
    cfg = _rope_config(ROPES[kind], max_positions)
    assert cfg.rope_type == kind and cfg.max_seq_len == (24 if kind == "dynamic" else 64)
    rope = Rope(cfg)
    lengths = [3, 8, 9, 13]
    want = []
    for n in lengths:  # each sequence alone in a fresh HF rotary embedding: its prefill, then 5 decode steps
        emb = T.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
        x = torch.zeros(1)
        steps = [emb(x, torch.arange(n)[None])] + [emb(x, torch.tensor([[t]])) for t in range(n, n + 5)]
        want.append(steps)
    # The batch left-padded as the engine feeds it: padding at position -1.
    width = max(lengths)
    pos = torch.stack([torch.cat([torch.full((width - n,), -1), torch.arange(n)]) for n in lengths])
    cos, sin = rope.cos_sin(pos, torch.float32)
    for r, n in enumerate(lengths):
        torch.testing.assert_close(cos[r, 0, width - n :], want[r][0][0][0], rtol=0, atol=0)
        torch.testing.assert_close(sin[r, 0, width - n :], want[r][0][1][0], rtol=0, atol=0)
    for step in range(5):
        cos, sin = rope.cos_sin(torch.tensor([[n + step] for n in lengths]), torch.float32)
        for r in range(len(lengths)):
            torch.testing.assert_close(cos[r, 0], want[r][step + 1][0][0], rtol=0, atol=0)
            torch.testing.assert_close(sin[r, 0], want[r][step + 1][1][0], rtol=0, atol=0)


def test_rope_parameters_read_as_transformers_reads_them() -> None:
    yarn = {"rope_type": "yarn", "factor": 4.0}
    new, old = _rope_config(yarn, 32), _rope_config(yarn, 32, legacy=True)
    assert new == old
    # llama3 / yarn / longrope without an original context take max_position_embeddings; a top-level
    # original_max_position_embeddings counts only for a config class that declares it (Phi-3), not LLaMA's.
    assert new.rope_parameters == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    for rope in (yarn, {**yarn, "original_max_position_embeddings": 16}):
        ours = _rope_config(rope, 32, original_max_position_embeddings=8).rope_parameters
        hf = T.LlamaConfig.from_dict({**LLAMA, "rope_scaling": dict(rope), "max_position_embeddings": 32})
        hf_top = T.LlamaConfig.from_dict(
            {**LLAMA, "rope_scaling": dict(rope), "max_position_embeddings": 32, "original_max_position_embeddings": 8}
        )
        assert ours["original_max_position_embeddings"] == hf.rope_parameters["original_max_position_embeddings"]
        assert ours["original_max_position_embeddings"] == hf_top.rope_parameters["original_max_position_embeddings"]
    # rope_scaling wins over rope_parameters when config.json has both (transformers 5's conversion).
    both = {**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "default"}}
    assert rope_fields(both, 16, "t", 64)["rope_scaling"]["rope_type"] == "linear"
    assert "rope_scaling" not in rope_fields({**LLAMA, "rope_theta": 500.0}, 16, "t", 64)


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        ({"rope_type": "proportional", "factor": 2.0}, "rope scaling 'proportional' is not supported"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "needs 'high_freq_factor'"),
        ({"type": "linear"}, "rope scaling 'linear' needs 'factor'"),
        ({"full_attention": {"rope_type": "default"}}, "rope parameters per layer type are not supported"),
    ],
)
def test_unsupported_rope_parameters_are_refused(rope: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        rope_fields({**LLAMA, "rope_scaling": rope}, 16, "tiny", 64)


def test_rope_scaling_keeps_the_config_frozen_hashable_and_round_trips() -> None:
    cfg = _rope_config(ROPES["longrope"], 64)
    assert cfg.rope_scaling == tuple(sorted(cfg.rope_scaling))
    assert isinstance(dict(cfg.rope_scaling)["long_factor"], tuple) and hash(cfg)
    # The store's index is JSON: a dict of lists comes back as the same config.
    back = OptConfig(**json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and hash(back) == hash(cfg)
    assert cfg.to_dict()["rope_scaling"]["long_factor"] == ROPES["longrope"]["long_factor"]
    # Unscaled configs write no rope_scaling key: stored indexes and the store keys hashed from them stay as they were.
    assert "rope_scaling" not in dataclasses.replace(cfg, rope_scaling=()).to_dict()
    with pytest.raises(ConfigError, match="rope_type must be one of"):
        dataclasses.replace(cfg, rope_scaling={"rope_type": "su", "factor": 2.0})
    with pytest.raises(ConfigError, match="must be a finite number"):
        dataclasses.replace(cfg, rope_scaling={"rope_type": "linear", "factor": float("nan")})
    with pytest.raises(ConfigError, match="needs rotary positions"):
        OptConfig(
            name="t", num_hidden_layers=1, hidden_size=8, n_head=2, ffn_embed_dim=8, rope_scaling=cfg.rope_scaling
        )


def test_a_windowed_layer_keeps_only_its_window_in_a_disk_cache(tmp_path: Path) -> None:
    """A cache on disk, prompts far longer than Mistral's window: each layer's disk slot is a ring of the window's
    pages, which is all a decode step reads (the staging rows before the window stale, masked), and the tokens
    and logits still equal HF's."""
    window, new, prompts = 4, 4, [list(range(3, 43)), list(range(50, 87))]  # 40 and 37 tokens
    model = tiny("mistral", seed=5, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, sliding_window=window)
    save_and_convert(model, tmp_path)
    tokens, logits = hf_greedy(model, prompts, new)
    pl = place("host=100", "disk=100", b=1, n=2)
    with Engine(TensorStore(tmp_path / "store"), pl, max_seq_len=48, offload_dir=tmp_path / "off") as engine:
        out, stats, got = engine.generate(
            prompts, SamplingParams(max_new_tokens=new, stop_at_eos=False), return_logits=True
        )
        files = sorted(engine.workdir.glob("kv-*.bin"))
        sizes = {f.stat().st_size for f in files}
    assert out == tokens
    got_by_prompt = logits_by_prompt(got, prompts, pl.block_size, new)
    for n in range(len(prompts)):
        torch.testing.assert_close(got_by_prompt[n], logits[n], rtol=1e-4, atol=1e-4)
    # One sequence's K (or V) row is 64 float32 values: the window's 4 rows fit one 4096-byte page, a ring of
    # 16 rows, against 48 rows (12 pages) for the whole slot.
    ring = 4096
    assert len(files) == 2 * 2 and sizes == {2 * ring}
    # Each decode step reads each ring (K and V) of 2 layers x 2 micro-batches once.
    assert stats.decode_bytes_read == (new - 1) * 2 * 2 * 2 * ring
