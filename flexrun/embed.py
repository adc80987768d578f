"""The ``embed`` job: texts or token ids -> an encoder model (BERT, RoBERTa) -> JSONL embeddings."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from flexrun.config import OptConfig
from flexrun.errors import InputError
from flexrun.generation import load_tokenizer
from flexrun.placement import Placement, Shares
from flexrun.results import check_output
from flexrun.runtime.encoder import Encoder, EncodeStats
from flexrun.runtime.tiers import Budgets
from flexrun.textio import PromptRecord, read_prompts

TEXT_KEYS = ("text", "prompt")

#: Sequences sorted by length together (rounded up to whole blocks): more saves padding, fewer bounds the
#: results held back to keep input order. With --all-tokens (a (len, h) state per row) it is one block.
SORT_WINDOW = 1024


@dataclass(frozen=True)
class EmbedOptions:
    """What to compute and how to write it."""

    pooling: str | None = None  # None: the pooler when the model has one, else cls
    all_tokens: bool = False  # every token's last hidden state instead of one vector
    normalize: bool = False  # scale each vector to unit L2 norm
    truncate: bool = False  # cut over-long inputs to the model's positions instead of failing


def _tokenize(records: list[PromptRecord], tokenizer: Any, model: str, limit: int, truncate: bool) -> list[list[int]]:
    ids = []
    for r in records:
        if r.input_ids is not None:
            seq = list(r.input_ids)
        elif tokenizer is None:
            raise InputError(f'{model} has no tokenizer: give "input_ids" records instead of text')
        else:
            seq = tokenizer(r.prompt, truncation=truncate, max_length=limit if truncate else None)["input_ids"]
        if not seq:
            raise InputError(f"record {r.id} has no tokens")
        if len(seq) > limit:
            if not truncate:
                raise InputError(
                    f"record {r.id} has {len(seq)} tokens, over the model's limit of {limit}; "
                    "shorten it or pass --truncate"
                )
            seq = seq[:limit]
        ids.append(seq)
    return ids


def _row(rec: PromptRecord, seq: list[int], vec: torch.Tensor, opts: EmbedOptions) -> dict[str, Any]:
    if opts.normalize:
        vec = torch.nn.functional.normalize(vec, dim=-1)
    row: dict[str, Any] = {"id": rec.id, "tokens": len(seq)}
    if opts.all_tokens:
        row["input_ids"] = seq
        row["last_hidden_state"] = vec.tolist()
    else:
        row["embedding"] = vec.tolist()
    return row


class RowWriter:
    """JSONL rows to ``stdout``, or to a temporary file beside ``path`` that replaces it only on ``commit``:
    until then an existing file is untouched, and ``discard`` leaves things as they were."""

    def __init__(self, path: Path | None, stdout: IO[str], input_file: str | None) -> None:
        self.path = path
        self.stdout = stdout
        self.file: IO[str] | None = None
        self.tmp: Path | None = None
        self.committed = False
        if path is None:
            self.created = False
            return
        self.created = not path.exists()  # then an empty file left by a failed job is removed
        check_output(path, input_file)  # refuses the input file itself and an unwritable path, early
        self.target = path.resolve()  # through a symlink: the file it points to is replaced, not the link
        tmp = self.target.with_name(f".{self.target.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any file
        except OSError as exc:
            self.discard()
            raise InputError(f"cannot write {path}: cannot create {tmp.name} beside it: {exc.strerror}") from None
        self.tmp = tmp
        self.file = os.fdopen(fd, "w", encoding="utf-8")
        if not self.created:
            shutil.copymode(self.target, tmp)  # the replaced file keeps its permissions

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Write rows and flush them: to stdout they are out; to a file they wait for ``commit``."""
        if not rows:
            return
        out = self.file or self.stdout
        try:
            out.write("".join(json.dumps(row) + "\n" for row in rows))
            out.flush()
        except OSError as exc:
            raise InputError(f"cannot write {self.path or 'stdout'}: {exc.strerror}") from None

    def commit(self) -> None:
        """Put the finished file in place of the output, atomically: a reader sees the old or the new one."""
        if self.file is None or self.tmp is None:
            return
        try:
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.target)
        except OSError as exc:
            raise InputError(f"cannot write {self.path}: {exc.strerror}") from None
        self.tmp = None
        self.committed = True

    def discard(self) -> None:
        """Drop an unfinished file (a no-op after ``commit``); an output this job created empty goes too."""
        if self.file is not None:
            self.file.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None
        path = self.path
        if self.created and not self.committed and path is not None and path.is_file() and not path.stat().st_size:
            path.unlink()


