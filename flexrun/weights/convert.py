"""Hugging Face checkpoint (or random dummy weights) -> flexrun tensor store, one tensor at a time.

Peak memory while converting is about two copies of the largest fused tensor (a layer's QKV or the
embedding table) in the target dtype, plus the checkpoint pages the OS maps in and can drop again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from flexrun.config import INPUT_GLOBALS, OptConfig, config_from_hf, resolve
from flexrun.errors import CheckpointError, OfflineError
from flexrun.paths import cache_dir
from flexrun.policies import (
    Policy,
    TensorGetter,
    policy_by_name,
    policy_for_hf_config,
    policy_for_layer,
    registered,
)
from flexrun.weights.checkpoint import open_checkpoint
from flexrun.weights.packaged import local_source
from flexrun.weights.store import StoreWriter, TensorStore, dtype_name

log = logging.getLogger(__name__)


def store_order(cfg: OptConfig) -> list[str]:
    """Tensor names in the order the engine walks the stack: input embeddings, layers, output head."""
    glob = list(cfg.global_shapes())
    first = [n for n in glob if n in INPUT_GLOBALS]
    last = [n for n in glob if n not in first]
    layers = [f"layers.{i}.{slot}" for i in range(cfg.num_hidden_layers) for slot in cfg.layer_shapes()]
    return first + layers + last


def _checked(cfg: OptConfig, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{cfg.name}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def _hf_tensors(get: TensorGetter, cfg: OptConfig, policy: Policy) -> Iterator[tuple[str, torch.Tensor]]:
    """The store's tensors in store order, each read (``get(hf_name)``) only when it is written."""

    def lookup(name: str) -> torch.Tensor:
        try:
            return get(name)
        except CheckpointError:
            if name not in policy.aliases:
                raise
            return get(policy.aliases[name])

    layer_shapes, global_shapes = cfg.layer_shapes(), cfg.global_shapes()
    hf_names = policy.global_names(cfg)
    slots: dict[str, torch.Tensor] = {}
    for name in store_order(cfg):
        if not name.startswith("layers."):
            yield name, _checked(cfg, name, lookup(hf_names[name]), global_shapes[name])
            continue
        _, i, slot = name.split(".")
        if not slots:
            slots = policy.layer_tensors(cfg, lookup, int(i))
        yield name, _checked(cfg, name, slots.pop(slot), layer_shapes[slot])


def _model_name(src: Path) -> str:
    """A checkpoint's name: its directory's name, or a GGUF file's name without the suffix."""
    return src.stem if src.is_file() else src.name


def convert_checkpoint(src: str | Path, out: str | Path, dtype: str | None = None, progress: bool = True) -> Path:
    """Convert the Hugging Face checkpoint directory (or GGUF file) ``src`` into a tensor store at ``out``."""
    src = Path(src)
    ckpt = open_checkpoint(src)
    hf = ckpt.hf_config()
    cfg = config_from_hf(hf, name=_model_name(src))
    if dtype:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    cfg = policy_for_hf_config(hf).fit_checkpoint(cfg, ckpt.has)
    writer = StoreWriter(out, cfg, extra={"source": str(src.resolve())})
    try:
        names = store_order(cfg)
        for name, tensor in tqdm(
            _hf_tensors(ckpt.get, cfg, policy_for_hf_config(hf)),
            total=len(names),
            desc=f"convert {cfg.name}",
            unit="tensor",
            disable=not progress,
        ):
            writer.add(name, tensor)
        ckpt.save_tokenizer(writer.tmp / "tokenizer")
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
        names = store_order(cfg)
        desc = f"convert {cfg.name}"
        for key, tensor in tqdm(_hf_tensors(get, cfg, policy), total=len(names), desc=desc, disable=not progress):
            writer.add(key, tensor)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def write_dummy_store(cfg: OptConfig, out: str | Path, seed: int = 0, progress: bool = True) -> Path:
    """A store of random weights with the right shapes (FlexGen's ``_DUMMY_``): no download needed.

    Values are small (normal, std 0.02; norms at 1) so activations stay finite in low precision.
    """
    writer = StoreWriter(out, cfg, extra={"source": "dummy", "seed": seed})
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        **cfg.global_shapes(),
        **{f"layers.{i}.{k}": s for i in range(cfg.num_hidden_layers) for k, s in cfg.layer_shapes().items()},
    }
    try:
        for name in tqdm(store_order(cfg), desc=f"dummy {cfg.name}", unit="tensor", disable=not progress):
            slot = name.rsplit(".", 1)[-1]
            if slot.startswith(("ln", "final_ln", "embed_ln")) and slot.endswith("_w"):
                t = torch.ones(shapes[name])
            else:
                t = torch.randn(shapes[name], generator=gen).mul_(0.02)
            writer.add(name, t)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _store_key(cfg: OptConfig, source: str) -> str:
    digest = hashlib.sha256(f"{source}|{sorted(cfg.to_dict().items())}".encode()).hexdigest()[:10]
    return f"{cfg.name}-{cfg.dtype}-{digest}"


