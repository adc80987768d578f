"""Hugging Face checkpoint (or random dummy weights) -> flexrun tensor store, one tensor at a time.

Peak memory while converting is about two copies of the largest fused tensor (a layer's QKV or the
embedding table) in the target dtype, plus the checkpoint pages the OS maps in and can drop again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from flexrun.config import OptConfig
from flexrun.errors import CheckpointError
from flexrun.layout import stack_layout
from flexrun.policies import Policy, TensorGetter, config_from_hf, policy_for_hf_config, policy_for_layer, registered
from flexrun.policies.base import Weight, WeightGetter, as_tensor
from flexrun.quant.formats import QuantSpec, spec_of
from flexrun.weights.checkpoint import open_checkpoint
from flexrun.weights.gguf import GgufCheckpoint
from flexrun.weights.store import TORCH_DTYPES, StoreWriter, dtype_name

log = logging.getLogger(__name__)


def _checked(cfg: OptConfig, name: str, tensor: Weight, shape: tuple[int, ...]) -> Weight:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{cfg.name}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def _hf_tensors(
    get: TensorGetter, cfg: OptConfig, policy: Policy, get_layer: WeightGetter | None = None
) -> Iterator[tuple[str, Weight]]:
    """The store's tensors in store order, each read (``get(hf_name)``) only when it is written; the
    layers' tensors through ``get_layer`` when given (one that may return compressed matrices)."""

    def aliased(read: WeightGetter) -> WeightGetter:
        def lookup(name: str) -> Weight:
            try:
                return read(name)
            except CheckpointError:
                if name not in policy.aliases:
                    raise
                return read(policy.aliases[name])

        return lookup

    lookup, layer_lookup = aliased(get), aliased(get_layer or get)

    layer_shapes, global_shapes = cfg.layer_shapes(), cfg.global_shapes()
    hf_names = policy.global_names(cfg)
    slots: dict[str, Weight] = {}
    for name in stack_layout(cfg).store_order:
        if not name.startswith("layers."):
            yield name, _checked(cfg, name, lookup(hf_names[name]), global_shapes[name])
            continue
        _, i, slot = name.split(".")
        if not slots:
            slots = policy.layer_weights(cfg, layer_lookup, int(i))
        yield name, _checked(cfg, name, slots.pop(slot), layer_shapes[slot])


def compress_plan(cfg: OptConfig, compress: QuantSpec | None) -> dict[str, QuantSpec]:
    """The tensors ``compress`` applies to, each checked (its K a multiple of the group size) before
    anything is written."""
    if compress is None:
        return {}
    layout = stack_layout(cfg)
    names = layout.compressible()
    for name in names:
        compress.check(f"{cfg.name}: {name}", layout.shapes[name])
    return dict.fromkeys(names, compress)


def _write(writer: StoreWriter, name: str, weight: Weight, spec: QuantSpec | None) -> None:
    """Write ``weight`` as ``spec`` says: a matrix already compressed as ``spec`` as it is, anything else
    from its float value."""
    if isinstance(weight, torch.Tensor) or spec is None or spec_of(weight) != spec:
        writer.add(name, as_tensor(weight), spec)
    else:
        writer.add_compressed(name, weight)


def _model_name(src: Path) -> str:
    """A checkpoint's name: its directory's name, or a GGUF file's name without the suffix."""
    return src.stem if src.is_file() else src.name


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    dtype: str | None = None,
    progress: bool = True,
    compress: QuantSpec | None = None,
) -> Path:
    """Convert the Hugging Face checkpoint directory (or GGUF file) ``src`` into a tensor store at ``out``,
    its layers' matmul weights compressed as ``compress`` says: from their values in the store's dtype, or,
    for a GGUF matrix whose blocks are already that compression (Q4_0/Q4_1/Q4_K as int4 g32, Q8_0 as int8
    g32), its own codes and scales."""
    src = Path(src)
    ckpt = open_checkpoint(src)
    hf = ckpt.hf_config()
    cfg = config_from_hf(hf, name=_model_name(src))
    if dtype:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    cfg = policy_for_hf_config(hf).fit_checkpoint(cfg, ckpt.has)
    if isinstance(ckpt, GgufCheckpoint):  # its big tables read straight into the store's dtype
        ckpt.dtype = TORCH_DTYPES[cfg.dtype]
    packed = compress_plan(cfg, compress)
    get_packed = getattr(ckpt, "get_packed", None)

    def get_layer(name: str) -> Weight:
        kept = get_packed(name, compress) if get_packed and compress else None
        return ckpt.get(name) if kept is None else kept

    writer = StoreWriter(out, cfg, extra={"source": str(src.resolve())})
    try:
        ckpt.save_tokenizer(writer.tmp / "tokenizer")  # first: a tokenizer that cannot load fails before the weights
        names = stack_layout(cfg).store_order
        for name, tensor in tqdm(
            _hf_tensors(ckpt.get, cfg, policy_for_hf_config(hf), get_layer),
            total=len(names),
            desc=f"convert {cfg.name}",
            unit="tensor",
            disable=not progress,
        ):
            _write(writer, name, tensor, packed.get(name))
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def convert_model(model: torch.nn.Module, out: str | Path, dtype: str | None = None, progress: bool = True) -> Path:
    """Convert a live Hugging Face model into a tensor store at ``out``.

    The policy is the one whose layer class is exactly the class of the model's decoder layers (as
    DeepSpeed matches ``_orig_layer_class``); tensors are read from the model's state dict by name.
    """
    known = {cls for p in registered() for cls in p.layer_classes}
    layer = next((m for m in model.modules() if type(m).__name__ in known), model)
    policy = policy_for_layer(layer)  # for no known layer: the error listing the supported architectures
    hf_config = getattr(model, "config", None)
    if hf_config is None:
        raise CheckpointError(f"{type(model).__name__} is not a Hugging Face model (it has no .config)")
    hf = hf_config.to_dict()
    name = hf.get("_name_or_path") or type(model).__name__
    cfg = policy.config_from_hf(
        hf, name=Path(str(name)).name, dtype=dtype or dtype_name(next(model.parameters()).dtype)
    )
    state = model.state_dict()

    def get(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"{cfg.name}: tensor {key} not found in the model")
        return state[key].detach()

    writer = StoreWriter(out, cfg, extra={"source": f"live {type(model).__name__}"})
    try:
        names = stack_layout(cfg).store_order
        desc = f"convert {cfg.name}"
        for key, tensor in tqdm(_hf_tensors(get, cfg, policy), total=len(names), desc=desc, disable=not progress):
            writer.add(key, as_tensor(tensor))
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def write_dummy_store(
    cfg: OptConfig, out: str | Path, seed: int = 0, progress: bool = True, compress: QuantSpec | None = None
) -> Path:
    """A store of random weights with the right shapes (FlexGen's ``_DUMMY_``): no download needed.

    Values are small (normal, std 0.02; norms at 1) so activations stay finite in low precision.
    """
    packed = compress_plan(cfg, compress)
    writer = StoreWriter(out, cfg, extra={"source": "dummy", "seed": seed})
    gen = torch.Generator().manual_seed(seed)
    layout = stack_layout(cfg)
    shapes = layout.shapes
    try:
        for name in tqdm(layout.store_order, desc=f"dummy {cfg.name}", unit="tensor", disable=not progress):
            slot = name.rsplit(".", 1)[-1]
            if slot.startswith(("ln", "final_ln", "embed_ln")) and slot.endswith("_w"):
                t = torch.ones(shapes[name])
            else:
                t = torch.randn(shapes[name], generator=gen).mul_(0.02)
            writer.add(name, t, packed.get(name))
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
