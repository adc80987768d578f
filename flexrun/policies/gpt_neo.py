"""GPT-Neo (GPTNeoForCausalLM): no q/k/v biases, unscaled attention, global and local (windowed)
attention layers alternating as config.json's attention_layers says, learned positions."""

from __future__ import annotations

from typing import Any

import torch

from flexrun.config import OptConfig
from flexrun.errors import ConfigError
from flexrun.policies.base import Policy, TensorGetter, require, token_ids
from flexrun.policies.gpt2 import ACTIVATIONS


def _attention_layers(hf: dict[str, Any], name: str) -> tuple[str, ...]:
    """The per-layer attention kinds: config.json's expanded ``attention_layers``, or its compact
    ``attention_types`` ([[["global", "local"], 12]] = the pair repeated 12 times)."""
    if hf.get("attention_layers"):
        return tuple(hf["attention_layers"])
    kinds: list[str] = []
    for pattern, repeat in hf.get("attention_types") or []:
        kinds.extend(list(pattern) * int(repeat))
    if not kinds:
        raise ConfigError(f"{name}: config.json has neither attention_layers nor attention_types")
    return tuple(kinds)


class GptNeoPolicy(Policy):
    name = "gpt_neo"
    architectures = ("GPTNeoForCausalLM",)
    model_types = ("gpt_neo",)
    layer_classes = ("GPTNeoBlock",)

    def config_from_hf(self, hf: dict[str, Any], name: str, dtype: str) -> OptConfig:
        act = hf.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ConfigError(f"{name}: unsupported GPT-Neo activation {act!r}")
        hidden = require(hf, "hidden_size", name)
        layers = require(hf, "num_layers", name)
        kinds = _attention_layers(hf, name)
        if len(kinds) != layers:
            raise ConfigError(f"{name}: {len(kinds)} attention_layers entries for {layers} layers")
        return OptConfig(
            name=name,
            num_hidden_layers=layers,
            hidden_size=hidden,
            n_head=require(hf, "num_heads", name),
            ffn_embed_dim=hf.get("intermediate_size") or 4 * hidden,
            vocab_size=require(hf, "vocab_size", name),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            dtype=dtype,
            activation=ACTIVATIONS[act],
            qkv_bias=False,
            attn_out_bias=True,
            attn_scale=False,
            attention_layers=kinds,
            window_size=hf.get("window_size", 256),
            position="learned",
            position_offset=0,
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            arch=self.name,
            **token_ids(hf, default=50256),
        )

    def layer_tensors(self, config: OptConfig, get: TensorGetter, i: int) -> dict[str, torch.Tensor]:
        p = f"transformer.h.{i}."
        return {
            "ln1_w": get(p + "ln_1.weight"),
            "ln1_b": get(p + "ln_1.bias"),
            "qkv_w": torch.cat([get(p + f"attn.attention.{x}_proj.weight") for x in "qkv"], dim=0),
            "out_w": get(p + "attn.attention.out_proj.weight"),
            "out_b": get(p + "attn.attention.out_proj.bias"),
            "ln2_w": get(p + "ln_2.weight"),
            "ln2_b": get(p + "ln_2.bias"),
            "fc1_w": get(p + "mlp.c_fc.weight"),
            "fc1_b": get(p + "mlp.c_fc.bias"),
            "fc2_w": get(p + "mlp.c_proj.weight"),
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
