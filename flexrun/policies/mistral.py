"""Mistral (MistralForCausalLM): LLaMA's layer with sliding-window attention in every layer when config.json
sets ``sliding_window`` (a query sees itself and the window - 1 keys before it, as transformers masks)."""

from __future__ import annotations

from typing import Any

from flexrun.policies.llama import LlamaPolicy

# transformers' MistralConfig default, used when config.json has no sliding_window key at all (null: none).
DEFAULT_SLIDING_WINDOW = 4096


class MistralPolicy(LlamaPolicy):
    name = "mistral"
    architectures = ("MistralForCausalLM",)
    model_types = ("mistral",)
    layer_classes = ("MistralDecoderLayer",)
    label = "Mistral"

    def config_fields(self, hf: dict[str, Any], name: str, dtype: str) -> dict[str, Any]:
        fields = super().config_fields(hf, name, dtype)
        window = hf.get("sliding_window", DEFAULT_SLIDING_WINDOW)
        if window:
            fields |= {"attention_layers": ("local",), "window_size": int(window)}
        return fields
