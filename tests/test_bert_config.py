"""BERT / RoBERTa configs: sizes against Hugging Face's parameter counts, and the unsupported variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from flexrun.errors import ConfigError
from flexrun.policies import config_from_hf
from flexrun.resolver import resolve
from tests.hf_encoders import TINY
from tests.hf_reference import hf_param_bytes

# The published bert-base-uncased / roberta-base / bert-large config.json fields that size the model.
BASES = {
    "bert-base-uncased": (BertConfig, BertModel, dict(vocab_size=30522)),
    "bert-large-uncased": (
        BertConfig,
        BertModel,
        dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    ),
    "roberta-base": (
        RobertaConfig,
        RobertaModel,
        dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5),
    ),
    "tiny-bert": (BertConfig, BertModel, TINY),
    "tiny-roberta": (RobertaConfig, RobertaModel, TINY),
}


@pytest.mark.parametrize("name", sorted(BASES))
@pytest.mark.parametrize("pooler", [True, False])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_model_bytes_equals_hf_parameters_on_meta(name: str, pooler: bool, dtype: str) -> None:
    config_cls, model_cls, fields = BASES[name]
    hf = config_cls(**fields)
    base = model_cls.__name__
    # A task class (…ForMaskedLM) builds the base model without its pooler.
    arch = base if pooler else base.replace("Model", "ForMaskedLM")
    cfg = config_from_hf({**hf.to_dict(), "architectures": [arch], "torch_dtype": dtype}, name=name)
    with torch.device("meta"):
        model = model_cls(hf, add_pooling_layer=pooler)
    assert cfg.pooler is pooler
    assert cfg.model_bytes() == hf_param_bytes(model, cfg.dtype_bytes)


def test_config_command_resolves_a_bert_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({**BertConfig(**TINY).to_dict(), "architectures": ["BertModel"], "torch_dtype": "float32"})
    )
    cfg = resolve(str(tmp_path))
    assert (cfg.arch, cfg.encoder, cfg.do_layer_norm_before, cfg.activation) == ("bert", True, False, "gelu")
    assert (cfg.max_seq_len, cfg.position_offset, cfg.layer_norm_eps) == (40, 0, 1e-12)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"is_decoder": True}, "is_decoder"),
        ({"position_embedding_type": "relative_key"}, "relative_key"),
        ({"hidden_act": "mish"}, "unsupported bert activation 'mish'"),
    ],
)
def test_unsupported_variants_are_refused(change: dict, message: str) -> None:
    hf = {**BertConfig(**TINY).to_dict(), "architectures": ["BertModel"], **change}
    with pytest.raises(ConfigError, match=message):
        config_from_hf(hf, name="x")
