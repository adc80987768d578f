"""GPT-2 (GPT2LMHeadModel): Conv1D weights stored [in, out], one fused c_attn, learned positions."""

from __future__ import annotations

from typing import Any

import torch

from flexrun.config import OptConfig
from flexrun.errors import ConfigError
from flexrun.policies.base import Policy, TensorGetter, require, token_ids

ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new"}


class Gpt2Policy(Policy):
    name = "gpt2"
    architectures = ("GPT2LMHeadModel",)
    model_types = ("gpt2",)
    layer_classes = ("GPT2Block",)

    def config_from_hf(self, hf: dict[str, Any], name: str, dtype: str) -> OptConfig:
        act = hf.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ConfigError(f"{name}: unsupported GPT-2 activation {act!r}")
        if hf.get("add_cross_attention"):
            raise ConfigError(f"{name}: GPT-2 with cross-attention is an encoder-decoder part, not a decoder model")
        hidden = require(hf, "n_embd", name)
        return OptConfig(
            name=name,
            num_hidden_layers=require(hf, "n_layer", name),
            hidden_size=hidden,
            n_head=require(hf, "n_head", name),
            ffn_embed_dim=hf.get("n_inner") or 4 * hidden,
            vocab_size=require(hf, "vocab_size", name),
            max_seq_len=hf.get("n_positions", 1024),
            dtype=dtype,
            activation=ACTIVATIONS[act],
            position="learned",
            position_offset=0,
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            attn_scale=bool(hf.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            arch=self.name,
            **token_ids(hf, default=50256),
        )

    def layer_tensors(self, config: OptConfig, get: TensorGetter, i: int) -> dict[str, torch.Tensor]:
        p = f"transformer.h.{i}."
        # Conv1D keeps weights as [in, out]; the engine's Linear layout is [out, in]. c_attn's output is
        # already [Q | K | V].
        return {
            "ln1_w": get(p + "ln_1.weight"),
            "ln1_b": get(p + "ln_1.bias"),
            "qkv_w": get(p + "attn.c_attn.weight").t(),
            "qkv_b": get(p + "attn.c_attn.bias"),
            "out_w": get(p + "attn.c_proj.weight").t(),
            "out_b": get(p + "attn.c_proj.bias"),
            "ln2_w": get(p + "ln_2.weight"),
            "ln2_b": get(p + "ln_2.bias"),
            "fc1_w": get(p + "mlp.c_fc.weight").t(),
            "fc1_b": get(p + "mlp.c_fc.bias"),
            "fc2_w": get(p + "mlp.c_proj.weight").t(),
            "fc2_b": get(p + "mlp.c_proj.bias"),
        }

    def global_names(self, config: OptConfig) -> dict[str, str]:
        names = {
            "embed_tokens": "transformer.wte.weight",
            "embed_positions": "transformer.wpe.weight",
            "final_ln_w": "transformer.ln_f.weight",
            "final_ln_b": "transformer.ln_f.bias",
        }
        if not config.tie_word_embeddings:
            names["lm_head"] = "lm_head.weight"
        return names
