"""GGUF files (llama.cpp's format) as a checkpoint: config, tensors and tokenizer through transformers.

transformers reads a GGUF file's metadata into a Hugging Face config and tokenizer, and knows how each
GGUF tensor name maps to a Hugging Face one (and how llama.cpp permuted LLaMA's Q and K rows). flexrun
uses those pieces to read the file one tensor at a time: each tensor is dequantized to float32 only when
the converter asks for it, so converting needs memory for one tensor, not for the whole model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from flexrun.errors import CheckpointError
from flexrun.paths import cache_dir

log = logging.getLogger(__name__)

_NEEDS = "reading GGUF files needs the gguf package and transformers with GGUF support: pip install 'flexrun[gguf]'"


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix.lower() == ".gguf"


def _config_cache(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf-configs" / f"{path.stem}-{key}.json"


def gguf_hf_config(path: str | Path) -> dict[str, Any]:
    """The Hugging Face config.json dict transformers derives from a GGUF file's metadata.

    Parsing the metadata means reading the whole vocabulary (seconds), so the result is cached per file.
    The weights are dequantized to float32, which becomes the checkpoint's dtype.
    """
    path = Path(path)
    cached = _config_cache(path)
    if cached.exists():
        return json.loads(cached.read_text())
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError:
        raise CheckpointError(_NEEDS) from None
    except Exception as exc:  # a truncated or foreign file fails inside the parser in many ways
        raise CheckpointError(
            f"{path}: not a GGUF model transformers can read ({exc.__class__.__name__}: {exc})"
        ) from None
    hf = config.to_dict()
    hf["architectures"] = hf.get("architectures") or []
    hf["torch_dtype"] = "float32"
    hf.pop("dtype", None)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(hf))
    except OSError as exc:  # a read-only cache only costs time
        log.warning("cannot cache the GGUF config at %s: %s", cached, exc.strerror)
    return hf


class GgufCheckpoint:
    """A GGUF file's tensors by their Hugging Face names, dequantized to float32 one at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._hf = gguf_hf_config(self.path)
        try:
            from gguf import GGUFReader
            from transformers import AutoConfig, AutoModelForCausalLM
            from transformers.modeling_gguf_pytorch_utils import (
                TENSOR_PROCESSORS,
                TensorProcessor,
                get_gguf_hf_weights_map,
                read_field,
            )
        except ImportError:
            raise CheckpointError(_NEEDS) from None
        self._reader = GGUFReader(str(self.path))
        arch = read_field(self._reader, "general.architecture")[0]
        config = AutoConfig.for_model(**{k: v for k, v in self._hf.items() if k != "torch_dtype"})
        # The name map comes from the model's parameter names; a model on the meta device costs nothing.
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self._hf)
        gguf_to_hf = get_gguf_hf_weights_map(skeleton, self._processor)
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._where = {hf: g for g, hf in gguf_to_hf.items() if g in self._tensors}

    def get(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name} not found in the GGUF file")
        t = self._tensors[self._where[name]]
        weights = dequantize(t.data, t.tensor_type)
        result = self._processor.process(weights=weights, name=t.name, tensor_key_mapping={}, parsed_parameters={})
        return torch.from_numpy(result.weights.copy()).float()

    def has(self, name: str) -> bool:
        return name in self._where

    def hf_config(self) -> dict[str, Any]:
        return dict(self._hf)

    def save_tokenizer(self, dest: Path) -> bool:
        """Write the tokenizer (with its chat template) and config.json into ``dest``."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        dest.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(dest))
        (dest / "config.json").write_text(json.dumps(self._hf, indent=1))
        return True
