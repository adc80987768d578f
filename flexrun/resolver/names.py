"""The table of known model names: every OPT size, OPT-IML and Galactica, as ``OptConfig`` fields."""

from __future__ import annotations

from typing import Any

# (layers, hidden, heads, ffn) from the OPT paper (Zhang et al. 2022, table 1) and the published
# facebook/opt-* config.json files; Galactica from Taylor et al. 2022, table 1, and facebook/galactica-*.
_OPT = {
    "opt-125m": (12, 768, 12, 3072),
    "opt-350m": (24, 1024, 16, 4096),
    "opt-1.3b": (24, 2048, 32, 8192),
    "opt-2.7b": (32, 2560, 32, 10240),
    "opt-6.7b": (32, 4096, 32, 16384),
    "opt-13b": (40, 5120, 40, 20480),
    "opt-30b": (48, 7168, 56, 28672),
    "opt-66b": (64, 9216, 72, 36864),
    "opt-175b": (96, 12288, 96, 49152),
}
_GALACTICA = {
    "galactica-125m": (12, 768, 12, 3072),
    "galactica-1.3b": (24, 2048, 32, 8192),
    "galactica-6.7b": (32, 4096, 32, 16384),
    "galactica-30b": (48, 7168, 56, 28672),
    "galactica-120b": (96, 10240, 80, 40960),
}
# Per-model field changes from the family defaults.
_SPECIAL: dict[str, dict[str, Any]] = {
    "opt-350m": {"do_layer_norm_before": False, "word_embed_proj_dim": 512, "final_layer_norm": False},
}
_GALACTICA_FIELDS: dict[str, Any] = {"vocab_size": 50000, "activation": "gelu", "bos_token_id": 0}
# Instruction-tuned variants share their base model's architecture.
_ALIASES = {
    "opt-iml-1.3b": "opt-1.3b",
    "opt-iml-30b": "opt-30b",
    "opt-iml-max-1.3b": "opt-1.3b",
    "opt-iml-max-30b": "opt-30b",
}


def _table() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for family, extra in ((_OPT, {}), (_GALACTICA, _GALACTICA_FIELDS)):
        for key, (layers, hidden, heads, ffn) in family.items():
            table[key] = {
                "num_hidden_layers": layers,
                "hidden_size": hidden,
                "n_head": heads,
                "ffn_embed_dim": ffn,
                **extra,
                **_SPECIAL.get(key, {}),
            }
    for alias, base in _ALIASES.items():
        table[alias] = table[base]
    return table


MODEL_TABLE: dict[str, dict[str, Any]] = _table()


def known_models() -> list[str]:
    """Every short name in the table, e.g. ``opt-30b``, ``galactica-120b``, ``opt-iml-max-30b``."""
    return sorted(MODEL_TABLE)
