"""The ``generate`` job: prompts -> token ids -> engine, one block at a time -> JSONL records as they finish.

A job is planned once, for its longest prompt, and then run block by block: each block's records are
written (and, to a file, fsync'd) as soon as the block finishes, so a job that dies keeps everything it
finished. Rerunning the same command with the same ``--output`` resumes: records already there are
skipped, a partial last line is cut off. Every prompt problem is found before anything is generated.
A job is identified by its fingerprint (``jobs.fingerprint``), kept next to the output; resuming with
another model or other settings is refused.

Order: ``length`` (the default) runs the longest prompts first, so blocks hold prompts of similar length
and waste little padding; records come out in that order. ``input`` keeps the input's order. Either way
each record carries its prompt's ``id`` (and ``seq`` with ``--num-return-sequences``), and a resumed job
writes exactly the records, in the order, that an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from flexrun.config import OptConfig
from flexrun.errors import CheckpointError, FlexrunError, InputError
from flexrun.jobs.autoplace import build_engine, plan_job
from flexrun.jobs.fingerprint import already_done, job_fingerprint, recorded_choices
from flexrun.jobs.interrupt import StopRequest
from flexrun.jobs.options import EngineOptions, JobOptions
from flexrun.jobs.prompts import Sequence, load_tokenizer, prepare
from flexrun.jobs.results import ResultWriter, check_output, emit, is_stream, lock_output, open_stream
from flexrun.jobs.streaming import TextStream, cut_at_stop
from flexrun.jobs.textio import PromptRecord, check_unique_ids, read_prompts
from flexrun.placement import Placement
from flexrun.runtime.engine import Engine
from flexrun.runtime.stats import RunStats
from flexrun.runtime.tiers import compute_device


class JobInterrupted(FlexrunError):
    """SIGINT or SIGTERM stopped the job; what was finished is kept."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class GenerateResult:
    """What a generate job did: the config it ran (compute dtype resolved), its placement and stats (None
    when nothing was left to generate), and the interruption that stopped it, if one did."""

    cfg: OptConfig
    placement: Placement | None = None
    stats: RunStats | None = None
    interrupted: JobInterrupted | None = None


