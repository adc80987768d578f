"""The policy registry: matching by config.json and by live layer class, the error for an unknown
architecture, and a policy added from outside the package running through the unchanged engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from flexrun.config import OptConfig
from flexrun.errors import CheckpointError
from flexrun.policies import Policy, TensorGetter, policy_for_hf_config, policy_for_layer, register, unregister
from flexrun.resolver import config_from_path
from flexrun.runtime.engine import Engine
from flexrun.runtime.sampling import SamplingParams
from flexrun.weights.convert import convert_checkpoint
from flexrun.weights.store import TensorStore
from tests.helpers import place
from tests.hf_decoders import FAMILIES, tiny_decoder
from tests.hf_reference import hf_greedy

EXPECTED = {
    "gpt2": "GPT2LMHeadModel",
    "bloom": "BloomForCausalLM",
    "gptj": "GPTJForCausalLM",
    "gpt_neo": "GPTNeoForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_matches_by_architecture_model_type_and_layer_class(family: str) -> None:
    model = tiny_decoder(family)
    assert type(model).__name__ == EXPECTED[family]
    hf = {**model.config.to_dict(), "architectures": [EXPECTED[family]]}  # as save_pretrained writes it
    assert policy_for_hf_config(hf).name == family
    assert policy_for_hf_config({"model_type": hf["model_type"]}).name == family
    first_layer = next(m for m in model.modules() if type(m).__name__ in policy_for_hf_config(hf).layer_classes)
    assert policy_for_layer(first_layer).name == family


def test_unknown_architecture_lists_the_supported_ones() -> None:
    with pytest.raises(
        CheckpointError, match=r"unsupported architecture MambaForCausalLM; supported architectures: .*"
    ):
        policy_for_hf_config({"architectures": ["MambaForCausalLM"], "model_type": "mamba"})
    with pytest.raises(CheckpointError, match=r"no policy for layer class Linear; supported .*LlamaForCausalLM"):
        policy_for_layer(torch.nn.Linear(2, 2))


class ToyPolicy(Policy):
    """A made-up architecture: LLaMA's layer with its own tensor names and config keys."""

    name = "toy"
    architectures = ("ToyForCausalLM",)
    model_types = ("toy",)
    layer_classes = ("ToyBlock",)

    def config_from_hf(self, hf: dict[str, Any], name: str, dtype: str) -> OptConfig:
        return OptConfig(
            name=name,
            num_hidden_layers=hf["depth"],
            hidden_size=hf["width"],
            n_head=hf["heads"],
            n_kv_head=hf["kv_heads"],
            ffn_embed_dim=hf["mlp_width"],
            vocab_size=hf["vocab"],
            max_seq_len=64,
            dtype=dtype,
            pad_token_id=0,
            eos_token_id=2,
            activation="silu",
            gated_mlp=True,
            enable_bias=False,
            norm="rmsnorm",
            norm_bias=False,
            layer_norm_eps=hf["eps"],
            position="rotary",
            rope_theta=hf["theta"],
            tie_word_embeddings=False,
            arch=self.name,
        )

    def layer_tensors(self, config: OptConfig, get: TensorGetter, i: int) -> dict[str, torch.Tensor]:
        b = f"blocks.{i}."
        return {
            "ln1_w": get(b + "norm_a"),
            "qkv_w": torch.cat([get(b + "wq"), get(b + "wk"), get(b + "wv")]),
            "out_w": get(b + "wo"),
            "ln2_w": get(b + "norm_b"),
            "gate_w": get(b + "w_gate"),
            "fc1_w": get(b + "w_up"),
            "fc2_w": get(b + "w_down"),
        }

    def global_names(self, config: OptConfig) -> dict[str, str]:
        return {"embed_tokens": "tok", "final_ln_w": "norm_out", "lm_head": "unembed"}


def test_a_policy_registered_from_a_test_runs_through_the_engine(tmp_path: Path) -> None:
    model = tiny_decoder("llama", seed=5)
    sd = model.state_dict()
    names = {"input_layernorm": "norm_a", "post_attention_layernorm": "norm_b", "self_attn.q_proj": "wq"}
    names |= {"self_attn.k_proj": "wk", "self_attn.v_proj": "wv", "self_attn.o_proj": "wo"}
    names |= {"mlp.gate_proj": "w_gate", "mlp.up_proj": "w_up", "mlp.down_proj": "w_down"}
    toy = {"tok": sd["model.embed_tokens.weight"], "norm_out": sd["model.norm.weight"], "unembed": sd["lm_head.weight"]}
    for i in range(model.config.num_hidden_layers):
        for hf_name, toy_name in names.items():
            toy[f"blocks.{i}.{toy_name}"] = sd[f"model.layers.{i}.{hf_name}.weight"].contiguous()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(toy, str(ckpt / "model.safetensors"))
    c = model.config
    toy_config = {"architectures": ["ToyForCausalLM"], "model_type": "toy", "torch_dtype": "float32"}
    toy_config |= {"depth": c.num_hidden_layers, "width": c.hidden_size, "heads": c.num_attention_heads}
    toy_config |= {"kv_heads": c.num_key_value_heads, "mlp_width": c.intermediate_size, "vocab": c.vocab_size}
    toy_config |= {"eps": c.rms_norm_eps, "theta": c.rope_parameters["rope_theta"]}
    (ckpt / "config.json").write_text(json.dumps(toy_config))

    with pytest.raises(CheckpointError, match="unsupported architecture ToyForCausalLM"):
        config_from_path(ckpt)
    register(ToyPolicy())
    try:
        convert_checkpoint(ckpt, tmp_path / "store", progress=False)
        prompts = [[5, 6, 7, 8], [9, 10]]
        placement = place("disk=100", b=1, n=2)
        with Engine(TensorStore(tmp_path / "store"), placement, max_seq_len=12, offload_dir=tmp_path) as engine:
            out, _, _ = engine.generate(prompts, SamplingParams(max_new_tokens=4, stop_at_eos=False))
    finally:
        unregister("toy")
    assert out == hf_greedy(model, prompts, 4)[0]


@pytest.mark.parametrize("family", ["gpt_neox", "gptj"])
def test_a_live_model_converts_by_its_layer_class(family: str, tmp_path: Path) -> None:
    from flexrun.weights.convert import convert_model

    model = tiny_decoder(family, seed=6)
    convert_model(model, tmp_path / "store", progress=False)
    store = TensorStore(tmp_path / "store")
    assert store.config.arch == family
    placement = place(b=4)
    prompts = [[5, 6, 7, 8], [9, 10]]
    with Engine(store, placement, max_seq_len=12, offload_dir=tmp_path) as engine:
        out, _, _ = engine.generate(prompts, SamplingParams(max_new_tokens=4, stop_at_eos=False))
    assert out == hf_greedy(model, prompts, 4)[0]


def test_a_live_model_of_an_unknown_family_lists_the_supported_ones(tmp_path: Path) -> None:
    from flexrun.weights.convert import convert_model

    with pytest.raises(CheckpointError, match=r"no policy for layer class Sequential; supported architectures"):
        convert_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
