"""GPT-J (GPTJForCausalLM): bias-free q/k/v/out, interleaved-pair rotary on rotary_dim, one layer norm
feeding attention and MLP in parallel, an untied LM head with a bias."""

from __future__ import annotations

from typing import Any

import torch

from flexrun.config import OptConfig
from flexrun.errors import ConfigError
from flexrun.policies.base import Policy, TensorGetter, require, token_ids
from flexrun.policies.gpt2 import ACTIVATIONS


class GptjPolicy(Policy):
    name = "gptj"
    architectures = ("GPTJForCausalLM",)
    model_types = ("gptj",)
    layer_classes = ("GPTJBlock",)

    def config_from_hf(self, hf: dict[str, Any], name: str, dtype: str) -> OptConfig:
        act = hf.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ConfigError(f"{name}: unsupported GPT-J activation {act!r}")
        hidden, heads = require(hf, "n_embd", name), require(hf, "n_head", name)
        return OptConfig(
            name=name,
            num_hidden_layers=require(hf, "n_layer", name),
            hidden_size=hidden,
            n_head=heads,
            ffn_embed_dim=hf.get("n_inner") or 4 * hidden,
            vocab_size=require(hf, "vocab_size", name),
            max_seq_len=hf.get("n_positions", 2048),
            dtype=dtype,
            activation=ACTIVATIONS[act],
            enable_bias=True,
            qkv_bias=False,
            attn_out_bias=False,
            position="rotary",
            rotary_dim=hf.get("rotary_dim") or hidden // heads,
            rotary_interleaved=True,
            parallel_attn=True,
            shared_norm=True,
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            lm_head_bias=True,
            arch=self.name,
            **token_ids(hf, default=50256),
        )

    def layer_tensors(self, config: OptConfig, get: TensorGetter, i: int) -> dict[str, torch.Tensor]:
        p = f"transformer.h.{i}."
        return {
            "ln1_w": get(p + "ln_1.weight"),
            "ln1_b": get(p + "ln_1.bias"),
            "qkv_w": torch.cat([get(p + f"attn.{x}_proj.weight") for x in "qkv"], dim=0),
            "out_w": get(p + "attn.out_proj.weight"),
            "fc1_w": get(p + "mlp.fc_in.weight"),
            "fc1_b": get(p + "mlp.fc_in.bias"),
            "fc2_w": get(p + "mlp.fc_out.weight"),
            "fc2_b": get(p + "mlp.fc_out.bias"),
        }

    def global_names(self, config: OptConfig) -> dict[str, str]:
        names = {
            "embed_tokens": "transformer.wte.weight",
            "final_ln_w": "transformer.ln_f.weight",
            "final_ln_b": "transformer.ln_f.bias",
        }
        if not config.tie_word_embeddings:
            names["lm_head"] = "lm_head.weight"
        if config.lm_head_bias:
            names["lm_head_b"] = "lm_head.bias"
        return names
