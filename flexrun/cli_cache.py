"""``flexrun cache``: the converted stores in the store cache, their sizes and last use; removing them."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import click

from flexrun.cli_options import byte_size

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def age(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    m = _AGE.match(value.lower())
    if not m:
        raise click.BadParameter(f"{value!r}: give a number and a unit, e.g. 30d, 12h, 2w")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def _ago(seconds: float) -> str:
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return "just now"


def _table(stores: list[Any]) -> list[str]:
    from flexrun.units import format_bytes

    now = time.time()
    rows = [("NAME", "MODEL", "DTYPE", "COMPRESSION", "SIZE", "LAST USED", "SOURCE")]
    for s in stores:
        name = s.name if s.complete else f"{s.name} (incomplete)"
        used = _ago(now - s.last_used)
        rows.append((name, s.model, s.dtype, s.compression or "-", format_bytes(s.size), used, s.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]


store_dir_option = click.option(
    "--store-dir", type=click.Path(file_okay=False), help="The store cache (default: the cache dir's stores)."
)


@click.group("cache")
def cache_cmd() -> None:
    """The converted tensor stores cached for models you ran: list them, remove some, prune the rest."""


@cache_cmd.command("ls")
@store_dir_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per store.")
def ls_cmd(store_dir: str | None, as_json: bool) -> None:
    """List the cached stores, least recently used first, with their sizes and the total."""
    from flexrun.resolver.cache import list_stores, stores_root
    from flexrun.units import format_bytes

    root = stores_root(store_dir)
    stores = list_stores(root)
    if as_json:
        for s in stores:
            click.echo(json.dumps(s.to_dict()))
        return
    if not stores:
        click.echo(f"no stores in {root}", err=True)
        return
    for line in _table(stores):
        click.echo(line)
    click.echo(f"{len(stores)} stores, {format_bytes(sum(s.size for s in stores))} in {root}", err=True)


@cache_cmd.command("rm")
@click.argument("names", nargs=-1, required=True)
@store_dir_option
def rm_cmd(names: tuple[str, ...], store_dir: str | None) -> None:
    """Remove the stores NAMES (a store's name as `ls` shows it, or a model name: all its stores)."""
    from flexrun.resolver.cache import list_stores, match, remove, stores_root
    from flexrun.units import format_bytes

    stores = list_stores(stores_root(store_dir))
    chosen = {s.path: s for name in names for s in match(stores, name)}  # every name checked before any removal
    for s in chosen.values():
        remove(s)
        click.echo(f"removed {s.name} ({format_bytes(s.size)})")


@cache_cmd.command("prune")
@click.option("--older-than", callback=age, help="Remove stores not used for this long, e.g. 30d, 12h, 2w.")
@click.option(
    "--max-size", callback=byte_size, help="Then remove the least recently used until the rest fit, e.g. 20GiB."
)
@click.option("--dry-run", "-n", is_flag=True, help="Say what would be removed, remove nothing.")
@store_dir_option
def prune_cmd(older_than: float | None, max_size: int | None, dry_run: bool, store_dir: str | None) -> None:
    """Remove leftovers of interrupted conversions, and stores by age (--older-than) or down to a total
    size (--max-size), least recently used first."""
    from flexrun.resolver.cache import list_stores, remove, stores_root, to_prune
    from flexrun.units import format_bytes

    root = stores_root(store_dir)
    stores = list_stores(root)
    gone = to_prune(stores, older_than, max_size)
    for s in gone:
        if not dry_run:
            remove(s)
        click.echo(f"{'would remove' if dry_run else 'removed'} {s.name} ({format_bytes(s.size)})")
    kept = [s for s in stores if s not in gone]
    click.echo(
        f"{len(kept)} stores kept, {format_bytes(sum(s.size for s in kept))} in {root}; "
        f"{format_bytes(sum(s.size for s in gone))} {'to free' if dry_run else 'freed'}",
        err=True,
    )
