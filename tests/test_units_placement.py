from __future__ import annotations

import pytest

from flexrun.errors import PlacementError
from flexrun.placement import Placement, Shares
from flexrun.units import format_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GiB", 8 * 2**30), ("8G", 8 * 2**30), ("500MB", 500 * 10**6), ("1.5 GiB", 3 * 2**29), ("4096", 4096)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "8 parsecs", "-1G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_format_bytes() -> None:
    assert format_bytes(324.2 * 2**30) == "324.2 GiB"
    # A suggested budget must be enough: rounded up, never down.
    assert format_bytes(5.24 * 2**20) == "5.2 MiB" and format_bytes(5.24 * 2**20, round_up=True) == "5.3 MiB"
    assert parse_size(format_bytes(777_777, round_up=True).replace(" ", "")) >= 777_777
    assert format_bytes(512) == "512 B"


def test_shares_parse_and_aliases() -> None:
    assert Shares.parse("host=40,disk=60") == Shares(device=0, host=0.4, disk=0.6)
    assert Shares.parse("gpu=20, cpu=80") == Shares(device=0.2, host=0.8, disk=0)
    assert Shares.parse("host=40,disk=60").spec() == "host=40,disk=60"


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("host=40", "add up to 100"),
        ("ram=100", "TIER=PERCENT"),
        ("host=x", "not a number"),
        ("host=140,disk=-40", "0..100"),
    ],
)
def test_shares_parse_errors(text: str, msg: str) -> None:
    with pytest.raises(PlacementError, match=msg):
        Shares.parse(text)


@pytest.mark.parametrize(
    ("shares", "n", "expected"),
    [
        (Shares(0, 0.4, 0.6), 10, ["host"] * 4 + ["disk"] * 6),
        (Shares(0.2, 0.8, 0), 5, ["device"] + ["host"] * 4),
        (Shares(0, 0, 1), 3, ["disk"] * 3),
        (Shares(0, 0.5, 0.5), 3, ["host", "disk", "disk"]),
    ],
)
def test_split_along_stack(shares: Shares, n: int, expected: list[str]) -> None:
    assert shares.split(n) == expected


def test_placement_validation_and_block_size() -> None:
    p = Placement(gpu_batch_size=8, num_gpu_batches=3)
    assert p.block_size == 24
    with pytest.raises(PlacementError, match="batch sizes"):
        Placement(gpu_batch_size=0)
