"""Mixtral (MixtralForCausalLM): Mistral's attention with a sparse mixture of SwiGLU experts for its MLP, a
router choosing the top ``num_experts_per_tok`` of ``num_local_experts`` per token, their softmax weights
renormalised to sum to 1. Each expert is stored as tensors of its own (``expert{e}_gate_w`` ...), read from a
checkpoint's per-expert tensors (``block_sparse_moe.experts.{e}.w1/w3/w2``) or from transformers' fused
``mlp.experts.gate_up_proj`` / ``down_proj`` of a live model."""

from __future__ import annotations

from typing import Any

from flexrun.config import OptConfig
from flexrun.errors import CheckpointError
from flexrun.policies.base import Weight, WeightGetter, as_tensor, cat_rows, require
from flexrun.policies.llama import LlamaPolicy


def attention_weights(config: OptConfig, get: WeightGetter, p: str) -> dict[str, Weight]:
    """A LLaMA-style layer's norms and attention (q/k/v biases when the config has them), by slot."""
    out = {
        "ln1_w": get(p + "input_layernorm.weight"),
        "qkv_w": cat_rows([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"]),
        "out_w": get(p + "self_attn.o_proj.weight"),
        "ln2_w": get(p + "post_attention_layernorm.weight"),
    }
    if config.qkv_bias:
        out["qkv_b"] = cat_rows([get(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
    return out


def first_of(get: WeightGetter, names: list[str]) -> Weight:
    """The first of ``names`` the checkpoint has (saved and live models name some tensors differently)."""
    for name in names[:-1]:
        try:
            return get(name)
        except CheckpointError:
            pass
    return get(names[-1])


def expert_weights(
    get: WeightGetter, layer: str, prefixes: tuple[str, ...], names: tuple[str, str, str], experts: int
) -> dict[str, Weight]:
    """The experts of the layer whose tensors start with ``layer`` (``model.layers.3.``), by slot: per-expert
    tensors ``{prefix}experts.{e}.{name}.weight`` (gate, up, down ``names``) under the first of ``prefixes``
    that has them, else the fused (E, 2f, h) gate_up_proj and (E, h, f) down_proj under one of them."""
    missing = None
    for prefix in prefixes:
        base = f"{layer}{prefix}experts."
        try:
            out: dict[str, Weight] = {}
            for e in range(experts):
                gate, up, down = (get(f"{base}{e}.{n}.weight") for n in names)
                out |= {f"expert{e}_gate_w": gate, f"expert{e}_fc1_w": up, f"expert{e}_fc2_w": down}
            return out
        except CheckpointError as exc:
            missing = missing or exc
        try:
            gate_up, down = as_tensor(get(base + "gate_up_proj")), as_tensor(get(base + "down_proj"))
        except CheckpointError:
            continue
        f = gate_up.shape[1] // 2
        out = {}
        for e in range(experts):  # transformers' gate_up_proj is [gate | up] along its rows
            out |= {
                f"expert{e}_gate_w": gate_up[e, :f],
                f"expert{e}_fc1_w": gate_up[e, f:],
                f"expert{e}_fc2_w": down[e],
            }
        return out
    assert missing is not None
    raise missing


class MixtralPolicy(LlamaPolicy):
    name = "mixtral"
    architectures = ("MixtralForCausalLM",)
    model_types = ("mixtral",)
    layer_classes = ("MixtralDecoderLayer",)
    label = "Mixtral"

    def config_fields(self, hf: dict[str, Any], name: str, dtype: str) -> dict[str, Any]:
        fields = super().config_fields(hf, name, dtype)
        if hf.get("sliding_window"):  # Mixtral's default is none
            fields |= {"attention_layers": ("local",), "window_size": int(hf["sliding_window"])}
        return fields | {
            "num_experts": int(require(hf, "num_local_experts", name)),
            "experts_per_token": int(require(hf, "num_experts_per_tok", name)),
            "norm_topk_prob": True,
            "qkv_bias": False,
            "attn_out_bias": False,
        }

    def layer_weights(self, config: OptConfig, get: WeightGetter, i: int) -> dict[str, Weight]:
        p = f"model.layers.{i}."
        attention = attention_weights(config, get, p)
        router = first_of(get, [p + "block_sparse_moe.gate.weight", p + "mlp.gate.weight"])
        experts = expert_weights(get, p, ("block_sparse_moe.", "mlp."), ("w1", "w3", "w2"), config.num_experts)
        return attention | {"router_w": router} | experts
