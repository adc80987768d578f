"""Options typed once at the edge: the CLI builds these frozen dataclasses from click's values, the jobs
read their fields, and nothing below them sees a dict of options."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flexrun.config import OptConfig
from flexrun.costmodel.hardware import HardwareSpec
from flexrun.placement import Placement, Shares
from flexrun.precision import with_compute_dtype
from flexrun.quant.formats import QuantSpec
from flexrun.resolver import ensure_store
from flexrun.runtime.sampling import SamplingParams
from flexrun.runtime.tiers import Budgets
from flexrun.weights.store import TensorStore


@dataclass(frozen=True)
class ModelOptions:
    """Which model, in which dtypes, from where."""

    model: str  # a model name, checkpoint directory, GGUF file or tensor store
    dtype: str | None = None  # what weights and the KV cache are stored in (None: the checkpoint's)
    compute_dtype: str = "auto"  # what the arithmetic runs in ("auto": see precision)
    dummy_weights: bool = False  # random weights of the right shapes
    store_dir: str | None = None  # where converted stores are cached (None: the cache dir)
    compress_weight: str = ""  # "int8" or "int4": the layers' matmul weights stored compressed
    group_size: int | None = None  # the compression's group along K (None: its default)

    @property
    def compression(self) -> QuantSpec | None:
        return QuantSpec.of(self.compress_weight, self.group_size) if self.compress_weight else None

    def open_store(self, task: str = "generate", progress: bool = True) -> TensorStore:
        """The model's tensor store (compressed as asked), converted on first use; ``task`` is checked against
        the architecture."""
        return ensure_store(
            self.model,
            dtype=self.dtype,
            dummy=self.dummy_weights,
            store_root=self.store_dir,
            progress=progress,
            task=task,
            compress=self.compression,
        )

    def run_config(self, store: TensorStore, device: torch.device) -> OptConfig:
        """The store's config with the compute dtype resolved for ``device``: resolved here, once per job."""
        return with_compute_dtype(store.config, self.compute_dtype, device)


@dataclass(frozen=True)
class PlacementRequest:
    """The placement options as given: ``None`` where the command line left them open."""

    mode: str = "auto"  # "auto": the planner chooses what is left open; "manual": defaults fill it
    weights: Shares | None = None
    cache: Shares | None = None
    activations: Shares | None = None
    gpu_batch_size: int | None = None
    num_gpu_batches: int | None = None
    overlap: bool = True
    hardware: HardwareSpec | None = None  # the planner's figures (None: this machine's)
    compress_cache: str = ""  # "int8" or "int4": the KV cache stored compressed

    #: What ``manual`` uses for an option left out.
    MANUAL_BATCH = 4

    @property
    def planned(self) -> bool:
        """Whether the planner chooses any part of the placement (auto mode with something left open)."""
        given = (self.weights, self.cache, self.activations, self.gpu_batch_size, self.num_gpu_batches)
        return self.mode == "auto" and any(v is None for v in given)

    def manual(self) -> Placement:
        """The placement spelled by the options, with the manual defaults for those left out."""
        return Placement(
            weights=self.weights or Shares(),
            cache=self.cache or Shares(),
            activations=self.activations or Shares(),
            gpu_batch_size=self.gpu_batch_size or self.MANUAL_BATCH,
            num_gpu_batches=self.num_gpu_batches or 1,
            overlap=self.overlap,
            compress_cache=self.compress_cache,
        )


@dataclass(frozen=True)
class EngineOptions:
    """Everything that decides how a job's engine is built: model, placement, budgets, offload dir."""

    model: ModelOptions
    placement: PlacementRequest = field(default_factory=PlacementRequest)
    budgets: Budgets = field(default_factory=Budgets)
    offload_dir: str | None = None


@dataclass(frozen=True)
class JobOptions:
    """What ``flexrun generate`` was asked to do, apart from the model and placement."""

    params: SamplingParams
    prompts: tuple[str, ...] = ()
    input_file: str | None = None
    output: str | None = None
    num_return_sequences: int = 1
    truncate: str = "none"  # "none": a prompt longer than the context is an error; "left": keep its end
    order: str = "length"  # "length" (longest first) or "input"
    overwrite: bool = False
    stream: bool = False
    quiet: bool = False
    chat: bool = False  # wrap each text prompt as one user turn of the tokenizer's chat template