class _Job:
    """One run of a job: the sequences still to do, where their records go, and how to turn tokens into them."""

    def __init__(self, job: JobOptions, tokenizer: Any, eos: frozenset[int], writer: ResultWriter) -> None:
        self.job = job
        self.tokenizer = tokenizer
        self.eos = eos  # every id that ends a sequence
        self.writer = writer
        self.stats: RunStats | None = None  # of the blocks finished so far

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
        eos = bool(toks) and toks[-1] in self.eos and self.job.params.stop_at_eos
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
    opts: EngineOptions,
    job: JobOptions,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> GenerateResult:
    """Run a generate job: records to ``job.output`` or ``stdout``, progress and notices on ``stderr``."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr

    def notify(line: str) -> None:
        print(line, file=stderr, flush=True)

    use_stdin = job.input_file == "-" or (not job.prompts and not job.input_file and not stdin.isatty())
    records = read_prompts(job.prompts, job.input_file, stdin if use_stdin else None)
    source = job.input_file if job.input_file and job.input_file != "-" else "<stdin>" if use_stdin else "--prompt"
    target = Path(job.output) if job.output and job.output != "-" else None  # "-" is stdout
    if target is not None and is_stream(target):
        notify(f"{target} is a pipe or device: records are written straight through, without a job file or resume")
        sink = open_stream(target)
        try:
            return _generate(opts, job, records, source, None, sink, str(target), notify)
        finally:
            with contextlib.suppress(OSError):  # its failure was reported, or its reader is gone
                sink.close()
    if target is None:
        return _generate(opts, job, records, source, None, stdout, "stdout", notify)
    check_unique_ids(records)
    check_output(target, job.input_file)
    lock = lock_output(target)  # one job per output file
    try:
        return _generate(opts, job, records, source, target, stdout, str(target), notify)
    finally:
        lock.release()


def _generate(
    opts: EngineOptions,
    job: JobOptions,
    records: list[PromptRecord],
    source: str,
    out_path: Path | None,
    stdout: IO[str],
    name: str,
    notify: Callable[[str], None],
) -> GenerateResult:
    """The job once its output is settled: a resumable file ``out_path`` (locked), else ``stdout`` (a pipe
    or device ``--output`` opened in its place), called ``name`` in messages."""
    model = opts.model.source("generate")
    tokenizer = load_tokenizer(model)
    if job.params.stop and tokenizer is None:
        raise InputError(f"--stop needs a tokenizer and {model.config.name} has none")
    seqs = prepare(records, tokenizer, model.config, job)
    if out_path is not None and not job.overwrite:
        opts = opts.settled(**recorded_choices(out_path))  # a resumed job keeps the choices it started with
    # Planned for the whole job, not for what is left, so a resumed job runs the same blocks as an
    # uninterrupted one would have (same placement, same block size); before the store opens, since each
    # weight compression the planner may choose is a store of its own.
    longest, blocks = max(len(s.ids) for s in seqs), 1 if job.stream else len(seqs)
    settled = plan_job(opts, model, longest, job.params.max_new_tokens, blocks)
    store = settled.opts.model.open_store("generate", progress=not job.quiet)
    cfg = settled.opts.model.run_config(store, compute_device())
    fingerprint = job_fingerprint(store, job, cfg.run_dtype, settled.opts.placement.compress_cache)

    done: set[tuple[str, int]] = set()
    keep_bytes: int | None = 0 if job.overwrite else None
    if out_path is not None and not job.overwrite:
        done, keep_bytes = already_done(out_path, seqs, source, fingerprint)
    pending = [s for s in seqs if s.key not in done]
    if job.order == "length":
        pending.sort(key=lambda s: (-len(s.ids), s.seed_index))
    writer = ResultWriter(out_path, stdout=None if job.stream else stdout, job=fingerprint, name=name)
    if not pending:
        writer.open(keep_bytes, len(done))
        writer.close()
        notify(f"all {len(seqs)} records are already in {out_path}; nothing to do")
        return GenerateResult(cfg)
    if done and not job.quiet:
        notify(f"resuming: {len(done)} of {len(seqs)} records are already in {out_path}")

    engine, plan_line = build_engine(
        store, cfg, settled.opts, longest, job.params.max_new_tokens, blocks, settled.planned
    )
    if plan_line and not job.quiet:
        notify(plan_line)
    run = _Job(job, tokenizer, store.config.stop_token_ids, writer)
    stop = StopRequest(notify=None if job.quiet else notify)
    abandoned = False
    try:
        with engine, stop.installed():
            writer.open(keep_bytes, len(done))
            _run_blocks(engine, run, pending, len(seqs), len(done), stop, stdout)
    except KeyboardInterrupt:
        abandoned = True
    finally:
        writer.close()
    result = GenerateResult(engine.cfg, engine.placement, run.stats)
    if stop.requested or abandoned:
        how = "abandoning the block in flight" if abandoned else "after the block in flight"
        resume = "; run the same command again to resume" if out_path is not None else ""
        message = f"interrupted by {stop.signal_name}, {how}: {_kept(writer, out_path)}{resume}"
        result.interrupted = JobInterrupted(message, stop.exit_code)
    return result


def _run_blocks(
    engine: Engine, run: _Job, pending: list[Sequence], total: int, done: int, stop: StopRequest, stdout: IO[str]
) -> None:
    """Generate ``pending`` block by block, writing each block's records as it finishes, until done or asked
    to stop; the stats add up in ``run.stats`` as blocks finish."""
    job = run.job
    stop_check = run.stop_check()
    chunk_size = 1 if job.stream else engine.placement.block_size
    bar = tqdm(
        total=total,
        initial=done,
        unit="seq",
        desc="generate",
        file=sys.stderr,
        disable=job.quiet or job.stream,
        dynamic_ncols=True,
    )
    started, new_tokens = time.perf_counter(), 0
    try:
        for start in range(0, len(pending), chunk_size):
            if stop.requested:
                break
            chunk = pending[start : start + chunk_size]
            text = TextStream(run.tokenizer, job.params.stop) if job.stream else None
            on_step: Callable[[list[int], list[int]], None] | None = None
            if text is not None:

                def on_step(members: list[int], last: list[int], text: TextStream = text) -> None:
                    emit(stdout, text.push(last[0]), run.writer.name, _kept(run.writer, run.writer.path))

            try:
                new, part, _ = engine.generate(
                    [s.ids for s in chunk],
                    job.params,
                    seq_ids=[s.seed_index for s in chunk],
                    on_step=on_step,
                    stop_check=stop_check,
                )
            except BrokenPipeError:  # the reader of --stream's text went away: the CLI ends quietly
                raise
            except OSError as exc:  # the offload dir filled up or went away mid-job
                raise InputError(
                    f"offload dir: {exc.strerror}; {_kept(run.writer, run.writer.path)}, run the same command "
                    "again to resume once that is fixed"
                ) from None
            except CheckpointError as exc:  # a weight file that cannot be read mid-job
                raise CheckpointError(
                    f"{exc}; {_kept(run.writer, run.writer.path)}, run the same command again to resume once "
                    "that is fixed"
                ) from None
            if text is not None:
                emit(stdout, text.finish() + "\n", run.writer.name, _kept(run.writer, run.writer.path))
            with stop.writing():
                run.writer.write([run.row(s, toks) for s, toks in zip(chunk, new, strict=True)])
            run.stats = part if run.stats is None else run.stats.merge(part)
            new_tokens += sum(len(t) for t in new)
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - started):.1f} tok/s", refresh=False)
            bar.update(len(chunk))
    finally:
        bar.close()


def _kept(writer: ResultWriter, out_path: Path | None) -> str:
    if out_path is None:
        return f"the {writer.written} records written before are complete"
    return f"{out_path} keeps the {writer.written} records finished before"
