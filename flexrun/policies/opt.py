"""OPT and Galactica (OPTForCausalLM): separate q/k/v projections, learned positions at offset 2."""

from __future__ import annotations

from typing import Any

import torch

from flexrun.config import OptConfig
from flexrun.errors import ConfigError
from flexrun.policies.base import Policy, TensorGetter, eos_ids

_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new"}


class OptPolicy(Policy):
    name = "opt"
    architectures = ("OPTForCausalLM", "OPTModel")
    model_types = ("opt",)
    layer_classes = ("OPTDecoderLayer",)

    def config_from_hf(self, hf: dict[str, Any], name: str, dtype: str) -> OptConfig:
        act = hf.get("activation_function", "relu")
        if act not in _ACTIVATIONS:
            raise ConfigError(f"{name}: unsupported OPT activation {act!r}")
        pre_ln = bool(hf.get("do_layer_norm_before", True))
        if not hf.get("layer_norm_elementwise_affine", True):
            raise ConfigError(f"{name}: OPT layer norms without affine parameters are not supported")
        hidden = hf["hidden_size"]
        eos = hf.get("eos_token_id", 2)
        return OptConfig(
            name=name,
            num_hidden_layers=hf["num_hidden_layers"],
            hidden_size=hidden,
            n_head=hf["num_attention_heads"],
            ffn_embed_dim=hf.get("ffn_dim", 4 * hidden),
            vocab_size=hf["vocab_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            pad_token_id=hf.get("pad_token_id", 1) if hf.get("pad_token_id") is not None else 1,
            bos_token_id=hf.get("bos_token_id", 2) if hf.get("bos_token_id") is not None else 2,
            eos_token_id=eos[0] if isinstance(eos, list) else (eos if eos is not None else 2),
            eos_token_ids=eos_ids(hf),
            dtype=dtype,
            do_layer_norm_before=pre_ln,
            word_embed_proj_dim=hf.get("word_embed_proj_dim") or hidden,
            activation=_ACTIVATIONS[act],
            enable_bias=bool(hf.get("enable_bias", True)),
            final_layer_norm=pre_ln and not hf.get("_remove_final_layer_norm", False),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            arch=self.name,
        )

    def layer_tensors(self, config: OptConfig, get: TensorGetter, i: int) -> dict[str, torch.Tensor]:
        p = f"decoder.layers.{i}."
        out = {
            "ln1_w": get(p + "self_attn_layer_norm.weight"),
            "ln1_b": get(p + "self_attn_layer_norm.bias"),
            "qkv_w": torch.cat([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"], dim=0),
            "out_w": get(p + "self_attn.out_proj.weight"),
            "ln2_w": get(p + "final_layer_norm.weight"),
            "ln2_b": get(p + "final_layer_norm.bias"),
            "fc1_w": get(p + "fc1.weight"),
            "fc2_w": get(p + "fc2.weight"),
        }
        if config.enable_bias:
            out["qkv_b"] = torch.cat([get(p + f"self_attn.{x}_proj.bias") for x in "qkv"], dim=0)
            out["out_b"] = get(p + "self_attn.out_proj.bias")
            out["fc1_b"] = get(p + "fc1.bias")
            out["fc2_b"] = get(p + "fc2.bias")
        return out

    def global_names(self, config: OptConfig) -> dict[str, str]:
        names = {"embed_tokens": "decoder.embed_tokens.weight", "embed_positions": "decoder.embed_positions.weight"}
        if config.word_embed_proj_dim != config.hidden_size:
            names["project_in"] = "decoder.project_in.weight"
            names["project_out"] = "decoder.project_out.weight"
        if config.final_layer_norm:
            names["final_ln_w"] = "decoder.final_layer_norm.weight"
            names["final_ln_b"] = "decoder.final_layer_norm.bias"
        if not config.tie_word_embeddings:
            names["lm_head"] = "lm_head.weight"
        return names
