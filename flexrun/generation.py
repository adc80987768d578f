"""The ``generate`` job: prompts -> token ids -> engine, one block at a time -> JSONL records as they finish.

A job is planned once, for its longest prompt, and then run block by block: each block's records are
written (and, to a file, fsync'd) as soon as the block finishes, so a job that dies keeps everything it
finished. Rerunning the same command with the same ``--output`` resumes: records already there are
skipped, a partial last line is cut off. Every prompt problem is found before anything is generated.
A job is identified by its fingerprint (the model's weights and tokenizer, and every setting that changes
the records), kept next to the output; resuming with another model or other settings is refused.

Order: ``length`` (the default) runs the longest prompts first, so blocks hold prompts of similar length
and waste little padding; records come out in that order. ``input`` keeps the input's order. Either way
each record carries its prompt's ``id`` (and ``seq`` with ``--num-return-sequences``), and a resumed job
writes exactly the records, in the order, that an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from flexrun.errors import CheckpointError, FlexrunError, InputError
from flexrun.interrupt import StopRequest
from flexrun.results import Existing, ResultWriter, check_output, job_path, read_job, scan
from flexrun.runtime.engine import RunStats
from flexrun.runtime.precision import resolve_compute_dtype
from flexrun.runtime.sampling import SamplingParams
from flexrun.runtime.tiers import compute_device
from flexrun.streaming import TextStream, cut_at_stop
from flexrun.textio import PromptRecord, check_unique_ids, id_key, read_prompts
from flexrun.weights.store import TensorStore

log = logging.getLogger(__name__)


class JobInterrupted(FlexrunError):
    """SIGINT or SIGTERM stopped the job; what was finished is kept."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class JobOptions:
    """What ``flexrun generate`` was asked to do, apart from the model and placement."""

    params: SamplingParams
    prompts: tuple[str, ...] = ()
    input_file: str | None = None
    output: str | None = None
    num_return_sequences: int = 1
    truncate: str = "none"  # "none": a prompt longer than the context is an error; "left": keep its end
    order: str = "length"  # "length" (longest first) or "input"
    overwrite: bool = False
    stream: bool = False
    quiet: bool = False
    chat: bool = False  # wrap each text prompt as one user turn of the tokenizer's chat template


@dataclass
class Sequence:
    """One sequence to generate: a prompt's token ids and which of its return sequences this is."""

    record: PromptRecord
    ids: list[int]
    seq: int
    seed_index: int  # seeds the sampler: the same for this sequence in every run of the job
    truncated: int = 0  # tokens cut off the front of the prompt (--truncate left)

    @property
    def key(self) -> tuple[str, int]:
        return id_key(self.record.id), self.seq


def load_tokenizer(store: TensorStore) -> Any:
    """The checkpoint's tokenizer, or None when the store has none (dummy weights). Code shipped with a
    checkpoint (``auto_map``) is never run: ``trust_remote_code`` stays off."""
    tok_dir = store.tokenizer_dir()
    if tok_dir is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
    except Exception as exc:  # transformers raises many classes for a tokenizer it cannot build
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{tok_dir}: cannot load the tokenizer ({exc.__class__.__name__}: {first}); "
            'give prompts as "input_ids" records instead'
        ) from None


