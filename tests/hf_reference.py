"""The Hugging Face side of the comparisons: tiny random OPT models (from HF's real config class) and
their checkpoints, HF's greedy generation, and HF's parameter bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from flexrun.config import OptConfig
from tests.tiny_tokenizer import save_tiny_tokenizer


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


def tiny_opt_config(**fields: Any) -> OptConfig:
    """The tiny OPT's flexrun config: odd sizes (3 heads of dim 16, an FFN that is not 4 x hidden, a
    vocabulary that is not a multiple of 64), float32; ``fields`` override."""
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
    return OptConfig(**{**base, **fields})


def tiny_opt(seed: int = 0, **fields: Any) -> tuple[OptConfig, OPTForCausalLM]:
    """A random-initialised OPTForCausalLM (float32, eval mode) and its flexrun config."""
    cfg = tiny_opt_config(**fields)
    torch.manual_seed(seed)
    model = OPTForCausalLM(hf_opt_config(cfg)).eval()
    # Random layer-norm and bias values too, so a slot mapped to the wrong place cannot hide behind
    # the default 1/0 initialisation.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return cfg, model


class OptCheckpoint(NamedTuple):
    """A tiny OPT saved as a Hugging Face checkpoint: its directory, the HF model, its tokenizer (or None)."""

    path: Path
    model: OPTForCausalLM
    tokenizer: PreTrainedTokenizerFast | None


def save_tiny_opt(directory: Path, seed: int, tokenizer: bool = False, **fields: Any) -> OptCheckpoint:
    """``tiny_opt(seed, **fields)`` saved into ``directory``; with ``tokenizer``, the trained byte-level BPE
    tokenizer of tests/tiny_tokenizer.py (as many ids as the model's vocabulary) saved beside it."""
    cfg, model = tiny_opt(seed=seed, **fields)
    model.save_pretrained(directory)
    tok = save_tiny_tokenizer(directory, cfg.vocab_size) if tokenizer else None
    return OptCheckpoint(directory, model, tok)


def hf_greedy(
    model: Any, prompts: list[list[int]], new: int, *, stop_at_eos: bool = False
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Each prompt generated alone (no padding) by HF, greedily: its new tokens and per-step logits
    (steps, vocab). Exactly ``new`` tokens each, unless ``stop_at_eos`` (HF's default) ends one at EOS."""
    tokens, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt]),
                # Every prompt token attended to, as in the engine: unmasked, HF hides prompt tokens equal to the pad id.
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=new,
                do_sample=False,
                pad_token_id=model.config.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
                **({} if stop_at_eos else {"eos_token_id": None}),
            )
            tokens.append(out.sequences[0, len(prompt) :].tolist())
            logits.append(torch.stack([step[0] for step in out.logits]))
    return tokens, logits


def hf_tokens(model: Any, prompt: list[int], new: int) -> list[int]:
    """HF's greedy continuation of one prompt: at most ``new`` tokens, ending at EOS like ``generate``."""
    return hf_greedy(model, [prompt], new, stop_at_eos=True)[0][0]


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


def hf_param_bytes(model: torch.nn.Module, dtype_bytes: int) -> int:
    """The bytes of HF's parameters at ``dtype_bytes`` each. parameters() yields a tied LM head once,
    exactly as the runtime holds it."""
    return sum(p.numel() for p in model.parameters()) * dtype_bytes
