"""Where result records go: a resumable JSONL file (``--output``) or stdout (``ResultWriter``, for
generate), or a file replaced whole when the job succeeds (``RowWriter``, for embed).

The file is append-only. Each block's records are written with one ``write`` of whole lines and made
durable with ``fsync`` before the next block starts, so a crash loses at most the block in flight and can
leave at most one partial line at the end; the next run cuts that line off and resumes after the last
complete record. A record counts as written only with its newline.

Next to the file, ``<output>.job.json`` describes the job that writes it (the model's weights and every
setting that changes the records). It is written atomically before the first record and replaced only
with ``--overwrite``, after the records are cut; a resume checks it, so two jobs never share one file.
While a job runs, ``<output>.lock`` is locked (``lock_output``): a second job on the same file is refused.

A pipe, FIFO or character device (``/dev/null``, ``/dev/stdout``) is no file to resume: records are written
straight through (``open_stream``). A write error there ends the job; a reader that went away
(``BrokenPipeError``) is left for the CLI to end quietly, as Unix tools do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flexrun.errors import InputError
from flexrun.jobs.textio import id_key
from flexrun.weights.filelock import FileLock

log = logging.getLogger(__name__)


def check_output(path: Path, input_file: str | None) -> None:
    """Fail before any work when the output cannot be written (or would overwrite the input)."""
    if input_file and input_file != "-" and path.exists() and Path(input_file).exists() and path.samefile(input_file):
        raise InputError(f"--output {path} is the input file; write the results elsewhere")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from None


def is_stream(path: Path) -> bool:
    """Whether ``path`` is a pipe, FIFO or device (anything under /dev or /proc included) rather than a file
    a job can resume: records go straight through to it."""
    if str(path).startswith(("/dev/", "/proc/")):
        return True
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False  # missing: a file is created


def open_stream(path: Path) -> IO[str]:
    """Open a pipe, FIFO or device for writing records (a FIFO waits here for its reader)."""
    try:
        # appending: /dev/stdout onto a file opened with >> must not cut it
        return open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by the job
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from None


def lock_output(path: Path) -> FileLock:
    """Lock ``path`` for this job; another job writing it is refused, named."""
    lock = FileLock(path.with_name(path.name + ".lock"))
    if not lock.acquire(wait=False):
        raise InputError(
            f"{path} is being written by {lock.holder()} (another flexrun job); wait for it to finish "
            "or choose another --output"
        )
    return lock


def _silence(stream: IO[str]) -> None:
    """Point a stream that failed at /dev/null, so what is still buffered in it cannot fail again at exit."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def emit(stream: IO[str], text: str, name: str, kept: str) -> None:
    """Write and flush ``text`` to a stream. A reader gone (EPIPE) is re-raised as ``BrokenPipeError``;
    any other write error is one InputError naming the stream and ``kept`` (what is complete)."""
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        _silence(stream)
        raise
    except OSError as exc:
        _silence(stream)
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "I/O error")
        raise InputError(f"cannot write {name}: {reason}; {kept}") from None


def result_key(record: dict[str, Any]) -> tuple[str, int]:
    """A record's identity in a job: its prompt's id and its sequence index (``--num-return-sequences``)."""
    return id_key(record["id"]), int(record.get("seq", 0))


@dataclass
class Existing:
    """The complete records already in an output file (their keys only: resuming over millions of records
    keeps no record in memory), and where the complete part ends."""

    records: dict[tuple[str, int], int]  # key -> line number
    good_bytes: int  # length of the complete lines; anything after is a partial line
    partial: bool
    problem: str | None = None  # the first complaint of ``scan``'s ``check``, for the caller to raise


#: What each job's records must hold to be its records.
RECORD_FIELDS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "generate": ("output_ids", list),
    "score": ("logprob", (int, float)),
}


def scan(
    path: Path,
    check: Callable[[int, dict[str, Any], tuple[str, int]], str | None] | None = None,
    kind: str = "generate",
) -> Existing:
    """Read the results already in ``path`` without changing it, a line at a time; a damaged line is an
    InputError. ``check(lineno, record, key)`` may object to a record: its first objection is kept. ``kind``:
    the job whose records these must be (``RECORD_FIELDS``)."""
    field, types = RECORD_FIELDS[kind]
    records: dict[tuple[str, int], int] = {}
    good, problem, partial = 0, None, False
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    partial = True
                    break
                good += len(raw)
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                    if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get(field), types):
                        raise ValueError
                    key = result_key(rec)
                except (ValueError, TypeError, RecursionError):
                    raise InputError(
                        f"{path}:{lineno}: not a flexrun result record; this file is not the output of a {kind} "
                        "job (choose another --output, or --overwrite to replace it)"
                    ) from None
                if key in records:
                    raise InputError(f"{path}:{lineno}: id {rec['id']!r} is already on line {records[key]}")
                records[key] = lineno
                if check is not None and problem is None:
                    problem = check(lineno, rec, key)
    except FileNotFoundError:
        return Existing({}, 0, False)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    return Existing(records, good, partial, problem)


JOB_FORMAT = "flexrun generate job"
JOB_VERSION = 1


def job_path(path: Path) -> Path:
    """Where the description of the job writing ``path`` lives."""
    return path.with_name(path.name + ".job.json")


