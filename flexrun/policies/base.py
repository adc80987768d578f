"""The policy contract: where a Hugging Face architecture keeps each tensor of the fused layer.

A policy is a pure mapping. It reads tensors by their Hugging Face names through ``get`` and returns them
under the fused layer's slot names (see ``OptConfig.layer_shapes``), in the engine's layout: Linear weights
[out, in], QKV as one [Q | K | V] tensor. It knows nothing of devices, tiers or parallelism. A checkpoint
that is already quantized (GGUF) can hand a policy compressed matrices (``QuantWeight``); a policy whose
mapping only stacks and reorders rows takes them through ``layer_weights`` and keeps them compressed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from flexrun.config import ROPE_TYPES, OptConfig
from flexrun.errors import ConfigError
from flexrun.quant import formats
from flexrun.quant.formats import QuantWeight

TensorGetter = Callable[[str], torch.Tensor]
# A tensor, or a matrix still in a checkpoint's own compressed blocks.
Weight = torch.Tensor | QuantWeight
WeightGetter = Callable[[str], Weight]


class Policy(ABC):
    """One architecture family's mapping from Hugging Face names to fused-layer slots."""

    #: Registry key and the name users see.
    name: ClassVar[str]
    #: config.json ``architectures`` entries this policy serves.
    architectures: ClassVar[tuple[str, ...]]
    #: config.json ``model_type`` values this policy serves.
    model_types: ClassVar[tuple[str, ...]]
    #: Class names of the live Hugging Face decoder layers this policy replaces.
    layer_classes: ClassVar[tuple[str, ...]]
    #: False for encoders, which `generate` refuses.
    generative: ClassVar[bool] = True
    #: Other names a tensor goes by (saved checkpoints vs a live model of the current transformers).
    aliases: ClassVar[dict[str, str]] = {}

    @abstractmethod
    def config_from_hf(self, hf: dict[str, Any], name: str, dtype: str) -> OptConfig:
        """The model's ``OptConfig`` from its config.json."""

    @abstractmethod
    def layer_tensors(self, config: OptConfig, get: TensorGetter, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors by slot name, read with ``get(hf_name)``."""

    def layer_weights(self, config: OptConfig, get: WeightGetter, i: int) -> dict[str, Weight]:
        """``layer_tensors`` for a getter that may return compressed matrices. By default they are
        dequantized to float32 first; a policy that only stacks rows overrides this to keep them."""
        return dict(self.layer_tensors(config, lambda name: as_tensor(get(name)), i))

    @abstractmethod
    def global_names(self, config: OptConfig) -> dict[str, str]:
        """Hugging Face names of the tensors outside the layer stack (embeddings, projections, final norm,
        untied LM head), by slot name (see ``OptConfig.global_shapes``)."""

    def fit_checkpoint(self, config: OptConfig, has: Callable[[str], bool]) -> OptConfig:
        """``config`` adjusted to the tensors the checkpoint holds (``has(hf_name)``), for parts that
        config.json does not describe, such as an optional pooler. Unchanged by default."""
        return config


# ---- helpers the policies share (pure functions of config.json values and tensors) -------------------
def as_tensor(w: Weight) -> torch.Tensor:
    """``w`` as a float tensor (a compressed matrix dequantized to float32)."""
    return w if isinstance(w, torch.Tensor) else w.dequantize(torch.float32)


def cat_rows(parts: Sequence[Weight]) -> Weight:
    """[out, in] matrices stacked along their rows (a fused [Q | K | V]): compressed when all of them are
    compressed alike, else float (the compressed ones dequantized)."""
    quant = [p for p in parts if not isinstance(p, torch.Tensor)]
    if len(quant) == len(parts):
        joined = formats.cat_rows(quant)
        if joined is not None:
            return joined
    return torch.cat([as_tensor(p) for p in parts], dim=0)


def token_ids(hf: dict[str, Any], default: int) -> dict[str, Any]:
    """pad/bos/eos ids from config.json; a missing pad falls back to eos (padding is always masked). Of several
    eos ids (Llama 3.1's end of text, of message and of turn) the first is the model's eos and each of them
    ends a sequence, as in HF's generate."""

    def first(value: Any) -> int | None:
        if isinstance(value, list):
            return int(value[0]) if value else None
        return None if value is None else int(value)

    eos = first(hf.get("eos_token_id"))
    bos = first(hf.get("bos_token_id"))
    pad = first(hf.get("pad_token_id"))
    eos = default if eos is None else eos
    return {
        "eos_token_id": eos,
        "bos_token_id": eos if bos is None else bos,
        "pad_token_id": eos if pad is None else pad,
        "eos_token_ids": eos_ids(hf),
    }


def eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    """Every eos id config.json lists, when it lists several (one id: empty, the eos_token_id says it)."""
    value = hf.get("eos_token_id")
    return tuple(int(v) for v in value) if isinstance(value, list) and len(value) > 1 else ()


# Parameters each scaled rope type cannot do without (transformers' functions index them).
_ROPE_NEEDS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("long_factor", "short_factor"),
}


def rope_fields(hf: dict[str, Any], head_dim: int, name: str, max_positions: int) -> dict[str, Any]:
    """rope_theta, rotary_dim, rope_scaling and max_seq_len from config.json, read as transformers reads them:
    transformers 5's ``rope_parameters`` or the older ``rope_scaling`` (which wins when both are there) with
    the top-level ``rope_theta`` / ``rotary_emb_base`` / ``rotary_pct`` / ``partial_rotary_factor``.

    ``max_positions`` is config.json's max_position_embeddings. llama3, yarn and longrope record the context
    they were trained for as original_max_position_embeddings, max_position_embeddings when the rope
    parameters leave it out (a top-level key counts only for configs that declare one, such as Phi-3's,
    none of the families here); dynamic NTK scales up from max_position_embeddings, which it records
    under that name, and runs to ``factor`` times it."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{name}: rope parameters per layer type are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta") or hf.get("rope_theta") or hf.get("rotary_emb_base") or 10000.0
    factor = params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or hf.get("rotary_pct") or 1.0
    rotary_dim = int(head_dim * float(factor))
    if rotary_dim == 0:  # HF rotates nothing; flexrun's 0 would mean the whole head
        raise ConfigError(
            f"{name}: a partial rotary factor of {factor} leaves 0 of the head's {head_dim} dimensions rotary; "
            "not supported"
        )
    out = {"rope_theta": float(theta), "rotary_dim": rotary_dim, "max_seq_len": max_positions}
    if kind == "default":
        return out
    if kind not in _ROPE_NEEDS:
        raise ConfigError(
            f"{name}: rope scaling {kind!r} is not supported (supported: default, {', '.join(ROPE_TYPES)})"
        )
    missing = [key for key in _ROPE_NEEDS[kind] if params.get(key) is None]
    if missing:
        raise ConfigError(f"{name}: rope scaling {kind!r} needs {missing[0]!r} in config.json")
    scaling = {k: v for k, v in params.items() if k not in ("type", "rope_theta", "partial_rotary_factor")}
    scaling["rope_type"] = kind
    if kind == "dynamic":
        scaling["original_max_position_embeddings"] = max_positions
        out["max_seq_len"] = max(max_positions, int(max_positions * float(params["factor"])))
    elif kind in ("llama3", "yarn", "longrope"):
        scaling.setdefault("original_max_position_embeddings", max_positions)
    return {**out, "rope_scaling": scaling}


def rope_settings(hf: dict[str, Any], head_dim: int, name: str, max_positions: int) -> dict[str, Any]:
    """``rope_fields``, for a policy's OptConfig (``kernels.positions.Rope`` applies rope_scaling)."""
    return rope_fields(hf, head_dim, name, max_positions)


def qkv_from_interleaved_heads(t: torch.Tensor, n_head: int, head_dim: int) -> torch.Tensor:
    """A fused QKV weight (3h, in) or bias (3h,) laid out per head as [q_i | k_i | v_i] (BLOOM, GPT-NeoX)
    reordered to the engine's [Q | K | V]."""
    rest = t.shape[1:]
    per_head = t.reshape(n_head, 3, head_dim, *rest)
    return per_head.transpose(0, 1).reshape(3 * n_head * head_dim, *rest)


def require(hf: dict[str, Any], key: str, name: str) -> Any:
    """``hf[key]``, or a ConfigError naming the missing field."""
    if hf.get(key) is None:
        raise ConfigError(f"{name}: config.json has no {key!r}")
    return hf[key]
