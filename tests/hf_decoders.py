"""Tiny random Hugging Face decoders, one per supported family, built from each family's real config class.

Odd sizes on purpose: head counts that are not powers of two (3, so ALiBi's extra slopes are used), head
dims of 16 and 24, partial rotary dims, grouped-query attention, a vocabulary that is not a multiple of 64,
sliding windows shorter than the prompts (Mistral, Qwen2), top-1 and top-2 mixtures of experts (Mixtral,
Qwen2-MoE with its shared expert).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as T

VOCAB = 211
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

# family -> (config class, model class, config kwargs)
FAMILIES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "gpt2": (
        T.GPT2Config,
        T.GPT2LMHeadModel,
        dict(n_layer=3, n_embd=48, n_head=3, n_inner=80, n_positions=64, scale_attn_by_inverse_layer_idx=True),
    ),
    "bloom": (T.BloomConfig, T.BloomForCausalLM, dict(n_layer=2, hidden_size=72, n_head=3)),
    "gptj": (
        T.GPTJConfig,
        T.GPTJForCausalLM,
        dict(n_layer=2, n_embd=72, n_head=3, n_inner=80, rotary_dim=16, n_positions=64),
    ),
    "gpt_neo": (
        T.GPTNeoConfig,
        T.GPTNeoForCausalLM,
        dict(
            num_layers=3,
            hidden_size=48,
            num_heads=3,
            intermediate_size=80,
            attention_types=[[["global", "local"], 1], [["local"], 1]],
            window_size=3,
            max_position_embeddings=64,
        ),
    ),
    "gpt_neox": (
        T.GPTNeoXConfig,
        T.GPTNeoXForCausalLM,
        dict(
            num_hidden_layers=2,
            hidden_size=72,
            num_attention_heads=3,
            intermediate_size=80,
            rotary_pct=0.5,
            rotary_emb_base=500.0,
            max_position_embeddings=64,
        ),
    ),
    "llama": (
        T.LlamaConfig,
        T.LlamaForCausalLM,
        dict(
            num_hidden_layers=2,
            hidden_size=48,
            num_attention_heads=3,
            num_key_value_heads=1,
            intermediate_size=80,
            rope_theta=500.0,
            max_position_embeddings=64,
        ),
    ),
    "mistral": (
        T.MistralConfig,
        T.MistralForCausalLM,
        dict(
            num_hidden_layers=2,
            hidden_size=48,
            num_attention_heads=3,
            num_key_value_heads=1,
            intermediate_size=80,
            sliding_window=4,
            max_position_embeddings=64,
        ),
    ),
    "qwen2": (
        T.Qwen2Config,
        T.Qwen2ForCausalLM,
        dict(
            num_hidden_layers=2,
            hidden_size=40,
            num_attention_heads=5,
            num_key_value_heads=1,
            intermediate_size=72,
            use_sliding_window=True,
            sliding_window=3,
            max_window_layers=1,
            max_position_embeddings=64,
        ),
    ),
    "mixtral": (
        T.MixtralConfig,
        T.MixtralForCausalLM,
        dict(
            num_hidden_layers=2,
            hidden_size=48,
            num_attention_heads=3,
            num_key_value_heads=1,
            intermediate_size=24,
            num_local_experts=5,
            num_experts_per_tok=2,
            max_position_embeddings=64,
        ),
    ),
    "qwen2_moe": (
        T.Qwen2MoeConfig,
        T.Qwen2MoeForCausalLM,
        dict(
            num_hidden_layers=2,
            hidden_size=40,
            num_attention_heads=5,
            num_key_value_heads=5,
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=1,
            max_position_embeddings=64,
        ),
    ),
}


def tiny_decoder(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A random-initialised model of ``family`` (float32, eval mode)."""
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = config_cls(vocab_size=VOCAB, initializer_range=0.3, **IDS, **{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Norm weights and every bias random too, so a slot mapped to the wrong place cannot hide behind the
    # default 1/0 initialisation.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 1:  # norm weights
                p.normal_(1.0, 0.1)
    return model
