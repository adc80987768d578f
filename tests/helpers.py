"""Helpers the tests share: the CLI through click's test runner, placements from short strings, a model
saved and converted into a store, and the generate-job wrappers of the test_jobs_* files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.testing import CliRunner, Result

from flexrun.cli import cli
from flexrun.placement import Placement, Shares
from flexrun.weights.convert import convert_checkpoint
from flexrun.weights.store import TensorStore

if TYPE_CHECKING:
    from tests.hf_reference import OptCheckpoint


def run(*args: str, input: str | None = None, command: click.Command = cli) -> Result:
    """``flexrun ARGS`` (or another click ``command``) in this process; the result keeps stdout and stderr
    apart (``.stdout``, ``.stderr``) and together (``.output``)."""
    return CliRunner().invoke(command, list(args), input=input)


def place(
    weights: str = "host=100", cache: str = "host=100", acts: str = "host=100", b: int = 8, n: int = 1, **kw: Any
) -> Placement:
    """A placement from tier-share strings (``"host=40,disk=60"``), ``b`` x ``n`` micro-batches, and options."""
    return Placement(
        Shares.parse(weights), Shares.parse(cache), Shares.parse(acts), gpu_batch_size=b, num_gpu_batches=n, **kw
    )


def save_and_convert(model: Any, directory: Path, dtype: str | None = None) -> TensorStore:
    """Save the HF ``model`` as ``directory``/ckpt and convert it into the tensor store ``directory``/store."""
    model.save_pretrained(directory / "ckpt")
    return TensorStore(convert_checkpoint(directory / "ckpt", directory / "store", dtype=dtype, progress=False))


# ---- generate jobs (test_jobs_*.py) ---------------------------------------------------------------------
# The job checkpoint's vocabulary: the tiny tokenizer's 300 ids (bad-input messages name 0..299).
JOB_VOCAB = 300


def gen(ckpt: OptCheckpoint, stores: Path, tmp_path: Path, *args: str, input: str | None = None) -> Result:
    """``flexrun generate`` of ``ckpt`` with its stores in ``stores``: manual placement, micro-batches of 2, quiet."""
    base = ["generate", "-m", str(ckpt.path), "--store-dir", str(stores), "--offload-dir", str(tmp_path / "off")]
    # Few new tokens by default (a later --max-new-tokens wins): these tests are about the job, not the model.
    manual = ["--placement", "manual", "--gpu-batch-size", "2", "--quiet", "--max-new-tokens", "4"]
    return run(*base, *manual, *args, input=input)


def lines(path: Path) -> list[dict]:
    """The records of a JSONL file, every line one."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_input(path: Path, n: int, length: int = 3) -> Path:
    """n input_ids records of varying length (so the length order differs from the input order)."""
    rows = [{"id": f"p{k}", "input_ids": [4 + (k * 7 + j) % 200 for j in range(length + k % 4)]} for k in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
