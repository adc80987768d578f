from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import OPTForCausalLM

from flexrun.config import OptConfig
from flexrun.errors import ConfigError, UnknownModelError
from flexrun.resolver import known_models, resolve
from tests.hf_reference import hf_opt_config, hf_param_bytes, tiny_opt

# (layers, hidden, heads, ffn, vocab) as published in the facebook/* config.json files.
PUBLISHED = {
    "opt-125m": (12, 768, 12, 3072, 50272),
    "opt-350m": (24, 1024, 16, 4096, 50272),
    "opt-1.3b": (24, 2048, 32, 8192, 50272),
    "opt-2.7b": (32, 2560, 32, 10240, 50272),
    "opt-6.7b": (32, 4096, 32, 16384, 50272),
    "opt-13b": (40, 5120, 40, 20480, 50272),
    "opt-30b": (48, 7168, 56, 28672, 50272),
    "opt-66b": (64, 9216, 72, 36864, 50272),
    "opt-175b": (96, 12288, 96, 49152, 50272),
    "opt-iml-1.3b": (24, 2048, 32, 8192, 50272),
    "opt-iml-max-30b": (48, 7168, 56, 28672, 50272),
    "galactica-125m": (12, 768, 12, 3072, 50000),
    "galactica-1.3b": (24, 2048, 32, 8192, 50000),
    "galactica-6.7b": (32, 4096, 32, 16384, 50000),
    "galactica-30b": (48, 7168, 56, 28672, 50000),
    "galactica-120b": (96, 10240, 80, 40960, 50000),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_name_table_matches_published_dims(name: str) -> None:
    cfg = resolve(name)
    assert (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.n_head,
        cfg.ffn_embed_dim,
        cfg.vocab_size,
    ) == PUBLISHED[name]


def test_every_family_member_is_known() -> None:
    assert set(PUBLISHED) | {"opt-iml-30b", "opt-iml-max-1.3b"} <= set(known_models())


@pytest.mark.parametrize("spelling", ["facebook/opt-30b", "FACEBOOK/OPT-30B", "opt-30b", "someorg/Opt-30B"])
def test_prefix_and_case_are_ignored(spelling: str) -> None:
    assert resolve(spelling) == resolve("opt-30b")


def test_opt_350m_is_post_ln_with_projection() -> None:
    cfg = resolve("opt-350m")
    assert not cfg.do_layer_norm_before and cfg.word_embed_proj_dim == 512 and not cfg.final_layer_norm


def test_galactica_uses_gelu_and_own_vocab() -> None:
    cfg = resolve("facebook/galactica-30b")
    assert cfg.activation == "gelu" and cfg.vocab_size == 50000


def test_overrides_apply_and_unknown_fields_are_rejected() -> None:
    cfg = resolve("opt-1.3b", dtype="bfloat16", max_seq_len=4096)
    assert cfg.dtype == "bfloat16" and cfg.max_seq_len == 4096
    with pytest.raises(ConfigError, match="unknown config field.*hidden_sise"):
        resolve("opt-1.3b", hidden_sise=10)
    with pytest.raises(ConfigError, match="dtype"):
        resolve("opt-1.3b", dtype="int3")


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(UnknownModelError, match="close matches: .*opt-"):
        resolve("facebook/opt-999b")


def test_invalid_dims_are_rejected() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        OptConfig(name="x", num_hidden_layers=1, hidden_size=10, n_head=3, ffn_embed_dim=4)


@pytest.mark.parametrize("name", ["opt-125m", "opt-350m", "galactica-125m"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_model_bytes_equals_hf_parameters_on_meta(name: str, dtype: str) -> None:
    cfg = resolve(name, dtype=dtype)
    with torch.device("meta"):
        model = OPTForCausalLM(hf_opt_config(cfg))
    assert cfg.model_bytes() == hf_param_bytes(model, cfg.dtype_bytes)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"do_layer_norm_before": False, "word_embed_proj_dim": 32, "final_layer_norm": False},
        {"enable_bias": False},
        {"tie_word_embeddings": False},
    ],
)
def test_model_bytes_equals_hf_parameters_tiny(fields: dict) -> None:
    cfg, model = tiny_opt(**fields)
    assert cfg.model_bytes() == hf_param_bytes(model, 4)


def test_cache_and_hidden_bytes_equal_hf_forward_tensors() -> None:
    cfg, model = tiny_opt()
    batch, seq = 3, 7
    ids = torch.randint(3, cfg.vocab_size, (batch, seq))
    with torch.no_grad():
        out = model(ids, use_cache=True, output_hidden_states=True)
    cache = out.past_key_values
    kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    assert len(kv) == 2 * cfg.num_hidden_layers
    assert cfg.cache_bytes(batch, seq) == sum(t.numel() * t.element_size() for t in kv)
    hidden = out.hidden_states[1]
    assert cfg.hidden_bytes(batch, seq) == hidden.numel() * hidden.element_size()


def test_checkpoint_dir_resolves_from_config_json(tmp_path: Path) -> None:
    cfg, model = tiny_opt(do_layer_norm_before=False, word_embed_proj_dim=32, final_layer_norm=False)
    model.save_pretrained(tmp_path)
    got = resolve(str(tmp_path))
    assert got.dtype == "float32"
    assert got.model_bytes() == cfg.model_bytes()
    assert (got.hidden_size, got.word_embed_proj_dim, got.do_layer_norm_before) == (48, 32, False)
    assert resolve(str(tmp_path), dtype="bfloat16").dtype == "bfloat16"


def test_directory_without_config_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="no config.json"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Mamba2ForCausalLM"]}))
    with pytest.raises(Exception, match="supported architectures: .*OPTForCausalLM"):
        resolve(str(tmp_path))
