"""A model as it is before any conversion: its config and its tokenizer, for choices made before a store.

A job that leaves the weight compression to the planner must plan before it opens the store (each
compression is a store of its own): ``model_source`` gives the config and the tokenizer that converting
would use, without converting. A model that names an existing store is that store, compression included.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from flexrun.config import OptConfig
from flexrun.errors import CheckpointError
from flexrun.paths import cache_dir
from flexrun.quant.formats import QuantSpec
from flexrun.resolver.configs import resolve
from flexrun.resolver.packaged import local_source
from flexrun.resolver.stores import check_task
from flexrun.weights.gguf import GgufCheckpoint, is_gguf, native_compression
from flexrun.weights.hub import hub_download
from flexrun.weights.store import TensorStore

# The files any one of which makes a checkpoint directory's tokenizer (as ``Checkpoint.tokenizer_files``).
_VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model")


@dataclass(frozen=True)
class ModelSource:
    """What ``ensure_store`` would convert (or open): the config, the checkpoint, or the store itself."""

    config: OptConfig
    checkpoint: Path | None = None  # a checkpoint directory or GGUF file (None: dummy weights, or a store)
    store: TensorStore | None = None  # the model names this existing store

    def native_compression(self) -> QuantSpec | None:
        """The compression a GGUF file's layer matrices are already in (its Q4/Q8 blocks kept as they are);
        None for other checkpoints and float GGUF files."""
        if self.checkpoint is None or not is_gguf(self.checkpoint):
            return None
        return native_compression(self.checkpoint)

    def tokenizer_dir(self) -> Path | None:
        """A directory the tokenizer loads from (the same files converting puts into the store), None
        without one. A GGUF file's tokenizer is written out once per file (building it takes seconds)."""
        if self.store is not None:
            return self.store.tokenizer_dir()
        if self.checkpoint is None:
            return None
        if is_gguf(self.checkpoint):
            return _gguf_tokenizer(self.checkpoint)
        if any((self.checkpoint / f).exists() for f in _VOCAB_FILES):
            return self.checkpoint
        return None


def model_source(model: str, dtype: str | None = None, dummy: bool = False, task: str = "generate") -> ModelSource:
    """``model`` (a name, checkpoint directory, GGUF file or store) resolved as ``ensure_store`` resolves it,
    without converting anything; ``task`` is checked against the architecture."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / "index.json").exists() and not (path / "config.json").exists():
        store = TensorStore(path)
        check_task(store.config, task, model)
        if dtype and store.config.dtype != dtype:
            raise CheckpointError(f"{path} holds {store.config.dtype} weights; convert again with --dtype {dtype}")
        return ModelSource(store.config, store=store)
    overrides = {"dtype": dtype} if dtype else {}
    if dummy:
        cfg = resolve(model, **overrides)
        check_task(cfg, task, model)
        return ModelSource(cfg)
    src = local_source(model)
    if src is None:
        resolve(model)  # an unknown name fails here, with close matches, before any download
        src = hub_download(model)
    cfg = resolve(str(src), **overrides)
    check_task(cfg, task, model)
    return ModelSource(cfg, checkpoint=src)


def _gguf_tokenizer(path: Path) -> Path:
    """The GGUF file's tokenizer saved as a directory under the cache dir, written on first use."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf-tokenizers" / f"{path.stem}-{key}"
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    GgufCheckpoint(path).save_tokenizer(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
