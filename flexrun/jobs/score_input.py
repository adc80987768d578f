"""What ``flexrun score`` reads: JSONL records of a context and a continuation, or of a text whose perplexity
is wanted, as text or token ids; turned into scoring requests (a text into windows of the model's context)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flexrun.config import OptConfig
from flexrun.errors import InputError
from flexrun.jobs.textio import PromptRecord, _check_unicode, _lines, _parse_json_line
from flexrun.runtime.packing import ScoreRequest
from flexrun.runtime.stack import token_problem

Tokens = str | list[int]


@dataclass
class ScoreRecord(PromptRecord):
    """One input record: ``context`` and ``continuation``, or ``text`` (rolling perplexity)."""

    context: Tokens | None = None
    continuation: Tokens | None = None
    text: Tokens | None = None


@dataclass
class Scoring:
    """A record's requests (one, or a text's windows) and the tokens it scores."""

    record: ScoreRecord
    requests: list[ScoreRequest]

    @property
    def tokens(self) -> int:
        return sum(len(r.continuation) for r in self.requests)


def _field(obj: dict[str, Any], key: str, where: str) -> Tokens | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        _check_unicode(value, f'{where}: "{key}"')
        return value
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise InputError(f'{where}: "{key}" must be a string or a list of token ids')


def _record(obj: Any, where: str, lineno: int) -> ScoreRecord:
    if not isinstance(obj, dict):
        raise InputError(f'{where}: expected a JSON object with "context" and "continuation", or "text"')
    rid = obj.get("id", lineno)
    if isinstance(rid, (dict, list)) or rid is None or (isinstance(rid, float) and not math.isfinite(rid)):
        raise InputError(f'{where}: "id" must be a string or a finite number')
    if isinstance(rid, str):
        _check_unicode(rid, f'{where}: "id"')
    context, continuation = _field(obj, "context", where), _field(obj, "continuation", where)
    text = _field(obj, "text", where)
    if text is not None:
        if context is not None or continuation is not None:
            raise InputError(f'{where}: give "text" (perplexity) or "context" and "continuation", not both')
        if not text:
            raise InputError(f'{where}: "text" is empty')
    elif context is None:
        what = '"continuation" but no "context"' if continuation is not None else 'no "context"'
        raise InputError(f'{where}: record has {what} (or "text" for perplexity)')
    elif continuation is None:
        raise InputError(f'{where}: record has "context" but no "continuation"')
    elif not continuation:
        raise InputError(f'{where}: "continuation" is empty: there is nothing to score')
    return ScoreRecord(id=rid, where=where, context=context, continuation=continuation, text=text)


def read_records(input_file: str | None, stdin: IO[str] | None) -> list[ScoreRecord]:
    """Records from a JSONL file (``-`` or None: ``stdin``); a bad line is one InputError naming it."""
    if input_file and input_file != "-":
        path = Path(input_file)
        try:
            with path.open(encoding="utf-8", errors="surrogateescape") as f:
                return _read(f, str(path))
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None
    if stdin is None:
        raise InputError("no records: give --input FILE.jsonl, or JSONL on stdin")
    buffer = getattr(stdin, "buffer", None)
    if buffer is None:
        return _read(stdin, "<stdin>")
    wrapper = io.TextIOWrapper(buffer, encoding="utf-8", errors="surrogateescape")
    try:
        return _read(wrapper, "<stdin>")
    finally:
        wrapper.detach()


def _read(stream: IO[str], name: str) -> list[ScoreRecord]:
    records: list[ScoreRecord] = []
    for lineno, line in _lines(stream, name):
        if lineno == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        record = _record(_parse_json_line(line, f"{name}:{lineno}"), f"{name}:{lineno}", lineno)
        record.index = len(records)
        records.append(record)
    if not records:
        raise InputError(f"{name}: no records (JSONL of {{context, continuation}} or {{text}})")
    return records


def rolling_windows(tokens: list[int], prefix: int, size: int) -> list[ScoreRequest]:
    """(context, continuation) requests that together score every token of ``tokens`` once: the first
    window after ``prefix`` alone, each next one predicting up to ``size`` tokens after as many earlier
    tokens as fit in ``size`` (lm-evaluation-harness's rolling windows, made disjoint)."""
    first = min(size, len(tokens))
    out = [ScoreRequest((prefix,), tuple(tokens[:first]))]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, size)
        end = done + n
        out.append(ScoreRequest(tuple(tokens[end - size - 1 : end - n]), tuple(tokens[end - n : end])))
        done = end
    return out


class Tokenize:
    """Records -> token ids, as lm-evaluation-harness's ``hf`` backend tokenizes them: a text with the
    tokenizer's own special tokens (none when it already starts with the BOS text); a context's trailing
    spaces moved to the continuation and the pair encoded whole, the continuation being what the context
    leaves (so a word split across the boundary is scored as the model reads it); an empty context is the
    prefix token (the tokenizer's BOS, else the config's), before the continuation encoded bare."""

    def __init__(self, tokenizer: Any, cfg: OptConfig) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        self.prefix = int(bos if bos is not None else cfg.bos_token_id)

    def encode(self, text: str, where: str, special: bool | None = None) -> list[int]:
        if self.tokenizer is None:
            raise InputError(f"{where}: {self.cfg.name} has no tokenizer: give token ids instead of text")
        if special is None and text.startswith(self.tokenizer.decode([self.prefix])):
            special = False
        kwargs = {} if special is None else {"add_special_tokens": special}
        return list(self.tokenizer(text, **kwargs)["input_ids"])

    def pair(self, context: Tokens, continuation: Tokens, where: str) -> ScoreRequest:
        if isinstance(context, str) and isinstance(continuation, str):
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            if not context:
                cont = self.encode(continuation, where, special=False)
                ctx, cont = ([self.prefix], cont) if not cont or cont[0] != self.prefix else (cont[:1], cont[1:])
            else:
                whole, ctx = self.encode(context + continuation, where), self.encode(context, where)
                cont = whole[len(ctx) :]
        else:
            ctx = context if isinstance(context, list) else self.encode(context, where)
            cont = continuation if isinstance(continuation, list) else self.encode(continuation, where, special=False)
            ctx = ctx or [self.prefix]
        if not cont:
            raise InputError(f'{where}: "continuation" has no tokens: there is nothing to score')
        return ScoreRequest(tuple(ctx), tuple(cont))

    def scoring(self, record: ScoreRecord, window: int | None) -> Scoring:
        """The record's requests, each checked against the model (vocabulary, positions). ``window``: the
        tokens a text's windows predict at most (None: a text must fit the model's context whole)."""
        where, limit = record.where, self.cfg.max_seq_len
        if record.text is not None:
            toks = record.text if isinstance(record.text, list) else self.encode(record.text, where)
            if not toks:
                raise InputError(f'{where}: "text" has no tokens')
            if window is None and len(toks) > limit:
                raise InputError(
                    f"{where}: text has {len(toks)} tokens, over the model's {limit} positions; score it in "
                    "windows (drop --window off)"
                )
            requests = rolling_windows(toks, self.prefix, window or limit)
        else:
            assert record.context is not None and record.continuation is not None
            requests = [self.pair(record.context, record.continuation, where)]
        for req in requests:
            problem = token_problem(list(req.tokens), self.cfg.vocab_size)
            if problem:
                raise InputError(f"{where}: {problem}")
            if len(req) > limit:
                raise InputError(
                    f"{where}: context and continuation have {len(req) + 1} tokens; the model reads {len(req)} of "
                    f"them, over its {limit} positions"
                )
        return Scoring(record, requests)
