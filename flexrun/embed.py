"""The ``embed`` job: texts or token ids -> an encoder model (BERT, RoBERTa) -> JSONL embeddings."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexrun.errors import InputError
from flexrun.generation import load_tokenizer
from flexrun.placement import Placement, Shares
from flexrun.runtime.encoder import Encoder, EncodeStats
from flexrun.runtime.tiers import Budgets
from flexrun.textio import PromptRecord, read_prompts
from flexrun.weights.store import TensorStore

TEXT_KEYS = ("text", "prompt")


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


def run_embed(
    kw: dict[str, Any],
    texts: tuple[str, ...],
    input_file: str | None,
    output: str | None,
    opts: EmbedOptions,
) -> tuple[TensorStore, Placement, EncodeStats, str]:
    """Embed every record and write one JSONL row each (in input order) to ``output`` or stdout.

    ``kw`` holds the CLI's model and placement options. Returns the store, the placement, the stats and
    the pooling used, for the summary.
    """
    from flexrun.weights.convert import ensure_store

    use_stdin = input_file == "-" or (not texts and not input_file and not sys.stdin.isatty())
    hint = "give --text TEXT, --input FILE.jsonl, or JSONL on stdin"
    records = read_prompts(texts, input_file, sys.stdin if use_stdin else None, TEXT_KEYS, hint)
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
    longest = max(len(seq) for seq in ids)
    out_stream = None
    if output:
        try:
            out_stream = Path(output).open("w", encoding="utf-8")  # noqa: SIM115 - closed in the finally below
        except OSError as exc:
            raise InputError(f"cannot write {output}: {exc.strerror}") from None
    try:
        with Encoder(store, placement, longest, budgets=budgets, offload_dir=kw["offload_dir"]) as encoder:
            vectors, stats = encoder.encode(ids, pooling)
        stream = out_stream or sys.stdout
        for rec, seq, vec in zip(records, ids, vectors, strict=True):
            stream.write(json.dumps(_row(rec, seq, vec, opts)) + "\n")
        stream.flush()
    finally:
        if out_stream is not None:
            out_stream.close()
    return store, placement, stats, pooling


def summary_text(store: TensorStore, placement: Placement, stats: EncodeStats, pooling: str) -> str:
    from flexrun.units import format_bytes

    cfg = store.config
    io = {True: "O_DIRECT", False: "buffered (page cache may flatter it)", None: "none"}[stats.direct_io]
    planned = {tier: sum(v.values()) for tier, v in stats.planned.items()}
    return "\n".join(
        [
            f"model: {cfg.name} ({cfg.arch}, {cfg.dtype}, {format_bytes(cfg.model_bytes())}); pooling: {pooling}",
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
