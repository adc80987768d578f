"""BLOOM (BloomForCausalLM): per-head interleaved query_key_value, ALiBi, a layer norm on the embeddings."""

from __future__ import annotations

from typing import Any

import torch

from flexrun.config import OptConfig
from flexrun.errors import ConfigError
from flexrun.policies.base import Policy, TensorGetter, qkv_from_interleaved_heads, require, token_ids


class BloomPolicy(Policy):
    name = "bloom"
    architectures = ("BloomForCausalLM",)
    model_types = ("bloom",)
    layer_classes = ("BloomBlock",)

    def config_from_hf(self, hf: dict[str, Any], name: str, dtype: str) -> OptConfig:
        if hf.get("apply_residual_connection_post_layernorm"):
            raise ConfigError(f"{name}: BLOOM with apply_residual_connection_post_layernorm is not supported")
        hidden = hf.get("hidden_size") or require(hf, "n_embed", name)
        return OptConfig(
            name=name,
            num_hidden_layers=require(hf, "n_layer", name),
            hidden_size=hidden,
            n_head=require(hf, "n_head", name),
            ffn_embed_dim=4 * hidden,
            vocab_size=require(hf, "vocab_size", name),
            # ALiBi has no position table; this is only the length the model was trained on.
            max_seq_len=hf.get("seq_length", 2048),
            dtype=dtype,
            # BLOOM's gelu is the tanh approximation.
            activation="gelu_new",
            position="alibi",
            embed_norm=True,
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            arch=self.name,
            **token_ids(hf, default=2),
        )

    def layer_tensors(self, config: OptConfig, get: TensorGetter, i: int) -> dict[str, torch.Tensor]:
        p = f"transformer.h.{i}."
        nh, d = config.n_head, config.head_dim
        return {
            "ln1_w": get(p + "input_layernorm.weight"),
            "ln1_b": get(p + "input_layernorm.bias"),
            "qkv_w": qkv_from_interleaved_heads(get(p + "self_attention.query_key_value.weight"), nh, d),
            "qkv_b": qkv_from_interleaved_heads(get(p + "self_attention.query_key_value.bias"), nh, d),
            "out_w": get(p + "self_attention.dense.weight"),
            "out_b": get(p + "self_attention.dense.bias"),
            "ln2_w": get(p + "post_attention_layernorm.weight"),
            "ln2_b": get(p + "post_attention_layernorm.bias"),
            "fc1_w": get(p + "mlp.dense_h_to_4h.weight"),
            "fc1_b": get(p + "mlp.dense_h_to_4h.bias"),
            "fc2_w": get(p + "mlp.dense_4h_to_h.weight"),
            "fc2_b": get(p + "mlp.dense_4h_to_h.bias"),
        }

    def global_names(self, config: OptConfig) -> dict[str, str]:
        names = {
            "embed_tokens": "transformer.word_embeddings.weight",
            "embed_ln_w": "transformer.word_embeddings_layernorm.weight",
            "embed_ln_b": "transformer.word_embeddings_layernorm.bias",
            "final_ln_w": "transformer.ln_f.weight",
            "final_ln_b": "transformer.ln_f.bias",
        }
        if not config.tie_word_embeddings:
            names["lm_head"] = "lm_head.weight"
        return names
