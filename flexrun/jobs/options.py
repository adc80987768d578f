"""Options typed once at the edge: the CLI builds these frozen dataclasses from click's values, the jobs
read their fields, and nothing below them sees a dict of options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from flexrun.config import OptConfig
from flexrun.costmodel.hardware import HardwareSpec
from flexrun.placement import Placement, Shares
from flexrun.precision import with_compute_dtype
from flexrun.quant.formats import QuantSpec
from flexrun.resolver import ModelSource, ensure_store, model_source
from flexrun.runtime.sampling import SamplingParams
from flexrun.runtime.tiers import Budgets
from flexrun.weights.store import TensorStore

#: A compression or compute dtype left to the planner (``--placement auto``); off or the precision rule
#: when nothing is planned.
AUTO = "auto"


@dataclass(frozen=True)
class ModelOptions:
    """Which model, in which dtypes, from where."""

    model: str  # a model name, checkpoint directory, GGUF file or tensor store
    dtype: str | None = None  # what weights and the KV cache are stored in (None: the checkpoint's)
    compute_dtype: str = "auto"  # what the arithmetic runs in ("auto": see precision)
    dummy_weights: bool = False  # random weights of the right shapes
    store_dir: str | None = None  # where converted stores are cached (None: the cache dir)
    compress_weight: str = ""  # "int8" or "int4": the layers' matmul weights stored compressed; AUTO
    group_size: int | None = None  # the compression's group along K (None: its default)

    @property
    def compression(self) -> QuantSpec | None:
        """The weights' compression (None: none; AUTO, not yet chosen, opens the uncompressed store)."""
        kind = self.compress_weight
        return QuantSpec.of(kind, self.group_size) if kind and kind != AUTO else None

    def source(self, task: str = "generate") -> ModelSource:
        """The model's config and tokenizer as converting would give them, without converting. A store given
        directly must hold the compression asked for (refused here, before anything else is checked)."""
        source = model_source(self.model, dtype=self.dtype, dummy=self.dummy_weights, task=task)
        if source.store is not None and self.compress_weight != AUTO:
            self.open_store(task, progress=False)
        return source

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

    def held_by(self, store: TensorStore) -> ModelOptions:
        """These options with the compression ``store`` holds (kind and group size): a store given directly
        is what it is, whatever the planner would choose."""
        spec = next(iter(set(store.compressed().values())), None)
        kind, group = (spec.kind, spec.group_size) if spec else ("", None)
        return dataclasses.replace(self, compress_weight=kind, group_size=group)

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
    compress_cache: str = ""  # "int8" or "int4": the KV cache stored compressed; AUTO: the planner's choice
    cpu_cache_compute: bool | None = False  # host-side attention over an off-device cache; None: the planner's

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
            compress_cache="" if self.compress_cache == AUTO else self.compress_cache,
            cpu_cache_compute=bool(self.cpu_cache_compute),
        )


@dataclass(frozen=True)
class EngineOptions:
    """Everything that decides how a job's engine is built: model, placement, budgets, offload dir."""

    model: ModelOptions
    placement: PlacementRequest = field(default_factory=PlacementRequest)
    budgets: Budgets = field(default_factory=Budgets)
    offload_dir: str | None = None
    tp: int = 1  # tensor-parallel ranks (each holds 1/tp of every layer and its machine's part of the budgets)

    def settled(
        self, compress_weight: str = AUTO, compress_cache: str = AUTO, compute_dtype: str = AUTO
    ) -> EngineOptions:
        """These options with the choices still left open (AUTO) made as given (AUTO: still open)."""

        def pick(mine: str, given: str) -> str:
            return given if mine == AUTO else mine

        model = dataclasses.replace(
            self.model,
            compress_weight=pick(self.model.compress_weight, compress_weight),
            compute_dtype=pick(self.model.compute_dtype, compute_dtype),
        )
        placement = dataclasses.replace(
            self.placement, compress_cache=pick(self.placement.compress_cache, compress_cache)
        )
        return dataclasses.replace(self, model=model, placement=placement)


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
    share_prefix: bool = True  # the prompts of a block that share a prefix prefill it once
    overwrite: bool = False
    text: bool = False  # completions as text on stdout (streamed, in order), for a person; records only to output
    quiet: bool = False
    verbose: bool = False  # the plan line and the full summary, also at a terminal
    # Wrap each text prompt as one user turn of the tokenizer's chat template; None: when a person typed the
    # prompts (--prompt, plain text on stdin) and the checkpoint ships a template.
    chat: bool | None = False
    # Whether --max-new-tokens was given; if not, a chat answer gets CHAT_MAX_NEW_TOKENS (what the context
    # leaves) instead of params.max_new_tokens.
    max_new_tokens_given: bool = True

    #: The answer length a chat gets when --max-new-tokens is not given.
    CHAT_MAX_NEW_TOKENS = 512
