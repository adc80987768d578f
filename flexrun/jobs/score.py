"""The ``score`` job: JSONL records -> scoring requests -> the scorer, block by block -> JSONL results.

Each record's result is the log-likelihood of its continuation after its context (or, for a ``text``
record, of the whole text, scored in windows of the model's context, with its perplexity). A job runs
like ``generate --output``: planned once for the whole job, records written (and fsync'd) as their blocks
finish, resumed by rerunning the same command (``jobs.results``), identified by a fingerprint beside the
output (another model or other settings are refused), stopped by Ctrl-C or SIGTERM after the block in
flight. Requests sharing a prefix are packed into one row and the prefix computed once
(``runtime.packing``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from flexrun.config import OptConfig
from flexrun.errors import InputError
from flexrun.jobs.autoplace import Planned, build_engine, plan_job
from flexrun.jobs.fingerprint import _check_same_job, recorded_choices, tokenizer_digest, weights_digest
from flexrun.jobs.generate import JobInterrupted
from flexrun.jobs.interrupt import StopRequest
from flexrun.jobs.options import AUTO, EngineOptions
from flexrun.jobs.prompts import load_tokenizer
from flexrun.jobs.results import ResultWriter, check_output, is_stream, lock_output, open_stream, scan
from flexrun.jobs.score_input import Scoring, Tokenize, read_records
from flexrun.jobs.textio import PromptRecord, check_unique_ids, id_key
from flexrun.placement import Placement
from flexrun.resolver import ModelSource
from flexrun.runtime.packing import Row, ScoreRequest, can_share, pack
from flexrun.runtime.scorer import Scored, Scorer
from flexrun.runtime.stats import RunStats
from flexrun.runtime.tiers import compute_device
from flexrun.weights.store import TensorStore


@dataclass(frozen=True)
class ScoreOptions:
    """What ``flexrun score`` was asked to score and where to write it."""

    input_file: str | None = None  # JSONL records, "-" or None for stdin
    output: str | None = None  # None or "-": stdout
    overwrite: bool = False
    tokens: bool = False  # each scored token's id and log-probability in the records
    window: int | None = 0  # the tokens a text's windows predict at most; 0: the model's context; None: no windows
    share: bool = True  # requests sharing a prefix compute it once
    quiet: bool = False


@dataclass
class ScoreResult:
    """What a score job did: config as run, placement and stats (None when nothing was left to do), how many
    requests and tokens, and the interruption that stopped it, if one did."""

    cfg: OptConfig
    placement: Placement | None = None
    stats: RunStats | None = None
    requests: int = 0
    rows: int = 0
    unshared_tokens: int = 0  # what the rows would have read without sharing
    scored_tokens: int = 0
    interrupted: JobInterrupted | None = None


def score_fingerprint(store: TensorStore, compute_dtype: str, job: ScoreOptions, window: int | None) -> dict[str, Any]:
    """Everything apart from the records that decides a score job's results (the placement and prefix
    sharing change how fast they come, not what they hold)."""
    fp: dict[str, Any] = {"task": "score", "model": store.config.name, "weights": weights_digest(store)}
    tokenizer = tokenizer_digest(store)
    if tokenizer is not None:
        fp["tokenizer"] = tokenizer
    fp["dtype"] = store.config.dtype
    if compute_dtype != store.config.dtype:
        fp["compute_dtype"] = compute_dtype
    if store.weight_compression:
        fp["compress_weight"] = store.weight_compression
    fp.update(window=window if window is not None else "off", tokens=job.tokens)
    return fp


def _already_done(
    path: Path, scorings: list[Scoring], source: str, fingerprint: dict[str, Any]
) -> tuple[set[str], int]:
    """Ids of the records whose results are in ``path``, and the byte length of its complete lines;
    results of another job, or of records this job does not have, are refused."""
    by_key = {id_key(s.record.id): s for s in scorings}
    fix = "choose another --output, or --overwrite to start afresh"

    def check(lineno: int, rec: dict[str, Any], key: tuple[str, int]) -> str | None:
        s = by_key.get(key[0])
        if s is None:
            return f"{path}:{lineno}: id {rec['id']!r} is not a record of this job ({source}); {fix}"
        if rec.get("tokens") != s.tokens or rec.get("context_tokens") != _context_tokens(s):
            return f"{path}:{lineno}: id {rec['id']!r} was scored from other tokens than {s.record.where}; {fix}"
        return None

    existing = scan(path, check, kind="score")
    _check_same_job(path, existing, fingerprint)
    if existing.problem is not None:
        raise InputError(existing.problem)
    return {k for k, _ in existing.records}, existing.good_bytes


def _context_tokens(s: Scoring) -> int | None:
    return len(s.requests[0].context) if s.record.text is None else None


def _row(s: Scoring, results: list[Scored], tokens: bool) -> dict[str, Any]:
    """A record's result from its requests' (a text's windows in order)."""
    logprob = sum(r.logprob for r in results)
    row: dict[str, Any] = {"id": s.record.id, "logprob": logprob, "is_greedy": all(r.is_greedy for r in results)}
    row["tokens"] = s.tokens
    if s.record.text is None:
        row["context_tokens"] = _context_tokens(s)
    else:
        row["perplexity"] = math.exp(-logprob / s.tokens)
        row["windows"] = len(s.requests)
    if tokens:
        row["token_ids"] = [t for req in s.requests for t in req.continuation]
        row["token_logprobs"] = [lp for r in results for lp in r.token_logprobs]
    return row


def row_limit(cfg: OptConfig, longest: int) -> int:
    """The most tokens one packed row reads: room for a few requests' worth beside the longest, within the
    model's positions (a row's attention costs its length squared)."""
    return min(cfg.max_seq_len, max(2 * longest, 256))


@dataclass(frozen=True)
class _Prepared:
    """A set of requests packed and planned for: the store the plan chose opened, its config as run."""

    rows: list[Row]
    prompt_len: int
    opts: EngineOptions
    planned: Planned | None
    store: TensorStore
    cfg: OptConfig


def _prepare(
    opts: EngineOptions, model: ModelSource, requests: list[ScoreRequest], share: bool, progress: bool
) -> _Prepared:
    """Pack ``requests`` into rows and plan for them: each row a prompt and nothing generated (``gen_len`` 0,
    the planner's prefill-only pass, which keeps no KV cache)."""
    cfg = model.config
    longest = max(len(r) for r in requests)
    rows = pack(requests, row_limit(cfg, longest), share and can_share(cfg))
    prompt_len = max(len(row) for row in rows)
    settled = plan_job(opts, model, prompt_len, 0, len(rows))
    store = settled.opts.model.open_store("generate", progress=progress)
    run_cfg = settled.opts.model.run_config(store, compute_device())
    return _Prepared(rows, prompt_len, settled.opts, settled.planned, store, run_cfg)


def _build(prep: _Prepared) -> tuple[Scorer, str | None]:
    engine, line = build_engine(
        prep.store, prep.cfg, prep.opts, prep.prompt_len, 0, len(prep.rows), prep.planned, runner=Scorer
    )
    assert isinstance(engine, Scorer)
    return engine, line


def score_requests(
    opts: EngineOptions, requests: list[ScoreRequest], share: bool = True
) -> tuple[list[Scored], RunStats, Placement]:
    """Score requests held in memory (the lm-eval backend's path): planned for them, every result in
    input order, the stats and the placement run."""
    opts = dataclasses.replace(opts, placement=dataclasses.replace(opts.placement, compress_cache=""))
    prep = _prepare(opts, opts.model.source("generate"), requests, share, progress=False)
    results: list[Scored | None] = [None] * len(requests)

    def keep(members: list[int], scored: list[Scored]) -> None:
        for m, sc in zip(members, scored, strict=True):
            results[m] = sc

    engine, _ = _build(prep)
    with engine:
        stats = engine.score_rows(requests, prep.rows, keep)
    return [r for r in results if r is not None], stats, engine.placement


def run_score(
    opts: EngineOptions,
    job: ScoreOptions,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> ScoreResult:
    """Run a score job: results to ``job.output`` or ``stdout``, progress and notices on ``stderr``."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr

    def notify(line: str) -> None:
        print(line, file=stderr, flush=True)

    request = opts.placement
    if request.cache is not None or request.compress_cache not in ("", AUTO):
        raise InputError("score keeps no KV cache (keys and values live one layer long): drop the cache placement")
    opts = dataclasses.replace(opts, placement=dataclasses.replace(request, compress_cache=""))
    records = read_records(job.input_file, stdin)
    source = job.input_file if job.input_file and job.input_file != "-" else "<stdin>"
    target = Path(job.output) if job.output and job.output != "-" else None
    if target is not None and is_stream(target):
        notify(f"{target} is a pipe or device: records are written straight through, without a job file or resume")
        sink = open_stream(target)
        try:
            return _score(opts, job, records, source, None, sink, str(target), notify)
        finally:
            with contextlib.suppress(OSError):
                sink.close()
    if target is None:
        return _score(opts, job, records, source, None, stdout, "stdout", notify)
    prompts: list[PromptRecord] = list(records)
    check_unique_ids(prompts)
    check_output(target, job.input_file)
    lock = lock_output(target)
    try:
        return _score(opts, job, records, source, target, stdout, str(target), notify)
    finally:
        lock.release()


def _score(
    opts: EngineOptions,
    job: ScoreOptions,
    records: list[Any],
    source: str,
    out_path: Path | None,
    stdout: IO[str],
    name: str,
    notify: Callable[[str], None],
) -> ScoreResult:
    model = opts.model.source("generate")
    cfg = model.config
    window = job.window
    if window is not None and window > cfg.max_seq_len:
        raise InputError(f"--window {window} is over the model's {cfg.max_seq_len} positions")
    window = cfg.max_seq_len if window == 0 else window
    tok = Tokenize(load_tokenizer(model), cfg)
    scorings = [tok.scoring(r, window) for r in records]
    requests: list[ScoreRequest] = []
    owner: list[int] = []  # each request's scoring
    for n, s in enumerate(scorings):
        requests += s.requests
        owner += [n] * len(s.requests)
    if out_path is not None and not job.overwrite:
        opts = opts.settled(**recorded_choices(out_path))
    # Planned for the whole job, so a resumed job runs the blocks an uninterrupted one would have.
    prep = _prepare(opts, model, requests, job.share, progress=not job.quiet)
    rows, run_cfg = prep.rows, prep.cfg
    fingerprint = score_fingerprint(prep.store, run_cfg.run_dtype, job, window)

    done: set[str] = set()
    keep_bytes: int | None = 0 if job.overwrite else None
    if out_path is not None and not job.overwrite:
        done, keep_bytes = _already_done(out_path, scorings, source, fingerprint)
    writer = ResultWriter(out_path, stdout=stdout, job=fingerprint, name=name)
    pending = {n for n, s in enumerate(scorings) if id_key(s.record.id) not in done}
    result = ScoreResult(run_cfg, requests=len(requests), rows=len(rows))
    if not pending:
        writer.open(keep_bytes, len(done))
        writer.close()
        notify(f"all {len(scorings)} records are already in {out_path}; nothing to do")
        return result
    if done and not job.quiet:
        notify(f"resuming: {len(done)} of {len(scorings)} records are already in {out_path}")
    engine, plan_line = _build(prep)
    if plan_line and not job.quiet:
        notify(plan_line)
    bs = engine.placement.block_size
    blocks = [rows[o : o + bs] for o in range(0, len(rows), bs)]
    blocks = [b for b in blocks if any(owner[m] in pending for row in b for m in row.members)]
    stop = StopRequest(notify=None if job.quiet else notify)
    abandoned = False
    try:
        with engine, stop.installed():
            writer.open(keep_bytes, len(done))
            _run_blocks(engine, job, blocks, requests, scorings, owner, pending, writer, stop, result)
    except KeyboardInterrupt:
        abandoned = True
    finally:
        writer.close()
    result.cfg, result.placement = engine.cfg, engine.placement
    result.unshared_tokens = sum(len(requests[m]) for b in blocks for row in b for m in row.members)
    if stop.requested or abandoned:
        how = "abandoning the block in flight" if abandoned else "after the block in flight"
        kept = f"{out_path} keeps the {writer.written} records finished before; run the same command again to resume"
        if out_path is None:
            kept = f"the {writer.written} records written before are complete"
        result.interrupted = JobInterrupted(f"interrupted by {stop.signal_name}, {how}: {kept}", stop.exit_code)
    return result


def _run_blocks(
    engine: Scorer,
    job: ScoreOptions,
    blocks: list[list[Row]],
    requests: list[ScoreRequest],
    scorings: list[Scoring],
    owner: list[int],
    pending: set[int],
    writer: ResultWriter,
    stop: StopRequest,
    result: ScoreResult,
) -> None:
    """Score block by block, writing each record as soon as its last request is scored."""
    got: dict[int, dict[int, Scored]] = {}  # scoring -> its requests' results by request index
    bar = tqdm(total=len(scorings), initial=len(scorings) - len(pending), unit="rec", desc="score", file=sys.stderr,
               disable=job.quiet, dynamic_ncols=True)  # fmt: skip
    finished: list[dict[str, Any]] = []

    def on_block(members: list[int], scored: list[Scored]) -> None:
        for m, sc in zip(members, scored, strict=True):
            n = owner[m]
            if n not in pending:
                continue
            got.setdefault(n, {})[m] = sc
            if len(got[n]) == len(scorings[n].requests):
                finished.append(_row(scorings[n], _in_order(got.pop(n)), job.tokens))
                pending.discard(n)

    try:
        for block in blocks:
            if stop.requested:
                break
            finished.clear()
            part = engine.score_rows(requests, block, on_block)
            with stop.writing():
                writer.write(finished)
            result.stats = part if result.stats is None else result.stats.merge(part)
            result.scored_tokens += sum(len(t) for row in block for t in row.targets)
            bar.update(len(finished))
    finally:
        bar.close()


def _in_order(by_request: dict[int, Scored]) -> list[Scored]:
    return [by_request[m] for m in sorted(by_request)]
