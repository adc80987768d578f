"""The store cache: the tensor store for a model name, checkpoint or store, converted once on first use.

A store is converted under a lock (``NAME.lock`` beside it): a second process that needs the same store
waits, saying once for whom, and then opens the finished store instead of converting it again.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flexrun.config import OptConfig
from flexrun.costmodel.equations import compressed_fraction
from flexrun.errors import CheckpointError
from flexrun.paths import cache_dir
from flexrun.policies import policy_by_name
from flexrun.quant.formats import QuantSpec
from flexrun.resolver.cache import touch
from flexrun.resolver.configs import resolve
from flexrun.resolver.packaged import local_source
from flexrun.units import format_bytes
from flexrun.weights.convert import convert_checkpoint, write_dummy_store
from flexrun.weights.filelock import FileLock
from flexrun.weights.gguf import is_gguf
from flexrun.weights.hub import hub_download
from flexrun.weights.store import TensorStore

log = logging.getLogger(__name__)


def _store_key(cfg: OptConfig, source: str, compress: QuantSpec | None = None) -> str:
    digest = hashlib.sha256(f"{source}|{sorted(cfg.to_dict().items())}".encode()).hexdigest()[:10]
    packed = f"-{compress.kind}g{compress.group_size}" if compress else ""
    return f"{cfg.name}-{cfg.dtype}{packed}-{digest}"


@contextmanager
def store_lock(out: Path) -> Iterator[None]:
    """Hold the lock of the store ``out`` (converting it, or replacing it); while another process holds it,
    wait, saying once that this one waits and for whom."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create {out.parent}: {exc.strerror}") from None
    lock = FileLock(out.with_name(out.name + ".lock"))
    if not lock.acquire(wait=False):
        log.warning("waiting for %s, which is writing the tensor store %s", lock.holder(), out)
        lock.acquire(wait=True)
    try:
        yield
    finally:
        lock.release()


def store_bytes(cfg: OptConfig, compress: QuantSpec | None) -> int:
    """At least what a store of ``cfg`` takes on disk: its weights, the layers' matrices at the compressed
    size (a lower bound with compression: embeddings and norms stay in the model's dtype)."""
    full = cfg.model_bytes()
    return int(full * compressed_fraction(cfg.dtype_bytes, compress.kind)) if compress else full


def check_room(out: Path, need: int, what: str, fix: str) -> None:
    """Refuse, before anything is written, a store of ``need`` bytes where ``out``'s disk has less free."""
    where = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(where).free
    if need > free:
        raise CheckpointError(
            f"{what} needs {format_bytes(need)} in {out.parent}, whose disk has {format_bytes(free)} free (short by "
            f"{format_bytes(need - free)}); {fix}"
        )


def _converted(out: Path, convert: Callable[[], object], need: int = 0, what: str = "") -> TensorStore:
    """The store ``out``, converted by ``convert`` unless it is there (or another process finished it);
    ``need`` bytes of room are checked first."""
    if not (out / "index.json").exists():
        check_room(out, need, what, "free some space, or give --store-dir (or FLEXRUN_CACHE_DIR) on a disk with room")
        with store_lock(out):
            if not (out / "index.json").exists():
                convert()
    touch(out)  # for `flexrun cache ls` and `prune`
    return TensorStore(out)


def convert_into(
    model: str, out: str | Path, dtype: str | None, compress: QuantSpec | None, overwrite: bool, progress: bool = True
) -> bool:
    """Convert ``model`` into the store ``out`` (``flexrun convert``), under the store's lock; False when
    ``out`` already holds that conversion. Another store there is replaced only with ``overwrite``, and then
    atomically (``StoreWriter.finish``)."""
    out = Path(out)
    src = local_source(model)
    if src is None:
        resolve(model)  # an unknown name fails here, with close matches, before any download
        src = hub_download(model)
    with store_lock(out):
        if (out / "index.json").is_file() and not overwrite:
            try:
                store = TensorStore(out)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}; add --overwrite to replace it") from None
            source = store.index.get("source")
            held = set(store.compressed().values())
            same = source == str(src.resolve()) and store.config.dtype == (dtype or resolve(str(src)).dtype)
            if same and held == ({compress} if compress else set()):
                return False
            raise CheckpointError(
                f"{out} already holds a tensor store ({store.config.dtype}, converted from {source}); "
                "add --overwrite to replace it, or choose another --out"
            )
        check_room(
            out,
            store_bytes(resolve(str(src), **({"dtype": dtype} if dtype else {})), compress),
            f"converting {model}",
            "free some space or give --out on a disk with room",
        )
        convert_checkpoint(src, out, dtype=dtype, progress=progress, compress=compress)
    return True


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
    compress: QuantSpec | None = None,
) -> TensorStore:
    """The tensor store for ``model`` (a name, checkpoint directory or existing store), converting on first use,
    its layers' matmul weights compressed as ``compress`` says (each compression its own store).

    ``task`` ("generate" or "embed") is checked against the architecture before anything is converted.
    """
    path = Path(model).expanduser()
    if path.is_dir() and (path / "index.json").exists() and not (path / "config.json").exists():
        store = TensorStore(path)
        check_task(store.config, task, model)
        if dtype and store.config.dtype != dtype:
            raise CheckpointError(f"{path} holds {store.config.dtype} weights; convert again with --dtype {dtype}")
        held = set(store.compressed().values())
        if held != ({compress} if compress else set()):
            have = ", ".join(sorted(s.describe() for s in held)) or "uncompressed"
            want = compress.describe() if compress else "uncompressed"
            raise CheckpointError(f"{path} holds {have} weights, not {want}; convert the checkpoint again for that")
        return store
    overrides = {"dtype": dtype} if dtype else {}
    root = Path(store_root) if store_root else cache_dir() / "stores"
    if dummy:
        cfg = resolve(model, **overrides)
        check_task(cfg, task, model)
        out = root / (_store_key(cfg, "dummy", compress) + "-dummy")

        def write() -> None:
            log.info("writing dummy weights for %s to %s", cfg.name, out)
            write_dummy_store(cfg, out, progress=progress, compress=compress)

        return _converted(out, write, store_bytes(cfg, compress), f"writing {cfg.name}'s dummy weights")
    local = local_source(model)
    if local is not None:
        src = local
    else:
        resolve(model)  # an unknown name fails here, with close matches, before any download
        src = hub_download(model)
    cfg = resolve(str(src), **overrides)
    check_task(cfg, task, model)
    # A GGUF file's own blocks are kept where they map onto ``compress`` (weights.gguf_blocks).
    kept = "|gguf-blocks" if compress and is_gguf(src) else ""
    out = root / _store_key(cfg, str(src.resolve()) + kept, compress)

    def convert() -> None:
        log.info("converting %s to a tensor store at %s", src, out)
        convert_checkpoint(src, out, dtype=cfg.dtype, progress=progress, compress=compress)

    return _converted(out, convert, store_bytes(cfg, compress), f"converting {model}")