def run_embed(
    kw: dict[str, Any],
    texts: tuple[str, ...],
    input_file: str | None,
    output: str | None,
    opts: EmbedOptions,
    stdin: IO[str],
    stdout: IO[str],
) -> tuple[OptConfig, Placement, EncodeStats, str]:
    """Embed every record and write one JSONL row each, in input order, to ``output`` or ``stdout``.

    Rows are written as their blocks finish; memory holds one sort window of them (SORT_WINDOW
    sequences, one block with ``all_tokens``). An ``output`` file is written beside and put in place at
    the end, so a failed job leaves an existing file as it was. ``kw`` holds the CLI's model and placement
    options. Returns the config run (its compute dtype resolved), the placement, the stats and the pooling
    used, for the summary.
    """
    use_stdin = input_file == "-" or (not texts and not input_file and not stdin.isatty())
    hint = "give --text TEXT, --input FILE.jsonl, or JSONL on stdin"
    records = read_prompts(texts, input_file, stdin if use_stdin else None, TEXT_KEYS, hint)
    writer = RowWriter(Path(output) if output else None, stdout, input_file)
    try:
        result = _embed(kw, records, opts, writer)
        writer.commit()
    finally:
        writer.discard()
    return result


def _embed(
    kw: dict[str, Any], records: list[PromptRecord], opts: EmbedOptions, writer: RowWriter
) -> tuple[OptConfig, Placement, EncodeStats, str]:
    from flexrun.weights.convert import ensure_store

    store = ensure_store(
        kw["model"], dtype=kw["dtype"], dummy=kw["dummy_weights"], store_root=kw["store_dir"], task="embed"
    )
    cfg = store.config
    pooling = "none" if opts.all_tokens else opts.pooling or ("pooler" if cfg.pooler else "cls")
    if pooling == "pooler" and not cfg.pooler:
        raise InputError(f"{kw['model']} has no pooler layer; use --pooling cls or --pooling mean")
    ids = _tokenize(records, load_tokenizer(store), kw["model"], cfg.max_seq_len, opts.truncate)
    placement = Placement(
        weights=kw["weights"] or Shares(),
        activations=kw["activations"] or Shares(),
        gpu_batch_size=kw["gpu_batch_size"],
        num_gpu_batches=kw["num_gpu_batches"],
        overlap=kw["overlap"],
    )
    budgets = Budgets(device=kw["device_mem"], host=kw["host_mem"], disk=kw["disk_mem"])
    # Finished results wait here until every earlier record's are in, then go out in input order.
    pending: dict[int, torch.Tensor] = {}
    next_row = 0

    def on_block(members: list[int], outputs: list[torch.Tensor]) -> None:
        nonlocal next_row
        pending.update(zip(members, outputs, strict=True))
        rows = []
        while next_row in pending:
            rows.append(_row(records[next_row], ids[next_row], pending.pop(next_row), opts))
            next_row += 1
        writer.write(rows)

    window = 1 if opts.all_tokens else SORT_WINDOW
    encoder = Encoder(
        store,
        placement,
        max(map(len, ids)),
        budgets=budgets,
        offload_dir=kw["offload_dir"],
        compute_dtype=kw.get("compute_dtype"),
    )
    with encoder:
        stats = encoder.encode_blocks(ids, pooling, on_block, sort_window=window)
    return encoder.cfg, placement, stats, pooling


def summary_text(cfg: OptConfig, placement: Placement, stats: EncodeStats, pooling: str) -> str:
    from flexrun.report import computed_in
    from flexrun.units import format_bytes

    io = {True: "O_DIRECT", False: "buffered (page cache may flatter it)", None: "none"}[stats.direct_io]
    planned = {tier: sum(v.values()) for tier, v in stats.planned.items()}
    return "\n".join(
        [
            f"model: {cfg.name} ({cfg.arch}, {cfg.dtype}{computed_in(cfg)}, {format_bytes(cfg.model_bytes())}); "
            f"pooling: {pooling}",
            # An encoder keeps no KV cache: its placement is the weights, the activations and the batching.
            f"placement: weights {placement.weights.spec()} | activations {placement.activations.spec()} | "
            f"batch {placement.gpu_batch_size} x {placement.num_gpu_batches}"
            + ("" if placement.overlap else " | no-overlap"),
            f"sequences: {stats.sequences} in {stats.blocks} block(s), {stats.tokens} tokens "
            f"({stats.padded_tokens} with padding)",
            f"latency: {stats.seconds:.3f} s  throughput: {stats.tokens_per_s:.2f} token/s",
            f"disk read: {format_bytes(stats.disk_bytes_read)} ({io})",
            "planned memory: " + ", ".join(f"{tier} {format_bytes(b)}" for tier, b in planned.items() if b),
            f"peak resident memory (measured): {format_bytes(stats.peak_rss)}",
        ]
    )