def prepare(records: list[PromptRecord], tokenizer: Any, store: TensorStore, job: JobOptions) -> list[Sequence]:
    """Token ids for every sequence of the job, each prompt checked (vocabulary, length) against the model."""
    cfg = store.config
    max_new = job.params.max_new_tokens
    room = cfg.max_seq_len - max_new
    if room < 1:
        raise InputError(
            f"--max-new-tokens {max_new} leaves no room for a prompt in the model's {cfg.max_seq_len} positions"
        )
    if job.chat and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{cfg.name}'s tokenizer has no chat template; drop --chat")
    seqs: list[Sequence] = []
    for r in records:
        if r.input_ids is not None:
            ids = list(r.input_ids)
        elif tokenizer is None:
            raise InputError(f'{r.where}: {cfg.name} has no tokenizer: give prompts as "input_ids" records instead')
        elif job.chat:
            turn = [{"role": "user", "content": r.prompt}]
            text = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(tokenizer(r.prompt)["input_ids"])
        if not ids:
            raise InputError(f"{r.where}: empty prompt")
        bad = next((t for t in ids if t < 0 or t >= cfg.vocab_size), None)
        if bad is not None:
            raise InputError(f"{r.where}: token id {bad} is outside the vocabulary (0..{cfg.vocab_size - 1})")
        cut = 0
        if len(ids) > room:
            if job.truncate != "left":
                raise InputError(
                    f"{r.where}: prompt has {len(ids)} tokens; with --max-new-tokens {max_new} that exceeds the "
                    f"model's {cfg.max_seq_len} positions (--truncate left keeps its last {room} tokens)"
                )
            cut = len(ids) - room
            ids = ids[cut:]
        n = job.num_return_sequences
        seqs.extend(Sequence(r, ids, k, r.index * n + k, cut) for k in range(n))
    return seqs


