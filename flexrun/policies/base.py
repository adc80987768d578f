"""The policy contract: where a Hugging Face architecture keeps each tensor of the fused layer.

A policy is a pure mapping. It reads tensors by their Hugging Face names through ``get`` and returns them
under the fused layer's slot names (see ``OptConfig.layer_shapes``), in the engine's layout: Linear weights
[out, in], QKV as one [Q | K | V] tensor. It knows nothing of devices, tiers, quantization or parallelism.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from flexrun.config import OptConfig

TensorGetter = Callable[[str], torch.Tensor]


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

    @abstractmethod
    def config_from_hf(self, hf: dict[str, Any], name: str, dtype: str) -> OptConfig:
        """The model's ``OptConfig`` from its config.json."""

    @abstractmethod
    def layer_tensors(self, config: OptConfig, get: TensorGetter, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors by slot name, read with ``get(hf_name)``."""

    @abstractmethod
    def global_names(self, config: OptConfig) -> dict[str, str]:
        """Hugging Face names of the tensors outside the layer stack (embeddings, projections, final norm,
        untied LM head), by slot name (see ``OptConfig.global_shapes``)."""

    def fit_checkpoint(self, config: OptConfig, has: Callable[[str], bool]) -> OptConfig:
        """``config`` adjusted to the tensors the checkpoint holds (``has(hf_name)``), for parts that
        config.json does not describe, such as an optional pooler. Unchanged by default."""
        return config
