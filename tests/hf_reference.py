"""Tiny random Hugging Face models built from each family's real config class: the reference."""

from __future__ import annotations

from typing import Any

import torch
from transformers import OPTConfig, OPTForCausalLM

from flexrun.config import OptConfig


def hf_opt_config(cfg: OptConfig, **extra: Any) -> OPTConfig:
    """The Hugging Face OPTConfig with the same dims and flags as ``cfg``."""
    return OPTConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        ffn_dim=cfg.ffn_embed_dim,
        num_attention_heads=cfg.n_head,
        max_position_embeddings=cfg.max_seq_len,
        do_layer_norm_before=cfg.do_layer_norm_before,
        word_embed_proj_dim=cfg.word_embed_proj_dim,
        activation_function=cfg.activation,
        enable_bias=cfg.enable_bias,
        _remove_final_layer_norm=cfg.do_layer_norm_before and not cfg.final_layer_norm,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings,
        dropout=0.0,
        init_std=0.3,
        **extra,
    )


def tiny_opt(seed: int = 0, **fields: Any) -> tuple[OptConfig, OPTForCausalLM]:
    """A random-initialised OPTForCausalLM (float32, eval mode) and its flexrun config."""
    base: dict[str, Any] = dict(
        name="tiny-opt",
        num_hidden_layers=3,
        hidden_size=48,
        n_head=3,
        ffn_embed_dim=80,
        vocab_size=211,
        max_seq_len=64,
        dtype="float32",
    )
    base.update(fields)
    cfg = OptConfig(**base)
    torch.manual_seed(seed)
    model = OPTForCausalLM(hf_opt_config(cfg)).eval()
    # Random layer-norm and bias values too, so a slot mapped to the wrong place cannot hide behind
    # the default 1/0 initialisation.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return cfg, model