def read_job(path: Path) -> dict[str, Any] | None:
    """The job description recorded for the results file ``path``, or None when there is none."""
    side = job_path(path)
    fix = "choose another --output, or --overwrite to start afresh"
    try:
        data = json.loads(side.read_text())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"cannot read {side}: {exc.strerror}") from None
    except (ValueError, RecursionError):  # a UnicodeDecodeError is a ValueError too
        raise InputError(f"{side}: damaged job description (not JSON); {fix}") from None
    if not isinstance(data, dict) or data.get("format") != JOB_FORMAT or not isinstance(data.get("job"), dict):
        raise InputError(f"{side}: not a flexrun job description; {fix}")
    if data.get("version") != JOB_VERSION:
        raise InputError(f"{side}: written by another version of flexrun (job format {data.get('version')}); {fix}")
    job: dict[str, Any] = data["job"]
    return job


def write_job(path: Path, job: dict[str, Any]) -> None:
    """Record ``job`` as the job writing ``path``: all at once (a temporary file renamed over it) and durably.
    An identical description already there is left as it is."""
    side = job_path(path)
    text = json.dumps({"format": JOB_FORMAT, "version": JOB_VERSION, "job": job}, indent=1) + "\n"
    try:
        if side.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass  # missing or unreadable: written below
    tmp = side.with_name(side.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, side)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write {side}: {exc.strerror}") from None
    try:  # make the rename itself durable before any record is written
        fd = os.open(side.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        log.debug("cannot fsync the directory of %s", side)


class ResultWriter:
    """Appends blocks of records to a file (durably), else to ``stdout``, else nowhere (``--stream`` prints
    text instead). ``written`` counts the records in the file. ``job`` is the description recorded next to
    the file (``write_job``) when it is opened."""

    def __init__(
        self,
        path: Path | None,
        stdout: IO[str] | None = None,
        job: dict[str, Any] | None = None,
        name: str = "stdout",
    ) -> None:
        self.path = path
        self.stdout = stdout
        self.name = name  # the stream's name in messages
        self.job = job
        self.fd: int | None = None
        self.written = 0

    def open(self, keep_bytes: int | None, existing: int) -> None:
        """Open the file for appending, first cutting it to ``keep_bytes`` (None: keep it all; 0: start afresh),
        then record the job: the records cut are never left under another job's description."""
        if self.path is None:
            return
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            if keep_bytes is not None and os.fstat(self.fd).st_size != keep_bytes:
                os.ftruncate(self.fd, keep_bytes)
        except OSError as exc:
            self.close()
            raise InputError(f"cannot write {self.path}: {exc.strerror}") from None
        if self.job is not None:
            try:
                write_job(self.path, self.job)
            except InputError:
                self.close()
                raise
        self.written = existing

    def write(self, records: list[dict[str, Any]]) -> None:
        """Write one block's records: all of them, durably, or none (the file is cut back on failure)."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if self.fd is None:
            if self.stdout is not None:
                emit(self.stdout, data, self.name, f"the {self.written} records written before are complete")
            self.written += len(records)  # to stdout, or printed as text (``--stream``)
            return
        size = os.fstat(self.fd).st_size
        view = memoryview(data.encode("utf-8"))
        try:
            while view:
                view = view[os.write(self.fd, view) :]
            os.fsync(self.fd)
        except OSError as exc:
            try:  # leave no partial line behind; on a full disk shrinking a file still works
                os.ftruncate(self.fd, size)
            except OSError:
                log.warning("could not cut the partial block off %s; the next run will", self.path)
            reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "I/O error")
            raise InputError(
                f"cannot write {self.path}: {reason}; it keeps the {self.written} records written before, "
                "run the same command again to resume once that is fixed"
            ) from None
        self.written += len(records)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RowWriter:
    """JSONL rows to ``stdout``, or to a temporary file beside ``path`` that replaces it only on ``commit``:
    until then an existing file is untouched, and ``discard`` leaves things as they were."""

    def __init__(self, path: Path | None, stdout: IO[str], input_file: str | None) -> None:
        self.path = path
        self.stdout = stdout
        self.file: IO[str] | None = None
        self.tmp: Path | None = None
        self.committed = False
        self.name = "stdout"
        self.sink: IO[str] | None = None  # a pipe or device --output, opened in place of stdout
        if path is not None and (str(path) == "-" or is_stream(path)):
            if str(path) != "-":
                log.warning("%s is a pipe or device: rows are written straight through", path)
                self.stdout = self.sink = open_stream(path)
                self.name = str(path)
            self.path = path = None
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
        data = "".join(json.dumps(row) + "\n" for row in rows)
        if self.file is None:  # a reader gone is BrokenPipeError, for the CLI to end quietly
            emit(self.stdout, data, self.name, "the rows written before are complete")
            return
        try:
            self.file.write(data)
            self.file.flush()
        except OSError as exc:
            raise InputError(f"cannot write {self.path}: {exc.strerror}") from None

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
        if self.sink is not None:
            with contextlib.suppress(OSError):  # its failure was reported, or its reader is gone
                self.sink.close()
            self.sink = None
        if self.file is not None:
            self.file.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None
        path = self.path
        if self.created and not self.committed and path is not None and path.is_file() and not path.stat().st_size:
            path.unlink()
