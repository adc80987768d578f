"""GPT-NeoX and Pythia (GPTNeoXForCausalLM): per-head interleaved query_key_value, half-rotation rotary
on a partial head dim, attention and MLP in parallel from two norms when use_parallel_residual."""

from __future__ import annotations

from typing import Any

import torch

from flexrun.config import OptConfig
from flexrun.errors import ConfigError
from flexrun.policies.base import Policy, TensorGetter, qkv_from_interleaved_heads, require, rope_settings, token_ids

ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "gelu_fast": "gelu_new", "silu": "silu"}


class GptNeoxPolicy(Policy):
    name = "gpt_neox"
    architectures = ("GPTNeoXForCausalLM",)
    model_types = ("gpt_neox",)
    layer_classes = ("GPTNeoXLayer",)
    # Checkpoints name the LM head embed_out; a live transformers 5 model calls it lm_head.
    aliases = {"embed_out.weight": "lm_head.weight"}

    def config_from_hf(self, hf: dict[str, Any], name: str, dtype: str) -> OptConfig:
        act = hf.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"{name}: unsupported GPT-NeoX activation {act!r}")
        hidden, heads = require(hf, "hidden_size", name), require(hf, "num_attention_heads", name)
        bias = bool(hf.get("attention_bias", True))
        return OptConfig(
            name=name,
            num_hidden_layers=require(hf, "num_hidden_layers", name),
            hidden_size=hidden,
            n_head=heads,
            ffn_embed_dim=hf.get("intermediate_size") or 4 * hidden,
            vocab_size=require(hf, "vocab_size", name),
            dtype=dtype,
            activation=ACTIVATIONS[act],
            qkv_bias=bias,
            attn_out_bias=bias,
            position="rotary",
            rotary_interleaved=False,
            parallel_attn=bool(hf.get("use_parallel_residual", True)),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            arch=self.name,
            **rope_settings(hf, hidden // heads, name, hf.get("max_position_embeddings", 2048)),
            **token_ids(hf, default=0),
        )

    def layer_tensors(self, config: OptConfig, get: TensorGetter, i: int) -> dict[str, torch.Tensor]:
        p = f"gpt_neox.layers.{i}."
        nh, d = config.n_head, config.head_dim
        out = {
            "ln1_w": get(p + "input_layernorm.weight"),
            "ln1_b": get(p + "input_layernorm.bias"),
            "qkv_w": qkv_from_interleaved_heads(get(p + "attention.query_key_value.weight"), nh, d),
            "out_w": get(p + "attention.dense.weight"),
            "ln2_w": get(p + "post_attention_layernorm.weight"),
            "ln2_b": get(p + "post_attention_layernorm.bias"),
            "fc1_w": get(p + "mlp.dense_h_to_4h.weight"),
            "fc1_b": get(p + "mlp.dense_h_to_4h.bias"),
            "fc2_w": get(p + "mlp.dense_4h_to_h.weight"),
            "fc2_b": get(p + "mlp.dense_4h_to_h.bias"),
        }
        if config.qkv_bias:
            out["qkv_b"] = qkv_from_interleaved_heads(get(p + "attention.query_key_value.bias"), nh, d)
        if config.attn_out_bias:
            out["out_b"] = get(p + "attention.dense.bias")
        return out

    def global_names(self, config: OptConfig) -> dict[str, str]:
        names = {
            "embed_tokens": "gpt_neox.embed_in.weight",
            "final_ln_w": "gpt_neox.final_layer_norm.weight",
            "final_ln_b": "gpt_neox.final_layer_norm.bias",
        }
        if not config.tie_word_embeddings:
            names["lm_head"] = "embed_out.weight"
        return names
