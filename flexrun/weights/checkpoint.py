"""Lazy, tensor-by-tensor access to a Hugging Face checkpoint directory.

safetensors files are memory-mapped; ``.bin`` files are loaded only with ``torch.load(weights_only=True,
mmap=True)``, which refuses pickles that would execute code. Nothing is materialised until asked for, so
converting a checkpoint bigger than RAM needs memory for one layer at a time.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from flexrun.errors import CheckpointError

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",  # where transformers >= 4.47 saves a checkpoint's chat template
    "chat_template.json",
)


class Checkpoint:
    """Tensors of a checkpoint directory by name, tolerating an added ``model.`` prefix or a missing first component."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            from safetensors import safe_open

            for f in files:
                try:
                    handle = safe_open(str(f), framework="pt")
                except Exception as exc:  # safetensors' own error class for a damaged or foreign file; OSError
                    raise CheckpointError(f"{f}: not a readable safetensors file ({exc})") from None
                self._open[f] = handle
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    self._where[key] = f
            self.kind = "safetensors"
        else:
            files = sorted(self.path.glob("pytorch_model*.bin")) or sorted(self.path.glob("*.bin"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors or pytorch_model*.bin weight files")
            for f in files:
                for key in self._load_bin(f):
                    self._where[key] = f
            self.kind = "bin"

    def _load_bin(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._open:
            try:
                self._open[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                # Legacy (non-zip) files cannot be memory-mapped; they are loaded whole, still without code.
                try:
                    self._open[f] = torch.load(f, map_location="cpu", weights_only=True)
                except Exception as exc:
                    raise CheckpointError(
                        f"{f}: refused to load ({exc.__class__.__name__}); only plain tensor pickles are accepted"
                    ) from None
            except Exception as exc:
                raise CheckpointError(
                    f"{f}: refused to load ({exc.__class__.__name__}); only plain tensor pickles are accepted"
                ) from None
        return self._open[f]

    def keys(self) -> list[str]:
        return list(self._where)

    def _resolve(self, name: str) -> str:
        # Base-model checkpoints (GPT2Model, BloomModel...) drop the wrapper's first component.
        bare = name.split(".", 1)[-1]
        for candidate in (name, "model." + name, name.removeprefix("model."), bare):
            if candidate in self._where:
                return candidate
        raise CheckpointError(f"{self.path}: tensor {name} not found in the checkpoint")

    def get(self, name: str) -> torch.Tensor:
        key = self._resolve(name)
        f = self._where[key]
        if self.kind == "safetensors":
            return self._open[f].get_tensor(key)
        return self._load_bin(f)[key]

    def has(self, name: str) -> bool:
        try:
            self._resolve(name)
        except CheckpointError:
            return False
        return True

    def hf_config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    def tokenizer_files(self) -> list[Path]:
        """The tokenizer's files, or nothing when the checkpoint has no tokenizer."""
        files = [self.path / f for f in TOKENIZER_FILES if (self.path / f).exists()]
        has_vocab = any(f.name in ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model") for f in files)
        return files if has_vocab else []

    def save_tokenizer(self, dest: Path) -> bool:
        """Copy the tokenizer's files and config.json into ``dest``; False when there is no tokenizer."""
        files = self.tokenizer_files()
        if not files:
            return False
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest / f.name)
        shutil.copy2(self.path / "config.json", dest / "config.json")
        return True


class CheckpointSource(Protocol):
    """What the converter reads: tensors by Hugging Face name, the config, the tokenizer."""

    def get(self, name: str) -> torch.Tensor: ...

    def has(self, name: str) -> bool: ...

    def hf_config(self) -> dict[str, Any]: ...

    def save_tokenizer(self, dest: Path) -> bool: ...


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """A checkpoint directory (safetensors or .bin) or a GGUF file."""
    from flexrun.weights.gguf import GgufCheckpoint, is_gguf

    return GgufCheckpoint(path) if is_gguf(path) else Checkpoint(path)