def hub_download(name: str) -> Path:
    """Download a Hugging Face hub checkpoint (weights, config, tokenizer) and return its directory."""
    repo = name if "/" in name else f"facebook/{name}"
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "tokenizer.model"],
            )
        )
    except Exception as exc:  # network errors come in many classes; all mean the same to the user
        raise OfflineError(
            f"cannot download {repo} from the Hugging Face hub ({exc.__class__.__name__}); "
            "pass a local checkpoint directory, or --dummy-weights for random weights"
        ) from None


def check_task(cfg: OptConfig, task: str, model: str) -> None:
    """Refuse to generate with an encoder, or to embed with a decoder, naming the command that fits."""
    policy = policy_by_name(cfg.arch)
    if task == "generate" and not policy.generative:
        raise CheckpointError(
            f"{model} is an encoder model ({policy.name}) and cannot generate text; "
            f"use `flexrun embed --model {model} --input FILE.jsonl` for its embeddings"
        )
    if task == "embed" and policy.generative:
        raise CheckpointError(
            f"{model} is a decoder model ({policy.name}); `flexrun embed` runs encoder models (BERT, RoBERTa), "
            "use `flexrun generate` for this one"
        )


def ensure_store(
    model: str,
    dtype: str | None = None,
    dummy: bool = False,
    store_root: str | Path | None = None,
    progress: bool = True,
    task: str = "generate",
) -> TensorStore:
    """The tensor store for ``model`` (a name, checkpoint directory or existing store), converting on first use.

    ``task`` ("generate" or "embed") is checked against the architecture before anything is converted.
    """
    path = Path(model).expanduser()
    if path.is_dir() and (path / "index.json").exists() and not (path / "config.json").exists():
        store = TensorStore(path)
        check_task(store.config, task, model)
        if dtype and store.config.dtype != dtype:
            raise CheckpointError(f"{path} holds {store.config.dtype} weights; convert again with --dtype {dtype}")
        return store
    overrides = {"dtype": dtype} if dtype else {}
    root = Path(store_root) if store_root else cache_dir() / "stores"
    if dummy:
        cfg = resolve(model, **overrides)
        check_task(cfg, task, model)
        out = root / (_store_key(cfg, "dummy") + "-dummy")
        if not (out / "index.json").exists():
            log.info("writing dummy weights for %s to %s", cfg.name, out)
            write_dummy_store(cfg, out, progress=progress)
        return TensorStore(out)
    local = local_source(model)
    if local is not None:
        src = local
    else:
        resolve(model)  # an unknown name fails here, with close matches, before any download
        src = hub_download(model)
    cfg = resolve(str(src), **overrides)
    check_task(cfg, task, model)
    out = root / _store_key(cfg, str(src.resolve()))
    if not (out / "index.json").exists():
        log.info("converting %s to a tensor store at %s", src, out)
        convert_checkpoint(src, out, dtype=cfg.dtype, progress=progress)
    return TensorStore(out)
