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


def hf_generate_each(model: Any, prompts: list[list[int]], new: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Each prompt generated alone (no padding) by HF, greedily: its new tokens and per-step logits."""
    tokens, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=1,
                output_logits=True,
                return_dict_in_generate=True,
            )
            tokens.append(out.sequences[0, len(prompt) :].tolist())
            logits.append(torch.stack([step[0] for step in out.logits]))  # (new, vocab)
    return tokens, logits


def logits_by_prompt(
    steps: list[torch.Tensor], prompts: list[list[int]], block_size: int, new: int
) -> dict[int, torch.Tensor]:
    """The engine's per-step logits (one (block, vocab) tensor per step, blocks of the longest prompts
    first) regrouped as each prompt's (new, vocab)."""
    order = sorted(range(len(prompts)), key=lambda n: -len(prompts[n]))
    it = iter(steps)
    got: dict[int, list[torch.Tensor]] = {}
    for start in range(0, len(order), block_size):
        members = order[start : start + block_size]
        for _ in range(new):
            step = next(it)
            for row, n in enumerate(members):
                got.setdefault(n, []).append(step[row])
    return {n: torch.stack(rows) for n, rows in got.items()}
