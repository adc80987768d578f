"""Model names, checkpoints and stores -> ``OptConfig`` and tensor stores: the one place a model is resolved.

``resolve()`` turns what a user typed (a table name with any ``org/`` prefix, a packaged model, a
checkpoint directory, a GGUF file or a tensor store) into a frozen config; ``ensure_store()`` gives the
tensor store the runtime reads, converting a checkpoint once into the store cache; ``model_source()`` gives
the config and tokenizer converting would use, for choices made before the store (its compression). This package sits
above ``policies`` (which map a config.json onto the fused layer) and ``weights`` (which read checkpoints
and write stores); nothing below it knows model names.
"""

from __future__ import annotations

from flexrun.resolver.configs import config_from_path, resolve
from flexrun.resolver.names import known_models
from flexrun.resolver.packaged import local_source
from flexrun.resolver.sources import ModelSource, model_source
from flexrun.resolver.stores import ensure_store

__all__ = ["ModelSource", "config_from_path", "ensure_store", "known_models", "local_source", "model_source", "resolve"]
