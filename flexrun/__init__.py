"""flexrun: high-throughput offloading inference for large language models on one machine."""

from typing import Any

from flexrun.config import OptConfig
from flexrun.errors import FlexrunError
from flexrun.placement import Placement, Shares

__all__ = ["FlexrunError", "OptConfig", "Placement", "Shares", "resolve"]


def __getattr__(name: str) -> Any:
    # ``resolve`` needs the policies and torch; importing flexrun (as the CLI does for --help) does not.
    if name == "resolve":
        from flexrun.resolver import resolve

        return resolve
    raise AttributeError(f"module 'flexrun' has no attribute {name!r}")
