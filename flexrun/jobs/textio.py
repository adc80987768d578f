"""Prompts in (``--prompt``, JSONL files, stdin) and result records out (JSONL)."""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flexrun.errors import InputError

# The lone surrogates a surrogate-escaping decoder puts in place of bytes that are not UTF-8.
_ESCAPED = re.compile("[\udc80-\udcff]")


@dataclass
class PromptRecord:
    """One prompt of a job. ``where`` names it in messages (``in.jsonl:12`` or ``--prompt 2``); ``index`` is
    its position in the input, which seeds its sampling, so a rerun or a resumed run reproduces it."""

    id: Any
    prompt: str | None = None
    input_ids: list[int] | None = None
    where: str = ""
    index: int = 0


def _record(obj: Any, where: str, default_id: int, text_keys: tuple[str, ...] = ("prompt",)) -> PromptRecord:
    keys = ", ".join(f'"{k}"' for k in text_keys)
    if not isinstance(obj, dict):
        raise InputError(f'{where}: expected a JSON object with {keys} or "input_ids"')
    key = next((k for k in text_keys if obj.get(k) is not None), text_keys[0])
    prompt, ids = obj.get(key), obj.get("input_ids")
    if prompt is None and ids is None:
        raise InputError(f'{where}: record has neither {keys} nor "input_ids"')
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(f'{where}: "{key}" must be a string')
    if prompt is not None:
        _check_unicode(prompt, f'{where}: "{key}"')
    if ids is not None and (
        not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
    ):
        raise InputError(f'{where}: "input_ids" must be a list of integers')
    rid = obj.get("id", default_id)
    if isinstance(rid, (dict, list)) or rid is None or (isinstance(rid, float) and not math.isfinite(rid)):
        # NaN and Infinity would be written back as invalid JSON.
        raise InputError(f'{where}: "id" must be a string or a finite number')
    if isinstance(rid, str):
        _check_unicode(rid, f'{where}: "id"')
    return PromptRecord(id=rid, prompt=prompt, input_ids=ids, where=where)


def read_jsonl(stream: IO[str], name: str, text_keys: tuple[str, ...] = ("prompt",)) -> list[PromptRecord]:
    """Records from a JSONL stream; a bad line is an InputError naming the file and line. The text is read
    from the first of ``text_keys`` a record has."""
    records: list[PromptRecord] = []
    for lineno, line in _lines(stream, name):
        if lineno == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
        if not line.strip():
            continue
        obj = _parse_json_line(line, f"{name}:{lineno}")
        record = _record(obj, f"{name}:{lineno}", lineno, text_keys)
        record.index = len(records)
        records.append(record)
    return records


def _lines(stream: IO[str], name: str) -> Iterator[tuple[int, str]]:
    """The stream's lines, numbered from 1; bytes that are not UTF-8 (a strict stream's decoding error, or
    the lone surrogates ``errors="surrogateescape"`` leaves for them) are an InputError naming the line."""
    lineno = 0
    it = iter(stream)
    while True:
        try:
            line = next(it)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:  # a strict stream decodes ahead: the line is approximate
            raise InputError(f"{name}:{lineno + 1}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x})") from None
        lineno += 1
        bad = _ESCAPED.search(line)
        if bad:
            raise InputError(f"{name}:{lineno}: not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x})")
        yield lineno, line


def _read_stdin(stdin: IO[str], text_keys: tuple[str, ...]) -> list[PromptRecord]:
    """Records from stdin, read through a surrogate-escaping decoder when it has a byte buffer (as
    ``read_prompts`` reads a file), so a line that is not UTF-8 is named exactly."""
    buffer = getattr(stdin, "buffer", None)
    if buffer is None:
        return read_jsonl(stdin, "<stdin>", text_keys)
    wrapper = io.TextIOWrapper(buffer, encoding="utf-8", errors="surrogateescape")
    try:
        return read_jsonl(wrapper, "<stdin>", text_keys)
    finally:
        wrapper.detach()  # stdin's own buffer stays open


