"""Qwen2 and Qwen2.5 (Qwen2ForCausalLM): LLaMA's layer with biases on q/k/v (none on the output projection),
a tied or untied head, and sliding-window attention in the layers config.json asks for: with
``use_sliding_window``, the layers ``layer_types`` marks "sliding_attention", by default those from
``max_window_layers`` on (transformers' rule)."""

from __future__ import annotations

from typing import Any

from flexrun.errors import ConfigError
from flexrun.policies.llama import LlamaPolicy

# transformers' Qwen2Config defaults for keys config.json may leave out.
DEFAULT_SLIDING_WINDOW = 4096
DEFAULT_MAX_WINDOW_LAYERS = 28


def layer_windows(hf: dict[str, Any], layers: int, name: str) -> tuple[tuple[str, ...], int]:
    """``attention_layers`` ("global" / "local" per layer, empty when all are global) and ``window_size``."""
    window = hf.get("sliding_window", DEFAULT_SLIDING_WINDOW) if hf.get("use_sliding_window") else None
    if not window:  # transformers drops the window unless use_sliding_window is set
        return (), 0
    kinds = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", DEFAULT_MAX_WINDOW_LAYERS) else "full_attention"
        for i in range(layers)
    ]
    if len(kinds) != layers:
        raise ConfigError(f"{name}: {len(kinds)} layer_types entries for {layers} layers")
    attention = tuple("local" if kind == "sliding_attention" else "global" for kind in kinds)
    return (attention, int(window)) if "local" in attention else ((), 0)


class Qwen2Policy(LlamaPolicy):
    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)
    layer_classes = ("Qwen2DecoderLayer",)
    label = "Qwen2"

    def config_fields(self, hf: dict[str, Any], name: str, dtype: str) -> dict[str, Any]:
        fields = super().config_fields(hf, name, dtype)
        attention, window = layer_windows(hf, fields["num_hidden_layers"], name)
        # Qwen2's attention always has q/k/v biases and never an output bias; its MLP has none.
        return fields | {
            "qkv_bias": True,
            "attn_out_bias": False,
            "enable_bias": False,
            "attention_layers": attention,
            "window_size": window,
        }
