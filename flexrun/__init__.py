"""flexrun: high-throughput offloading inference for large language models on one machine."""

from flexrun.config import OptConfig, resolve
from flexrun.errors import FlexrunError
from flexrun.placement import Placement, Shares

__all__ = ["FlexrunError", "OptConfig", "Placement", "Shares", "resolve"]
