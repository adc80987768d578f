"""Architecture policies and the registry that matches a checkpoint to one."""

from __future__ import annotations

from typing import Any

from flexrun.config import DTYPE_BYTES, OptConfig
from flexrun.errors import CheckpointError, ConfigError
from flexrun.policies.base import Policy, TensorGetter

_REGISTRY: dict[str, Policy] = {}


def register(policy: Policy) -> Policy:
    """Add ``policy`` to the registry (last registration of a name wins, so tests can add toy policies)."""
    _REGISTRY[policy.name] = policy
    return policy


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def supported() -> list[str]:
    """Names of the registered policies."""
    return sorted(_REGISTRY)


def registered() -> list[Policy]:
    """The registered policies."""
    return list(_REGISTRY.values())


def _supported_line() -> str:
    archs = sorted(a for p in _REGISTRY.values() for a in p.architectures)
    return f"supported architectures: {', '.join(archs)}"


def policy_by_name(name: str) -> Policy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CheckpointError(f"no policy named {name!r}; {_supported_line()}") from None


def policy_for_hf_config(hf: dict[str, Any]) -> Policy:
    """The policy for a config.json: matched by ``architectures`` first, then by ``model_type``."""
    for arch in hf.get("architectures") or []:
        for policy in _REGISTRY.values():
            if arch in policy.architectures:
                return policy
    model_type = hf.get("model_type")
    for policy in _REGISTRY.values():
        if model_type in policy.model_types:
            return policy
    found = ", ".join(hf.get("architectures") or []) or f"model_type {model_type!r}"
    raise CheckpointError(f"unsupported architecture {found}; {_supported_line()}")


def _hf_dtype(hf: dict[str, Any]) -> str:
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float16"
    return dtype if dtype in DTYPE_BYTES else "float16"


def config_from_hf(hf: dict[str, Any], name: str) -> OptConfig:
    """An ``OptConfig`` from a Hugging Face config.json dict, through the architecture's policy. A field that
    is missing or of the wrong kind is a ConfigError naming config.json and the field, never a traceback."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{name}: config.json is a JSON {type(hf).__name__}, not an object")
    policy = policy_for_hf_config(hf)
    try:
        return policy.config_from_hf(hf, name=name, dtype=_hf_dtype(hf))
    except KeyError as exc:
        raise ConfigError(f"{name}: config.json has no {exc.args[0]!r} ({policy.name} needs it)") from None
    except (TypeError, ValueError, IndexError, ZeroDivisionError, AttributeError) as exc:
        raise ConfigError(f"{name}: config.json has a malformed field ({exc.__class__.__name__}: {exc})") from None


def policy_for_layer(layer: object) -> Policy:
    """The policy whose layer class is exactly ``type(layer)`` (subclasses do not match)."""
    cls = type(layer).__name__
    for policy in _REGISTRY.values():
        if cls in policy.layer_classes:
            return policy
    raise CheckpointError(f"no policy for layer class {cls}; {_supported_line()}")


def _register_builtin() -> None:
    from flexrun.policies.bert import BertPolicy, RobertaPolicy
    from flexrun.policies.bloom import BloomPolicy
    from flexrun.policies.gpt2 import Gpt2Policy
    from flexrun.policies.gpt_neo import GptNeoPolicy
    from flexrun.policies.gpt_neox import GptNeoxPolicy
    from flexrun.policies.gptj import GptjPolicy
    from flexrun.policies.llama import LlamaPolicy
    from flexrun.policies.mistral import MistralPolicy
    from flexrun.policies.mixtral import MixtralPolicy
    from flexrun.policies.opt import OptPolicy
    from flexrun.policies.qwen2 import Qwen2Policy
    from flexrun.policies.qwen2_moe import Qwen2MoePolicy

    for policy in (
        OptPolicy,
        Gpt2Policy,
        BloomPolicy,
        GptjPolicy,
        GptNeoPolicy,
        GptNeoxPolicy,
        LlamaPolicy,
        MistralPolicy,
        Qwen2Policy,
        MixtralPolicy,
        Qwen2MoePolicy,
        BertPolicy,
        RobertaPolicy,
    ):
        register(policy())


_register_builtin()

__all__ = [
    "Policy",
    "TensorGetter",
    "config_from_hf",
    "policy_by_name",
    "policy_for_hf_config",
    "policy_for_layer",
    "register",
    "registered",
    "supported",
    "unregister",
]
