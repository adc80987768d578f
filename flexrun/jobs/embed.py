"""The ``embed`` job: texts or token ids -> an encoder model (BERT, RoBERTa) -> JSONL embeddings."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from flexrun.config import OptConfig
from flexrun.errors import InputError
from flexrun.jobs.options import EngineOptions
from flexrun.jobs.prompts import load_tokenizer
from flexrun.jobs.results import RowWriter
from flexrun.jobs.textio import PromptRecord, read_prompts
from flexrun.jobs.tp import announce, tensor_parallel
from flexrun.parallel import current
from flexrun.placement import Placement
from flexrun.runtime.encoder import Encoder
from flexrun.runtime.stats import RunStats
from flexrun.runtime.tiers import compute_device

TEXT_KEYS = ("text", "prompt")

#: Sequences sorted by length together (rounded up to whole blocks): more saves padding, fewer bounds the
#: results held back to keep input order. With --all-tokens (a (len, h) state per row) it is one block.
SORT_WINDOW = 1024


@dataclass(frozen=True)
class EmbedOptions:
    """What ``flexrun embed`` was asked to embed, what to compute and where to write it."""

    texts: tuple[str, ...] = ()
    input_file: str | None = None  # JSONL records, "-" for stdin
    output: str | None = None  # None: stdout
    pooling: str | None = None  # None: the pooler when the model has one, else cls
    all_tokens: bool = False  # every token's last hidden state instead of one vector
    normalize: bool = False  # scale each vector to unit L2 norm
    truncate: bool = False  # cut over-long inputs to the model's positions instead of failing


@dataclass(frozen=True)
class EmbedResult:
    cfg: OptConfig  # as run: its compute dtype resolved
    placement: Placement
    stats: RunStats
    pooling: str


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


def _row(rec: PromptRecord, seq: list[int], vec: torch.Tensor, job: EmbedOptions) -> dict[str, Any]:
    if job.normalize:
        vec = torch.nn.functional.normalize(vec, dim=-1)
    row: dict[str, Any] = {"id": rec.id, "tokens": len(seq)}
    if job.all_tokens:
        row["input_ids"] = seq
        row["last_hidden_state"] = vec.tolist()
    else:
        row["embedding"] = vec.tolist()
    return row


def encoder_placement(opts: EngineOptions) -> Placement:
    """The encoder's placement: the options as given (an encoder is never planned), host=100 where left out.
    An encoder keeps no KV cache, so a cache placement is refused rather than ignored."""
    request = opts.placement
    if request.cache is not None or request.compress_cache:
        raise InputError("an encoder keeps no KV cache: drop the cache placement")
    return request.manual()


@tensor_parallel
def run_embed(
    opts: EngineOptions, job: EmbedOptions, stdin: IO[str] | None = None, stdout: IO[str] | None = None
) -> EmbedResult:
    """Embed every record and write one JSONL row each, in input order, to ``job.output`` or ``stdout``.

    Rows are written as their blocks finish; memory holds one sort window of them (SORT_WINDOW
    sequences, one block with ``all_tokens``). An output file is written beside and put in place at the
    end, so a failed job leaves an existing file as it was.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    use_stdin = job.input_file == "-" or (not job.texts and not job.input_file and not stdin.isatty())
    hint = "give --text TEXT, --input FILE.jsonl, or JSONL on stdin"
    records = read_prompts(job.texts, job.input_file, stdin if use_stdin else None, TEXT_KEYS, hint)
    writer = RowWriter(Path(job.output) if job.output else None, stdout, job.input_file)
    try:
        result = _embed(opts, job, records, writer)
        writer.commit()
    finally:
        writer.discard()
    return result


def _embed(opts: EngineOptions, job: EmbedOptions, records: list[PromptRecord], writer: RowWriter) -> EmbedResult:
    model = opts.model.model
    placement = encoder_placement(opts)
    store = opts.model.open_store("embed")
    placement = dataclasses.replace(placement, compress_weight=store.weight_compression)
    cfg = opts.model.run_config(store, compute_device())
    pooling = "none" if job.all_tokens else job.pooling or ("pooler" if cfg.pooler else "cls")
    if pooling == "pooler" and not cfg.pooler:
        raise InputError(f"{model} has no pooler layer; use --pooling cls or --pooling mean")
    ids = _tokenize(records, load_tokenizer(store), model, cfg.max_seq_len, job.truncate)
    # Finished results wait here until every earlier record's are in, then go out in input order.
    pending: dict[int, torch.Tensor] = {}
    next_row = 0

    def on_block(members: list[int], outputs: list[torch.Tensor]) -> None:
        nonlocal next_row
        pending.update(zip(members, outputs, strict=True))
        rows = []
        while next_row in pending:
            rows.append(_row(records[next_row], ids[next_row], pending.pop(next_row), job))
            next_row += 1
        writer.write(rows)

    window = 1 if job.all_tokens else SORT_WINDOW
    encoder = Encoder(
        store,
        placement,
        max(map(len, ids)),
        budgets=opts.budgets,
        offload_dir=opts.offload_dir,
        compute_dtype=cfg.run_dtype,
        tp=current(),
    )
    try:
        announce(encoder, opts)  # the other tensor-parallel ranks build the same encoder
    except BaseException:
        encoder.close()
        raise
    with encoder:
        stats = encoder.encode_blocks(ids, pooling, on_block, sort_window=window)
    return EmbedResult(encoder.cfg, placement, stats, pooling)
