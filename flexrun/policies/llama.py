"""LLaMA and its descendants (LlamaForCausalLM, e.g. SmolLM2, Llama 3.x): RMSNorm, SwiGLU MLP, half-rotation
rotary (scaled as config.json's rope parameters say), grouped-query attention, usually an untied LM head.
Mistral and Qwen2 subclass it."""

from __future__ import annotations

from typing import Any

import torch

from flexrun.config import OptConfig
from flexrun.errors import ConfigError
from flexrun.policies.base import (
    Policy,
    TensorGetter,
    Weight,
    WeightGetter,
    as_tensor,
    cat_rows,
    require,
    rope_settings,
    token_ids,
)


class LlamaPolicy(Policy):
    name = "llama"
    architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)
    layer_classes = ("LlamaDecoderLayer",)
    #: The family's name in messages.
    label = "LLaMA"

    def config_from_hf(self, hf: dict[str, Any], name: str, dtype: str) -> OptConfig:
        return OptConfig(**self.config_fields(hf, name, dtype))

    def config_fields(self, hf: dict[str, Any], name: str, dtype: str) -> dict[str, Any]:
        """The ``OptConfig`` fields of config.json; a subclass adjusts them for its family."""
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{name}: unsupported {self.label} activation {act!r} (SwiGLU needs silu)")
        hidden, heads = require(hf, "hidden_size", name), require(hf, "num_attention_heads", name)
        head_dim = hf.get("head_dim") or hidden // heads
        if head_dim * heads != hidden:
            raise ConfigError(f"{name}: head_dim {head_dim} x {heads} heads != hidden_size {hidden} is not supported")
        attn_bias = bool(hf.get("attention_bias", False))
        return dict(
            name=name,
            num_hidden_layers=require(hf, "num_hidden_layers", name),
            hidden_size=hidden,
            n_head=heads,
            n_kv_head=hf.get("num_key_value_heads") or heads,
            ffn_embed_dim=require(hf, "intermediate_size", name),
            vocab_size=require(hf, "vocab_size", name),
            dtype=dtype,
            activation="silu",
            gated_mlp=True,
            enable_bias=bool(hf.get("mlp_bias", False)),
            qkv_bias=attn_bias,
            attn_out_bias=attn_bias,
            norm="rmsnorm",
            norm_bias=False,
            layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
            position="rotary",
            rotary_interleaved=False,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            arch=self.name,
            **rope_settings(hf, head_dim, name, hf.get("max_position_embeddings", 2048)),
            **token_ids(hf, default=2),
        )

    def layer_tensors(self, config: OptConfig, get: TensorGetter, i: int) -> dict[str, torch.Tensor]:
        return {slot: as_tensor(w) for slot, w in self.layer_weights(config, get, i).items()}

    def layer_weights(self, config: OptConfig, get: WeightGetter, i: int) -> dict[str, Weight]:
        p = f"model.layers.{i}."
        out = {
            "ln1_w": get(p + "input_layernorm.weight"),
            "qkv_w": cat_rows([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"]),
            "out_w": get(p + "self_attn.o_proj.weight"),
            "ln2_w": get(p + "post_attention_layernorm.weight"),
            "gate_w": get(p + "mlp.gate_proj.weight"),
            "fc1_w": get(p + "mlp.up_proj.weight"),
            "fc2_w": get(p + "mlp.down_proj.weight"),
        }
        if config.qkv_bias:
            out["qkv_b"] = cat_rows([get(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
        if config.attn_out_bias:
            out["out_b"] = get(p + "self_attn.o_proj.bias")
        if config.enable_bias:
            out["gate_b"] = get(p + "mlp.gate_proj.bias")
            out["fc1_b"] = get(p + "mlp.up_proj.bias")
            out["fc2_b"] = get(p + "mlp.down_proj.bias")
        return out

    def global_names(self, config: OptConfig) -> dict[str, str]:
        names = {"embed_tokens": "model.embed_tokens.weight", "final_ln_w": "model.norm.weight"}
        if not config.tie_word_embeddings:
            names["lm_head"] = "lm_head.weight"
        return names