def _parse_json_line(line: str | bytes, where: str) -> Any:
    """One JSON value, or an InputError naming ``where``: malformed, nested too deeply for the parser, or an
    integer too long to convert."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: malformed JSON ({exc.msg})") from None
    except RecursionError:
        raise InputError(f"{where}: malformed JSON (nested too deeply)") from None
    except ValueError as exc:  # an integer past Python's digit limit (int_max_str_digits)
        raise InputError(f"{where}: malformed JSON ({str(exc).split(';')[0]})") from None


def _check_unicode(text: str, what: str) -> None:
    """Refuse a string that is not valid Unicode (a lone surrogate such as "\\ud800"): no tokenizer or output
    file can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what} is not valid Unicode (lone surrogate \\u{ord(text[exc.start]):04x})") from None


def id_key(rid: Any) -> str:
    """A hashable key for a record id: ``3`` and ``"3"`` stay distinct."""
    return json.dumps(rid)


def check_unique_ids(records: list[PromptRecord]) -> None:
    """Resuming matches results to prompts by id, so ids must be unique."""
    seen: dict[str, str] = {}
    for r in records:
        key = id_key(r.id)
        if key in seen:
            other, source = seen[key], r.where.rsplit(":", 1)[0] + ":"
            other = "line " + other.removeprefix(source) if other.startswith(source) else other
            raise InputError(f"{r.where}: id {r.id!r} repeats {other}; ids must be unique to resume a job")
        seen[key] = r.where


def _stdin_text(stdin: IO[str]) -> str:
    """All of stdin as text, bytes that are not UTF-8 kept as lone surrogates (named by ``read_jsonl``)."""
    buffer = getattr(stdin, "buffer", None)
    if buffer is None:
        return stdin.read()
    return bytes(buffer.read()).decode("utf-8", errors="surrogateescape")


def _plain_text_record(text: str) -> PromptRecord | None:
    """Stdin that is not JSONL (its first non-blank line is no JSON object) as one prompt, as ``llm`` and
    ``ollama run`` read it; None for JSONL (or nothing)."""
    first = next((line for line in text.splitlines() if line.strip()), None)
    if first is None or first.lstrip("\ufeff").lstrip().startswith("{"):
        return None
    bad = _ESCAPED.search(text)
    if bad:
        lineno = text.count("\n", 0, bad.start()) + 1
        raise InputError(f"<stdin>:{lineno}: not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x})")
    return PromptRecord(id=1, prompt=text.rstrip("\n"), where="<stdin>", index=0)


def read_prompts(
    prompts: tuple[str, ...],
    input_file: str | None,
    stdin: IO[str] | None,
    text_keys: tuple[str, ...] = ("prompt",),
    hint: str = "give a PROMPT, --input FILE.jsonl, or text or JSONL on stdin",
    plain_stdin: bool = False,
) -> list[PromptRecord]:
    """Prompts from ``--prompt`` texts, else a JSONL file (``-`` for stdin), else stdin lines (JSONL; with
    ``plain_stdin``, stdin that is not JSONL is one prompt).

    A record's default id is its place in the input counted from 1: the line number of a JSONL file, the
    n-th ``--prompt``. ``text_keys`` are the record keys a text may come under; ``hint`` ends the error for
    an empty input."""
    if prompts:
        for n, p in enumerate(prompts):  # bytes that are not UTF-8 reach argv as lone surrogates
            _check_unicode(p, f"--prompt {n + 1}")
        return [PromptRecord(id=n + 1, prompt=p, where=f"--prompt {n + 1}", index=n) for n, p in enumerate(prompts)]
    if plain_stdin and stdin is not None and not input_file:
        text = _stdin_text(stdin)
        plain = _plain_text_record(text)
        if plain is not None:
            return [plain]
        stdin = io.StringIO(text)
    if input_file and input_file != "-":
        path = Path(input_file)
        try:
            # Undecodable bytes are kept as lone surrogates, so the line holding them can be named.
            with path.open(encoding="utf-8", errors="surrogateescape") as f:
                records = read_jsonl(f, str(path), text_keys)
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None
        source = str(path)
    elif stdin is not None:
        records = _read_stdin(stdin, text_keys)
        source = "<stdin>"
    else:
        records, source = [], "input"
    if not records:
        raise InputError(f"{source}: no prompts ({hint})")
    return records
