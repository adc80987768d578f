"""GGUF files (llama.cpp's format) as a checkpoint: config, tensors and tokenizer through transformers.

transformers reads a GGUF file's metadata into a Hugging Face config and tokenizer, and knows how each
GGUF tensor name maps to a Hugging Face one (and how llama.cpp permuted LLaMA's Q and K rows). flexrun
uses those pieces to read the file one tensor at a time: each tensor is dequantized to float32 only when
the converter asks for it, so converting needs memory for one tensor, not for the whole model. A matrix
whose blocks map exactly onto a flexrun compressed format (``gguf_blocks``) can instead be read as that
format, never passing through float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexrun.errors import CheckpointError
from flexrun.paths import cache_dir
from flexrun.quant.formats import QuantSpec, QuantWeight, take_rows
from flexrun.weights import gguf_blocks

log = logging.getLogger(__name__)

_NEEDS = "reading GGUF files needs the gguf package and transformers with GGUF support: pip install 'flexrun[gguf]'"


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix.lower() == ".gguf"


def _cache_file(path: Path, what: str) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf-configs" / f"{path.stem}-{key}{what}.json"


def _cached(path: Path, what: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` for the GGUF file ``path``, cached as JSON per file: parsing a GGUF file's metadata
    means reading its whole vocabulary (seconds)."""
    cached = _cache_file(path, what)
    if cached.exists():
        return json.loads(cached.read_text())
    value = compute()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(value))
    except OSError as exc:  # a read-only cache only costs time
        log.warning("cannot cache GGUF metadata at %s: %s", cached, exc.strerror)
    return value


def gguf_hf_config(path: str | Path) -> dict[str, Any]:
    """The Hugging Face config.json dict transformers derives from a GGUF file's metadata (cached per file).
    The weights are dequantized to float32, which becomes the checkpoint's dtype."""

    def compute() -> dict[str, Any]:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
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
        return hf

    result: dict[str, Any] = _cached(Path(path), "", compute)
    return result


def native_compression(path: str | Path) -> QuantSpec | None:
    """The compression most of a GGUF file's layer matrices are already in, when it maps exactly onto a
    flexrun format (Q4_0/Q4_1/Q4_K: int4 g32, Q8_0: int8 g32); None for float files and other types
    (cached per file)."""

    def compute() -> list[Any]:
        try:
            from gguf import GGUFReader
        except ImportError:
            raise CheckpointError(_NEEDS) from None
        try:
            tensors = GGUFReader(str(path)).tensors
        except Exception as exc:  # a truncated or foreign file fails inside the parser in many ways
            raise CheckpointError(f"{path}: not a GGUF file ({exc.__class__.__name__}: {exc})") from None
        counts: dict[QuantSpec | None, int] = {}
        for t in tensors:
            if t.name.startswith("blk.") and len(t.shape) == 2:
                spec = gguf_blocks.SPECS.get(t.tensor_type.name)
                counts[spec] = counts.get(spec, 0) + int(t.n_elements)
        top = max(counts, key=lambda s: counts[s]) if counts else None
        return [top.kind, top.group_size] if top else []

    found = _cached(Path(path), "-native", compute)
    return QuantSpec(found[0], found[1]) if found else None


# A matrix bigger than this in float32 is read a chunk of rows at a time into the store's dtype.
WHOLE_MAX = 64 << 20
CHUNK = 8 << 20


class GgufCheckpoint:
    """A GGUF file's tensors by their Hugging Face names, dequantized to float32 one at a time (the big
    tables straight into ``dtype``, the store's, which the converter sets)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.dtype = torch.float32
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
        """Tensor ``name``: in float32, or, for a matrix of more than ``WHOLE_MAX`` bytes in float32 whose
        processing reorders rows only (an embedding table, an untied head), in ``self.dtype``, dequantized a
        chunk of rows at a time into it (a float32 copy of such a table would not fit a small budget)."""
        from gguf import dequantize

        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name} not found in the GGUF file")
        t = self._tensors[self._where[name]]
        if len(t.shape) == 2 and 4 * int(t.n_elements) > WHOLE_MAX:
            big = self._get_by_rows(t)
            if big is not None:
                return big
        weights = dequantize(t.data, t.tensor_type)
        result = self._processor.process(weights=weights, name=t.name, tensor_key_mapping={}, parsed_parameters={})
        return torch.from_numpy(result.weights.copy()).float()

    def _get_by_rows(self, t: Any) -> torch.Tensor | None:
        """Matrix ``t`` in ``self.dtype``, its rows dequantized ``CHUNK`` float32 bytes at a time in the order
        transformers' processing puts them; None when that processing is more than a reordering."""
        from gguf import dequantize

        k, n = (int(d) for d in t.shape)  # GGUF lists dimensions innermost first
        order = self._row_order(t.name, n)
        if order is None:
            return None
        out = torch.empty(n, k, dtype=self.dtype)
        step = max(1, CHUNK // (4 * k))
        for start in range(0, n, step):
            rows = order[start : start + step].numpy()
            chunk = dequantize(np.asarray(t.data[rows]), t.tensor_type).reshape(len(rows), k)
            out[start : start + len(rows)] = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
        return out

    def get_packed(self, name: str, spec: QuantSpec) -> QuantWeight | None:
        """Matrix ``name`` read from its GGUF blocks as compressed in ``spec``, or None when its blocks do
        not map exactly onto ``spec`` (another GGML type, a float tensor) or when transformers' processing
        of the tensor is more than a reordering of its rows (LLaMA's Q and K rows are un-permuted)."""
        t = self._tensors.get(self._where.get(name, ""))
        if t is None or gguf_blocks.SPECS.get(t.tensor_type.name) != spec or len(t.shape) != 2:
            return None
        k, n = (int(d) for d in t.shape)  # GGUF lists dimensions innermost first
        order = self._row_order(t.name, n)
        packed = gguf_blocks.to_quant(t.data, t.tensor_type.name, (n, k)) if order is not None else None
        if packed is None or order is None or torch.equal(order, torch.arange(n)):
            return packed
        return take_rows(packed, order)

    def _row_order(self, gguf_name: str, rows: int) -> torch.Tensor | None:
        """Where transformers' processing of tensor ``gguf_name`` takes each of its rows from (an index
        per row), or None when it does more than reorder them."""
        ids = np.arange(rows, dtype=np.float64).reshape(rows, 1)
        out = self._processor.process(weights=ids, name=gguf_name, tensor_key_mapping={}, parsed_parameters={}).weights
        if out is None or getattr(out, "shape", None) != (rows, 1):
            return None
        order = np.asarray(out).reshape(rows)
        if not np.array_equal(np.sort(order), ids.reshape(rows)):
            return None
        return torch.from_numpy(order.astype(np.int64))

    def has(self, name: str) -> bool:
        return name in self._where

    def hf_config(self) -> dict[str, Any]:
        return dict(self._hf)

    def save_tokenizer(self, dest: Path) -> bool:
        """Write the tokenizer (with its chat template) and config.json into ``dest``."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as exc:  # transformers fails on incomplete tokenizer metadata in many ways
            raise CheckpointError(
                f"{self.path}: transformers cannot build its tokenizer ({exc.__class__.__name__}: {exc})"
            ) from None
        dest.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(dest))
        (dest / "config.json").write_text(json.dumps(self._hf, indent=1))
        return True
