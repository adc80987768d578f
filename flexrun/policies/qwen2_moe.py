"""Qwen2-MoE and Qwen1.5-MoE (Qwen2MoeForCausalLM): Qwen2's attention (q/k/v biases when ``qkv_bias``, sliding
windows where config.json asks) with a mixture of ``num_experts`` SwiGLU experts of width
``moe_intermediate_size``, the top ``num_experts_per_tok`` per token (their softmax weights renormalised only
with ``norm_topk_prob``), plus a shared expert of width ``shared_expert_intermediate_size`` gated per token by
sigmoid(shared_expert_gate). Every layer must be sparse (the stack's layout has one shape per layer)."""

from __future__ import annotations

from typing import Any

from flexrun.config import OptConfig
from flexrun.errors import ConfigError
from flexrun.policies.base import Weight, WeightGetter, require
from flexrun.policies.llama import LlamaPolicy
from flexrun.policies.mixtral import attention_weights, expert_weights
from flexrun.policies.qwen2 import DEFAULT_MAX_WINDOW_LAYERS, layer_windows


class Qwen2MoePolicy(LlamaPolicy):
    name = "qwen2_moe"
    architectures = ("Qwen2MoeForCausalLM",)
    model_types = ("qwen2_moe",)
    layer_classes = ("Qwen2MoeDecoderLayer",)
    label = "Qwen2-MoE"

    def config_fields(self, hf: dict[str, Any], name: str, dtype: str) -> dict[str, Any]:
        fields = super().config_fields(hf, name, dtype)
        layers = fields["num_hidden_layers"]
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise ConfigError(
                f"{name}: dense layers among the sparse ones (mlp_only_layers, decoder_sparse_step "
                f"{hf.get('decoder_sparse_step', 1)}) are not supported; every layer must be a mixture of experts"
            )
        # Qwen2-MoE's own default windows: the even-indexed layers below max_window_layers.
        window_layers = hf.get("max_window_layers", DEFAULT_MAX_WINDOW_LAYERS)
        kinds = hf.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 and i < window_layers else "full_attention" for i in range(layers)
        ]
        attention, window = layer_windows({**hf, "layer_types": kinds}, layers, name)
        qkv_bias = bool(hf.get("qkv_bias", True))
        return fields | {
            "ffn_embed_dim": int(require(hf, "moe_intermediate_size", name)),
            "num_experts": int(require(hf, "num_experts", name)),
            "experts_per_token": int(require(hf, "num_experts_per_tok", name)),
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
            "shared_expert_dim": int(hf.get("shared_expert_intermediate_size") or 0),
            "qkv_bias": qkv_bias,
            "attn_out_bias": False,
            "enable_bias": False,
            "attention_layers": attention,
            "window_size": window,
        }

    def layer_weights(self, config: OptConfig, get: WeightGetter, i: int) -> dict[str, Weight]:
        p = f"model.layers.{i}."
        out = attention_weights(config, get, p) | {"router_w": get(p + "mlp.gate.weight")}
        if config.shared_expert_dim:
            s = p + "mlp.shared_expert."
            out |= {
                "gate_w": get(s + "gate_proj.weight"),
                "fc1_w": get(s + "up_proj.weight"),
                "fc2_w": get(s + "down_proj.weight"),
                "shared_gate_w": get(p + "mlp.shared_expert_gate.weight"),
            }
        names = ("gate_proj", "up_proj", "down_proj")
        return out | expert_weights(get, p, ("mlp.",), names, config.num_experts)
