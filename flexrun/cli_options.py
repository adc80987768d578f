"""Click option callbacks shared by the commands: validated values, or a usage error (exit 2)."""

from __future__ import annotations

from typing import Any

import click

from flexrun.errors import FlexrunError


def positive_int(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise click.BadParameter(f"must be >= 1, got {value}")
    return value


def non_negative_int(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value is not None and value < 0:
        raise click.BadParameter(f"must be >= 0, got {value}")
    return value


def byte_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from flexrun.units import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def tier_shares(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    from flexrun.placement import Shares

    if value is None:
        return None
    try:
        return Shares.parse(value)
    except FlexrunError as exc:
        raise click.BadParameter(str(exc)) from None


def hardware_spec(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    from flexrun.costmodel.hardware import load_hardware

    if value is None:
        return None
    try:
        return load_hardware(value)
    except FlexrunError as exc:
        raise click.BadParameter(str(exc)) from None
