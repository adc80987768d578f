"""One exception family. The CLI maps every ``FlexrunError`` to exit code 1 and one line on stderr."""

from __future__ import annotations


class FlexrunError(Exception):
    """A user-facing failure: bad model name, infeasible placement, bad input file, ..."""

    exit_code = 1


class UnknownModelError(FlexrunError):
    """A model name that is neither in the name table nor a checkpoint directory."""


class ConfigError(FlexrunError):
    """A config field or override that does not make sense."""


class CheckpointError(FlexrunError):
    """A checkpoint or tensor store that is missing, corrupted or unsupported."""


class PlacementError(FlexrunError):
    """A placement that is malformed or does not fit the tier budgets."""


class BudgetError(PlacementError):
    """A placement that needs more of a tier than its budget: ``need`` and ``have`` bytes on ``tier``."""

    def __init__(self, message: str, tier: str, need: int, have: int) -> None:
        super().__init__(message)
        self.tier = tier
        self.need = need
        self.have = have


class InputError(FlexrunError):
    """A bad prompt, input file or output file."""


class OfflineError(FlexrunError):
    """A download was needed but the model hub cannot be reached."""
