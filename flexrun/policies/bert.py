"""BERT and RoBERTa: post-LN encoders with separate q/k/v, token-type embeddings and a tanh pooler.

Each layer maps onto the fused layer run post-LN: attention.output.LayerNorm is ln1 (applied after the
attention residual) and output.LayerNorm is ln2 (after the MLP residual). RoBERTa has BERT's layout; its
learned positions start at padding_idx + 1 and count only non-pad tokens (``positions_skip_pad``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from flexrun.config import OptConfig
from flexrun.errors import ConfigError
from flexrun.policies.base import Policy, TensorGetter

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}


class BertPolicy(Policy):
    name = "bert"
    architectures: ClassVar[tuple[str, ...]] = (
        "BertModel",
        "BertForMaskedLM",
        "BertForPreTraining",
        "BertForNextSentencePrediction",
        "BertForSequenceClassification",
        "BertForMultipleChoice",
        "BertForTokenClassification",
        "BertForQuestionAnswering",
    )
    model_types = ("bert",)
    layer_classes = ("BertLayer",)
    generative = False
    #: The base model's attribute name in the task classes, so their tensors are ``bert.*``.
    base_prefix: ClassVar[str] = "bert."
    #: Classes whose checkpoints are the bare base model (no prefix).
    base_classes: ClassVar[tuple[str, ...]] = ("BertModel",)
    #: Classes that Hugging Face builds with a pooler.
    pooled_classes: ClassVar[tuple[str, ...]] = (
        "BertModel",
        "BertForPreTraining",
        "BertForNextSentencePrediction",
        "BertForSequenceClassification",
        "BertForMultipleChoice",
    )
    #: pad_token_id when config.json has none (the config class's default).
    default_pad: ClassVar[int] = 0

    def position_offset(self, hf: dict[str, Any]) -> int:
        """Row of the position table that position 0 reads."""
        return 0

    def config_from_hf(self, hf: dict[str, Any], name: str, dtype: str) -> OptConfig:
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ConfigError(f"{name}: causal or cross-attention {self.name} (is_decoder) is not supported")
        kind = hf.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ConfigError(f"{name}: {self.name} with {kind!r} position embeddings is not supported")
        act = hf.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ConfigError(
                f"{name}: unsupported {self.name} activation {act!r}; supported: {', '.join(_ACTIVATIONS)}"
            )
        archs = hf.get("architectures") or list(self.base_classes)
        pad = hf.get("pad_token_id")
        pad = self.default_pad if pad is None else int(pad)
        offset = self.position_offset({**hf, "pad_token_id": pad})
        max_pos = int(hf.get("max_position_embeddings", 512))
        if max_pos <= offset:
            raise ConfigError(f"{name}: max_position_embeddings {max_pos} leaves no positions after offset {offset}")

        def token(key: str) -> int:
            value = hf.get(key)
            return pad if value is None else int(value[0] if isinstance(value, list) else value)

        hidden = hf["hidden_size"]
        return OptConfig(
            name=name,
            num_hidden_layers=hf["num_hidden_layers"],
            hidden_size=hidden,
            n_head=hf["num_attention_heads"],
            ffn_embed_dim=hf.get("intermediate_size", 4 * hidden),
            vocab_size=hf["vocab_size"],
            max_seq_len=max_pos - offset,
            pad_token_id=pad,
            bos_token_id=token("bos_token_id"),
            eos_token_id=token("eos_token_id"),
            dtype=dtype,
            do_layer_norm_before=False,
            activation=_ACTIVATIONS[act],
            final_layer_norm=False,
            tie_word_embeddings=True,
            arch=self.name,
            position="learned",
            position_offset=offset,
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            extra={"hf_prefix": "" if archs[0] in self.base_classes else self.base_prefix},
            encoder=True,
            type_vocab_size=int(hf.get("type_vocab_size", 2)),
            embed_norm=True,
            pooler=archs[0] in self.pooled_classes,
            positions_skip_pad=offset > 0,
        )

    def fit_checkpoint(self, config: OptConfig, has: Callable[[str], bool]) -> OptConfig:
        # Task checkpoints nest the base model under `bert.`/`roberta.`; many keep a pooler that their own
        # class does not use (bert-base-uncased is a BertForMaskedLM with the pre-training pooler).
        prefix = self.base_prefix if has(self.base_prefix + "embeddings.word_embeddings.weight") else ""
        return dataclasses.replace(
            config, extra={**config.extra, "hf_prefix": prefix}, pooler=has(prefix + "pooler.dense.weight")
        )

    def layer_tensors(self, config: OptConfig, get: TensorGetter, i: int) -> dict[str, torch.Tensor]:
        p = f"{config.extra.get('hf_prefix', '')}encoder.layer.{i}."
        attn = p + "attention."
        return {
            "qkv_w": torch.cat([get(f"{attn}self.{x}.weight") for x in ("query", "key", "value")], dim=0),
            "qkv_b": torch.cat([get(f"{attn}self.{x}.bias") for x in ("query", "key", "value")], dim=0),
            "out_w": get(attn + "output.dense.weight"),
            "out_b": get(attn + "output.dense.bias"),
            "ln1_w": get(attn + "output.LayerNorm.weight"),
            "ln1_b": get(attn + "output.LayerNorm.bias"),
            "fc1_w": get(p + "intermediate.dense.weight"),
            "fc1_b": get(p + "intermediate.dense.bias"),
            "fc2_w": get(p + "output.dense.weight"),
            "fc2_b": get(p + "output.dense.bias"),
            "ln2_w": get(p + "output.LayerNorm.weight"),
            "ln2_b": get(p + "output.LayerNorm.bias"),
        }

    def global_names(self, config: OptConfig) -> dict[str, str]:
        e = f"{config.extra.get('hf_prefix', '')}embeddings."
        names = {
            "embed_tokens": e + "word_embeddings.weight",
            "embed_positions": e + "position_embeddings.weight",
            "embed_ln_w": e + "LayerNorm.weight",
            "embed_ln_b": e + "LayerNorm.bias",
        }
        if config.type_vocab_size:
            names["embed_token_types"] = e + "token_type_embeddings.weight"
        if config.pooler:
            pooler = f"{config.extra.get('hf_prefix', '')}pooler.dense."
            names["pooler_w"] = pooler + "weight"
            names["pooler_b"] = pooler + "bias"
        return names


class RobertaPolicy(BertPolicy):
    name = "roberta"
    architectures = (
        "RobertaModel",
        "RobertaForMaskedLM",
        "RobertaForSequenceClassification",
        "RobertaForMultipleChoice",
        "RobertaForTokenClassification",
        "RobertaForQuestionAnswering",
    )
    model_types = ("roberta",)
    layer_classes = ("RobertaLayer",)
    base_prefix = "roberta."
    base_classes = ("RobertaModel",)
    pooled_classes = ("RobertaModel", "RobertaForMultipleChoice")
    default_pad = 1

    def position_offset(self, hf: dict[str, Any]) -> int:
        # fairseq numbering: padding_idx is the pads' own row, the first real token reads padding_idx + 1.
        return int(hf["pad_token_id"]) + 1
