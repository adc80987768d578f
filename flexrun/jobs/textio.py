"""Prompts in (``--prompt``, JSONL files, stdin) and result records out (JSONL)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flexrun.errors import InputError


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
    if ids is not None and (
        not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
    ):
        raise InputError(f'{where}: "input_ids" must be a list of integers')
    rid = obj.get("id", default_id)
    if isinstance(rid, (dict, list)) or rid is None:
        raise InputError(f'{where}: "id" must be a string or a number')
    return PromptRecord(id=rid, prompt=prompt, input_ids=ids, where=where)


def read_jsonl(stream: IO[str], name: str, text_keys: tuple[str, ...] = ("prompt",)) -> list[PromptRecord]:
    """Records from a JSONL stream; a bad line is an InputError naming the file and line. The text is read
    from the first of ``text_keys`` a record has."""
    records: list[PromptRecord] = []
    for lineno, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}:{lineno}: malformed JSON ({exc.msg})") from None
        record = _record(obj, f"{name}:{lineno}", lineno, text_keys)
        record.index = len(records)
        records.append(record)
    return records


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


def read_prompts(
    prompts: tuple[str, ...],
    input_file: str | None,
    stdin: IO[str] | None,
    text_keys: tuple[str, ...] = ("prompt",),
    hint: str = "give --prompt TEXT, --input FILE.jsonl, or JSONL on stdin",
) -> list[PromptRecord]:
    """Prompts from ``--prompt`` texts, else a JSONL file (``-`` for stdin), else stdin lines (JSONL).

    ``text_keys`` are the record keys a text may come under; ``hint`` ends the error for an empty input."""
    if prompts:
        return [PromptRecord(id=n, prompt=p, where=f"--prompt {n + 1}", index=n) for n, p in enumerate(prompts)]
    if input_file and input_file != "-":
        path = Path(input_file)
        try:
            with path.open(encoding="utf-8") as f:
                records = read_jsonl(f, str(path), text_keys)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text") from None
        source = str(path)
    elif stdin is not None:
        records = read_jsonl(stdin, "<stdin>", text_keys)
        source = "<stdin>"
    else:
        records, source = [], "input"
    if not records:
        raise InputError(f"{source}: no prompts ({hint})")
    return records