def weights_digest(store: TensorStore) -> str:
    """A short digest of the model the store holds: its config (less its name) and each tensor's dtype, shape
    and checksum. The same weights give the same digest wherever they were converted to."""
    config = {k: v for k, v in store.index["config"].items() if k != "name"}
    blob = json.dumps({"config": config, "tensors": store.index["tensors"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenizer_digest(store: TensorStore) -> str | None:
    """A short digest of the tokenizer files the store holds (names and contents), None without any: the
    tokenizer decides the prompts' ids and the records' text as much as the weights decide the tokens."""
    tok_dir = store.tokenizer_dir()
    if tok_dir is None:
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in tok_dir.rglob("*") if p.is_file()):
        name = f.relative_to(tok_dir).as_posix().encode()
        data = f.read_bytes()
        h.update(b"%d:%s%d:" % (len(name), name, len(data)))
        h.update(data)
    return h.hexdigest()[:16]


def job_fingerprint(store: TensorStore, job: JobOptions, compute_dtype: str | None = None) -> dict[str, Any]:
    """Everything apart from the prompts (checked record by record) that decides a job's records. The
    placement and ``--order`` are left out: they change how fast the records come, not what they hold; so
    are the sampling options of a greedy job, which only the repetition penalty affects. The compute dtype
    is recorded only when it differs from the weights' (so jobs that never had one still resume), the
    tokenizer only when the store has one."""
    p = job.params
    fp: dict[str, Any] = {"model": store.config.name, "weights": weights_digest(store)}
    tokenizer = tokenizer_digest(store)
    if tokenizer is not None:
        fp["tokenizer"] = tokenizer
    fp |= {
        "dtype": store.config.dtype,
        "max_new_tokens": p.max_new_tokens,
        "temperature": p.temperature,
        "repetition_penalty": p.repetition_penalty,
    }
    if compute_dtype and compute_dtype != store.config.dtype:
        fp["compute_dtype"] = compute_dtype
    if not p.greedy:
        fp.update(top_p=p.top_p, top_k=p.top_k, seed=p.seed)
    fp.update(
        stop=list(p.stop),
        stop_at_eos=p.stop_at_eos,
        num_return_sequences=job.num_return_sequences,
        chat=job.chat,
        truncate=job.truncate,
    )
    return fp


# How a fingerprint's settings are named in messages: the options that set them.
_OPTION = {
    "dtype": "--dtype",
    "compute_dtype": "--compute-dtype",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "repetition_penalty": "--repetition-penalty",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
    "stop": "--stop",
    "num_return_sequences": "--num-return-sequences",
    "chat": "--chat",
    "truncate": "--truncate",
}


def job_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the job that wrote a file and this one, e.g. ``--max-new-tokens 3 there, 8 here``.

    A setting that only one side has (the sampling options of a greedy job) follows from one that both
    have, which is the one named. A description without a tokenizer (from a store without one, or written
    before flexrun recorded them) is not held to one."""
    if "tokenizer" not in recorded:
        current = {k: v for k, v in current.items() if k != "tokenizer"}
    diffs = []
    if recorded.get("weights") != current["weights"]:
        there = f"{recorded.get('model')} (weights {str(recorded.get('weights'))[:8]})"
        diffs.append(f"model {there} there, {current['model']} (weights {current['weights'][:8]}) here")
    elif recorded.get("tokenizer") != current.get("tokenizer"):  # another model's tokenizer goes without saying
        there, here = (str(f.get("tokenizer") or "none")[:8] for f in (recorded, current))
        diffs.append(f"tokenizer {there} there, {here} here")
    computed = [f.get("compute_dtype", f.get("dtype")) for f in (recorded, current)]
    if computed[0] != computed[1] and recorded.get("dtype") == current.get("dtype"):
        diffs.append(f"--compute-dtype {computed[0]} there, {computed[1]} here")
    for key, value in current.items():
        if key in ("model", "weights", "tokenizer", "compute_dtype") or key not in recorded or recorded[key] == value:
            continue
        diffs.append(f"{_OPTION.get(key, key)} {_show(recorded[key])} there, {_show(value)} here")
    if not diffs and _settings(recorded) != _settings(current):
        diffs.append("other settings")  # a description from elsewhere: refused all the same
    return diffs


def _settings(fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fingerprint.items() if k != "model"}  # the name is a label; the weights decide


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _check_same_job(path: Path, existing: Existing, fingerprint: dict[str, Any]) -> None:
    """Refuse to add to records that another job (another model or other settings) wrote, or that no job
    description vouches for."""
    fix = "choose another --output, or --overwrite to start afresh"
    recorded = read_job(path)
    if recorded is None:
        if existing.good_bytes or existing.partial:
            what = f"holds {_records(len(existing.records))}" if existing.records else "is not empty"
            raise InputError(
                f"{path} {what} but has no {job_path(path).name} saying which model and settings wrote it, so "
                f"resuming could mix two jobs; {fix}"
            )
        return
    if not existing.records:
        return  # nothing to mix: a partial line is cut off and the description replaced
    diffs = job_differences(recorded, fingerprint)
    if diffs:
        raise InputError(f"{path} holds {_records(len(existing.records))} of another job ({'; '.join(diffs)}); {fix}")


def _records(n: int) -> str:
    return f"{n} record" + ("" if n == 1 else "s")


def already_done(
    path: Path, seqs: list[Sequence], source: str, fingerprint: dict[str, Any]
) -> tuple[set[tuple[str, int]], int]:
    """Keys of the sequences whose records are in ``path``, and the byte length of its complete lines.

    Records of another job (its recorded fingerprint differs from ``fingerprint``), or that are not part of
    this one (an id the input does not have, or other prompt tokens for the same id), are an error:
    results of two jobs are never mixed in one file.
    """
    existing = scan(path)
    _check_same_job(path, existing, fingerprint)
    by_key = {s.key: s for s in seqs}
    for key, (lineno, rec) in existing.records.items():
        s = by_key.get(key)
        what = f"id {rec['id']!r}" + (f" seq {key[1]}" if key[1] else "")
        fix = "choose another --output, or --overwrite to start afresh"
        if s is None:
            raise InputError(f"{path}:{lineno}: {what} is not a sequence of this job ({source}); {fix}")
        if rec.get("input_ids") != s.ids:
            raise InputError(
                f"{path}:{lineno}: {what} was generated from other prompt tokens than {s.record.where}; {fix}"
            )
    if existing.partial:
        log.info("%s ends with a partial record; it is cut off and generated again", path)
    return set(existing.records), existing.good_bytes


def _add_stats(total: RunStats | None, part: RunStats) -> RunStats:
    """The stats of a job run block by block: counts and seconds add up, the peak is the highest."""
    if total is None:
        return part
    for f in fields(RunStats):
        if f.name in ("peak_rss", "base_rss"):
            setattr(total, f.name, max(getattr(total, f.name), getattr(part, f.name)))
        elif f.name == "direct_io":
            if part.direct_io is not None:
                total.direct_io = part.direct_io if total.direct_io is None else total.direct_io and part.direct_io
        elif f.name in ("planned", "budgets"):
            setattr(total, f.name, getattr(part, f.name))
        else:
            setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))
    return total


class _Job:
    """One run of a job: the sequences still to do, where their records go, and how to turn tokens into them."""

    def __init__(self, job: JobOptions, tokenizer: Any, eos: int, writer: ResultWriter) -> None:
        self.job = job
        self.tokenizer = tokenizer
        self.eos = eos
        self.writer = writer

    def row(self, s: Sequence, toks: list[int]) -> dict[str, Any]:
        row: dict[str, Any] = {"id": s.record.id}
        if self.job.num_return_sequences > 1:
            row["seq"] = s.seq
        if s.record.prompt is not None:
            row["prompt"] = s.record.prompt
        row["input_ids"] = s.ids
        if s.truncated:
            row["truncated"] = s.truncated
        row["output_ids"] = toks
        stopped = False
        if self.tokenizer is not None:
            row["text"], stopped = cut_at_stop(
                self.tokenizer.decode(toks, skip_special_tokens=True), self.job.params.stop
            )
        eos = bool(toks) and toks[-1] == self.eos and self.job.params.stop_at_eos
        row["finish_reason"] = "stop" if stopped else "eos" if eos else "length"
        return row

    def stop_check(self) -> Callable[[int, list[int]], bool] | None:
        """The engine's per-token test for stop strings (on the decoded text), or None without any."""
        stop = self.job.params.stop
        if not stop or self.tokenizer is None:
            return None

        # A stop string newly found ends at the newest token, so only the output's tail is decoded (keeping
        # the check linear in the output's length): a character is at most 4 bytes and a token at least
        # one, so a stop string spans at most 4 tokens per character, special tokens (decoded as nothing)
        # not counted, plus one whose start the window may cut.
        special = set(getattr(self.tokenizer, "all_special_ids", ()))
        need = 4 * max(len(s) for s in stop) + 1

        def check(member: int, toks: list[int]) -> bool:
            start, kept = len(toks), 0
            while start > 0 and kept < need:
                start -= 1
                kept += toks[start] not in special
            text = self.tokenizer.decode(toks[start:], skip_special_tokens=True)
            return any(s in text for s in stop)

        return check


def run_generate(
    kw: dict[str, Any],
    job: JobOptions,
    make_engine: Callable[..., Any],
    print_summary: Callable[[Any, Any, Any, bool], None],
    echo: Callable[..., None],
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
) -> None:
    """Run a generate job. ``echo(text, err=..., nl=...)`` prints (the CLI's click.echo)."""
    stdin = stdin or sys.stdin
    use_stdin = job.input_file == "-" or (not job.prompts and not job.input_file and not stdin.isatty())
    records = read_prompts(job.prompts, job.input_file, stdin if use_stdin else None)
    source = job.input_file if job.input_file and job.input_file != "-" else "<stdin>" if use_stdin else "--prompt"
    out_path = Path(job.output) if job.output else None
    if out_path is not None:
        check_unique_ids(records)
        check_output(out_path, job.input_file)

    from flexrun.weights.convert import ensure_store

    store = ensure_store(
        kw["model"], dtype=kw["dtype"], dummy=kw["dummy_weights"], store_root=kw["store_dir"], progress=not job.quiet
    )
    tokenizer = load_tokenizer(store)
    if job.params.stop and tokenizer is None:
        raise InputError(f"--stop needs a tokenizer and {store.config.name} has none")
    seqs = prepare(records, tokenizer, store, job)
    compute = resolve_compute_dtype(kw.get("compute_dtype"), store.config.dtype, compute_device())
    fingerprint = job_fingerprint(store, job, compute)

    done: set[tuple[str, int]] = set()
    keep_bytes: int | None = 0 if job.overwrite else None
    if out_path is not None and not job.overwrite:
        done, keep_bytes = already_done(out_path, seqs, source, fingerprint)
    pending = [s for s in seqs if s.key not in done]
    if job.order == "length":
        pending.sort(key=lambda s: (-len(s.ids), s.seed_index))
    writer = ResultWriter(out_path, stdout=None if job.stream else (stdout or sys.stdout), job=fingerprint)
    if not pending:
        writer.open(keep_bytes, len(done))
        writer.close()
        echo(f"all {len(seqs)} records are already in {out_path}; nothing to do", err=True)
        return
    if done and not job.quiet:
        echo(f"resuming: {len(done)} of {len(seqs)} records are already in {out_path}", err=True)

    # Planned for the whole job, not for what is left, so a resumed job runs the same blocks as an
    # uninterrupted one would have (same placement, same block size).
    longest = max(len(s.ids) for s in seqs)
    store, engine = make_engine(kw, longest, job.params.max_new_tokens, 1 if job.stream else len(seqs), store)
    run = _Job(job, tokenizer, store.config.eos_token_id, writer)
    stop_check = run.stop_check()
    stop = StopRequest(notify=None if job.quiet else lambda line: echo(line, err=True))
    chunk_size = 1 if job.stream else engine.placement.block_size
    stats: RunStats | None = None
    abandoned = False
    bar = tqdm(
        total=len(seqs),
        initial=len(done),
        unit="seq",
        desc="generate",
        file=sys.stderr,
        disable=job.quiet or job.stream,
        dynamic_ncols=True,
    )
    started, new_tokens = time.perf_counter(), 0
    try:
        with engine, stop.installed():
            writer.open(keep_bytes, len(done))
            for start in range(0, len(pending), chunk_size):
                if stop.requested:
                    break
                chunk = pending[start : start + chunk_size]
                text = TextStream(tokenizer, job.params.stop) if job.stream else None

                def on_step(members: list[int], last: list[int], text: TextStream | None = text) -> None:
                    if text is not None:
                        echo(text.push(last[0]), nl=False)

                try:
                    new, part, _ = engine.generate(
                        [s.ids for s in chunk],
                        job.params,
                        seq_ids=[s.seed_index for s in chunk],
                        on_step=on_step if text is not None else None,
                        stop_check=stop_check,
                    )
                except OSError as exc:  # the offload dir filled up or went away mid-job
                    raise InputError(
                        f"offload dir: {exc.strerror}; {_kept(writer, out_path)}, run the same command again to "
                        "resume once that is fixed"
                    ) from None
                if text is not None:
                    echo(text.finish())
                with stop.writing():
                    writer.write([run.row(s, toks) for s, toks in zip(chunk, new, strict=True)])
                stats = _add_stats(stats, part)
                new_tokens += sum(len(t) for t in new)
                bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - started):.1f} tok/s", refresh=False)
                bar.update(len(chunk))
    except KeyboardInterrupt:
        abandoned = True
    finally:
        bar.close()
        writer.close()
    if stats is not None and not job.stream:
        print_summary(store, engine, stats, kw.get("as_json", False))
    if stop.requested or abandoned:
        how = "abandoning the block in flight" if abandoned else "after the block in flight"
        resume = "; run the same command again to resume" if out_path is not None else ""
        raise JobInterrupted(
            f"interrupted by {stop.signal_name}, {how}: {_kept(writer, out_path)}{resume}", stop.exit_code
        )


def _kept(writer: ResultWriter, out_path: Path | None) -> str:
    if out_path is None:
        return "the records already printed are complete"
    return f"{out_path} keeps the {writer.written} records finished before"
