"""Model names, checkpoint directories, GGUF files and tensor stores -> a frozen ``OptConfig``."""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

from flexrun.config import OptConfig
from flexrun.errors import ConfigError, UnknownModelError
from flexrun.policies import config_from_hf
from flexrun.resolver.names import MODEL_TABLE, known_models
from flexrun.resolver.packaged import PACKAGED_MODELS, local_source
from flexrun.weights.gguf import gguf_hf_config, is_gguf


def _short_name(name: str) -> str:
    return name.strip().rstrip("/").split("/")[-1].lower()


def _apply_overrides(config: OptConfig, overrides: dict[str, Any]) -> OptConfig:
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(OptConfig)} - {"extra"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(config, **overrides)


def resolve(name: str, **overrides: Any) -> OptConfig:
    """The config for ``name``: a table name (any ``org/`` prefix, any case) or a checkpoint directory.

    ``overrides`` replace fields (e.g. ``dtype="bfloat16"``); an unknown field raises ConfigError.
    """
    path = local_source(name)
    if path is not None:
        return _apply_overrides(config_from_path(path), overrides)
    key = _short_name(name)
    if key not in MODEL_TABLE:
        names = known_models() + sorted(PACKAGED_MODELS)
        close = difflib.get_close_matches(key, names, n=4, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else f"; known: {', '.join(names)}"
        raise UnknownModelError(f"unknown model {name!r}{hint} (or pass a local checkpoint directory)")
    return _apply_overrides(OptConfig(name=key, **MODEL_TABLE[key]), overrides)


def config_from_path(path: Path) -> OptConfig:
    """Read a checkpoint directory's (or a tensor store's) config.json, or a GGUF file's metadata."""
    if is_gguf(path):
        return config_from_hf(gguf_hf_config(path), name=path.stem)
    if path.is_dir():
        if (path / "index.json").exists() and not (path / "config.json").exists():
            meta = json.loads((path / "index.json").read_text())
            return OptConfig(**meta["config"])
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise UnknownModelError(f"{path} is a directory but has no config.json")
        try:
            hf = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cfg_file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return config_from_hf(hf, name=path.name)
    raise UnknownModelError(
        f"{path} is not a checkpoint (expected a folder with config.json, a tensor store or a .gguf file)"
    )
