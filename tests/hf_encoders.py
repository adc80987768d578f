"""Tiny random BERT and RoBERTa models built from their real config classes, and a tiny BERT tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, PreTrainedModel, RobertaConfig, RobertaModel

# Odd sizes: 3 heads of dim 16, an FFN that is not 4 x hidden, a vocab that is not a multiple of 64.
TINY = dict(
    vocab_size=211,
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=3,
    intermediate_size=80,
    max_position_embeddings=40,
    type_vocab_size=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    initializer_range=0.3,
)

FAMILIES: dict[str, tuple[Any, Any]] = {"bert": (BertConfig, BertModel), "roberta": (RobertaConfig, RobertaModel)}


def tiny_encoder(family: str, seed: int = 0, **fields: Any) -> PreTrainedModel:
    """A random-initialised BertModel or RobertaModel (float32, eval mode, with its pooler)."""
    config_cls, model_cls = FAMILIES[family]
    extra: dict[str, Any] = {"layer_norm_eps": 1e-5} if family == "roberta" else {}
    config = config_cls(**{**TINY, **extra, **fields})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Random layer-norm and bias values too, so a slot mapped to the wrong place (ln1 vs ln2, the
    # embedding norm, the pooler bias) cannot hide behind the default 1/0 initialisation.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model


def tiny_bert_tokenizer(directory: Path, vocab_size: int = 211) -> BertTokenizerFast:
    """A WordPiece tokenizer over a made-up vocabulary of ``vocab_size`` entries (no download)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'")
    words += ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "hello", "world", "flex", "run"]
    words += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    words += [f"tok{n}" for n in range(vocab_size - len(words))]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
