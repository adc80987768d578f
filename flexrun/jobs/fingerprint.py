"""What identifies a generate job (the model's weights and tokenizer, every setting that changes the
records), and the check that an output file holds records of this job and no other before it is resumed."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from flexrun.errors import InputError
from flexrun.jobs.options import JobOptions
from flexrun.jobs.prompts import Sequence
from flexrun.jobs.results import Existing, job_path, read_job, scan
from flexrun.weights.store import TensorStore

log = logging.getLogger(__name__)


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


def job_fingerprint(
    store: TensorStore, job: JobOptions, compute_dtype: str | None = None, compress_cache: str = "", tp: int = 1
) -> dict[str, Any]:
    """Everything apart from the prompts (checked record by record) that decides a job's records. The
    placement and ``--order`` are left out: they change how fast the records come, not what they hold; so
    are the sampling options of a greedy job, which only the repetition penalty affects. The compute dtype
    is recorded only when it differs from the weights' (so jobs that never had one still resume), the
    weight and cache compression only when there is one (the weights' is in their digest too: it is
    recorded by name for a resume to choose it again), the tokenizer only when the store has one, the
    tensor-parallel ranks only when there are several (their sums round differently)."""
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
    if store.weight_compression:
        fp["compress_weight"] = store.weight_compression
    if compress_cache:
        fp["compress_cache"] = compress_cache
    if tp > 1:
        fp["tp"] = tp
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
    "compress_weight": "--compress-weight",
    "compress_cache": "--compress-cache",
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
    "tp": "--tp",
}


def job_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the job that wrote a file and this one, e.g. ``--max-new-tokens 3 there, 8 here``.

    A setting that only one side has (the sampling options of a greedy job) follows from one that both
    have, which is the one named. A description without a tokenizer (from a store without one, or written
    before flexrun recorded them) is not held to one."""
    if "tokenizer" not in recorded:
        current = {k: v for k, v in current.items() if k != "tokenizer"}
    if "compress_weight" not in recorded and recorded.get("weights") == current["weights"]:
        current = {k: v for k, v in current.items() if k != "compress_weight"}  # recorded before it was named
    diffs = []
    weights = [f.get("compress_weight") or "none" for f in (recorded, current)]
    if weights[0] != weights[1] and recorded.get("model") == current["model"]:
        diffs.append(f"--compress-weight {weights[0]} there, {weights[1]} here")
    elif recorded.get("weights") != current["weights"]:
        there = f"{recorded.get('model')} (weights {str(recorded.get('weights'))[:8]})"
        diffs.append(f"model {there} there, {current['model']} (weights {current['weights'][:8]}) here")
    elif recorded.get("tokenizer") != current.get("tokenizer"):  # another model's tokenizer goes without saying
        there, here = (str(f.get("tokenizer") or "none")[:8] for f in (recorded, current))
        diffs.append(f"tokenizer {there} there, {here} here")
    computed = [f.get("compute_dtype", f.get("dtype")) for f in (recorded, current)]
    if computed[0] != computed[1] and recorded.get("dtype") == current.get("dtype"):
        diffs.append(f"--compute-dtype {computed[0]} there, {computed[1]} here")
    cache = [f.get("compress_cache") or "off" for f in (recorded, current)]
    if cache[0] != cache[1]:
        diffs.append(f"--compress-cache {cache[0]} there, {cache[1]} here")
    ranks = [f.get("tp", 1) for f in (recorded, current)]
    if ranks[0] != ranks[1]:
        diffs.append(f"--tp {ranks[0]} there, {ranks[1]} here")
    for key, value in current.items():
        skip = ("model", "weights", "tokenizer", "compute_dtype", "compress_weight", "compress_cache", "tp")
        if key in skip or key not in recorded or recorded[key] == value:
            continue
        diffs.append(f"{_OPTION.get(key, key)} {_show(recorded[key])} there, {_show(value)} here")
    if not diffs and _settings(recorded) != _settings(current):
        diffs.append("other settings")  # a description from elsewhere: refused all the same
    return diffs


def recorded_choices(path: Path) -> dict[str, str]:
    """The compression and compute dtype of the job whose records ``path`` holds ({} when none is recorded),
    as ``EngineOptions.settled`` takes them: a resumed job keeps what the planner chose when it started,
    whatever it would choose today (other free memory, other budgets)."""
    recorded = read_job(path)
    if recorded is None:
        return {}
    return {
        "compress_weight": str(recorded.get("compress_weight") or ""),
        "compress_cache": str(recorded.get("compress_cache") or ""),
        "compute_dtype": str(recorded.get("compute_dtype") or recorded.get("dtype") or "auto"),
    }


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
    by_key = {s.key: s for s in seqs}
    fix = "choose another --output, or --overwrite to start afresh"

    def check(lineno: int, rec: dict[str, Any], key: tuple[str, int]) -> str | None:
        s = by_key.get(key)
        what = f"id {rec['id']!r}" + (f" seq {key[1]}" if key[1] else "")
        if s is None:
            return f"{path}:{lineno}: {what} is not a sequence of this job ({source}); {fix}"
        if rec.get("input_ids") != s.ids:
            return f"{path}:{lineno}: {what} was generated from other prompt tokens than {s.record.where}; {fix}"
        return None

    existing = scan(path, check)
    _check_same_job(path, existing, fingerprint)  # another job's records: that is the complaint, first
    if existing.problem is not None:
        raise InputError(existing.problem)
    if existing.partial:
        log.info("%s ends with a partial record; it is cut off and generated again", path)
    return set(existing.records), existing.good_bytes
