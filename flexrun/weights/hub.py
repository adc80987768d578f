"""Checkpoints from the Hugging Face hub, when the machine is online."""

from __future__ import annotations

from pathlib import Path

from flexrun.errors import OfflineError


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
