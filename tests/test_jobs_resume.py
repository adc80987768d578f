"""Resuming a generate job: its records match HF, a partial last line is repaired, done is done and
--overwrite starts afresh; records of another job (another model or setting, or without a job description)
are refused untouched; and the job fingerprint that tells them apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexrun.jobs.results import job_path
from tests.helpers import JOB_VOCAB, gen, lines, run, write_input
from tests.hf_reference import hf_tokens, save_tiny_opt


# ---- output, resume, overwrite --------------------------------------------------------------------------
def test_records_match_hf_and_resume_repairs_a_partial_line(job_ckpt, stores, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 7)
    full = tmp_path / "full.jsonl"
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(full), "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    rows = lines(full)
    # Every sequence once; longest prompts first (the default order), each block's records together.
    assert sorted(row["id"] for row in rows) == sorted(f"p{k}" for k in range(7))
    assert [len(row["input_ids"]) for row in rows] == sorted((len(row["input_ids"]) for row in rows), reverse=True)
    for row in rows:
        expected = hf_tokens(job_ckpt.model, row["input_ids"], 5)
        assert row["output_ids"] == expected[: len(row["output_ids"])]
        assert row["finish_reason"] in ("eos", "length") and "text" in row

    # A job killed after 3 blocks, mid-way through writing the 4th record: resume cuts the partial line.
    text = full.read_text()
    cut = tmp_path / "cut.jsonl"
    first = text.splitlines(keepends=True)
    cut.write_text("".join(first[:3]) + first[3][:17])
    job_path(cut).write_text(job_path(full).read_text())  # the job's description goes with its records
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(cut), "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    assert cut.read_text() == text
    # Done is done: a rerun generates nothing and changes nothing.
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(cut), "--max-new-tokens", "5")
    assert r.exit_code == 0 and "nothing to do" in r.output and cut.read_text() == text
    # --overwrite starts afresh, here in the input's order.
    r = gen(
        job_ckpt,
        stores,
        tmp_path,
        "-i",
        str(inp),
        "-o",
        str(cut),
        "--max-new-tokens",
        "5",
        "--overwrite",
        "--order",
        "input",
    )
    assert r.exit_code == 0, r.output
    assert [row["id"] for row in lines(cut)] == [f"p{k}" for k in range(7)]
    assert sorted(lines(cut), key=lambda row: row["id"]) == sorted(rows, key=lambda row: row["id"])


@pytest.mark.parametrize(
    ("existing", "message"),
    [
        ('{"id": "zz", "input_ids": [4], "output_ids": [5]}\n', "id 'zz' is not a sequence of this job"),
        ('{"id": "p1", "input_ids": [9, 9], "output_ids": [5]}\n', "was generated from other prompt tokens"),
        ("some notes, not results\n", "not a flexrun result record"),
    ],
)
def test_output_of_another_job_is_refused_untouched(
    job_ckpt, stores, tmp_path: Path, existing: str, message: str
) -> None:
    inp = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    # This job's own description next to records that are not its own (or not records at all).
    assert gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out)).exit_code == 0
    out.write_text(existing + '{"id": "partial')
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out))
    assert r.exit_code == 1 and message in r.output and "out.jsonl:1:" in r.output, r.output
    assert "--overwrite" in r.output and "Traceback" not in r.output
    assert out.read_text() == existing + '{"id": "partial'


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny OPT of the same shapes: other weights, no tokenizer."""
    return save_tiny_opt(tmp_path_factory.mktemp("other") / "other-opt", seed=6, vocab_size=JOB_VOCAB).path


def test_resuming_with_another_model_or_settings_is_refused(job_ckpt, stores, other_ckpt, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out), "--max-new-tokens", "3")
    assert r.exit_code == 0, r.output
    recorded = json.loads(job_path(out).read_text())["job"]
    assert recorded["model"] == "ckpt" and recorded["max_new_tokens"] == 3 and recorded["temperature"] == 0.0
    # The job stopped after two records; rerun with another model, more tokens and sampling.
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:2]))
    kept, kept_job = out.read_text(), job_path(out).read_text()
    other = ["-i", str(inp), "-o", str(out), "--max-new-tokens", "8", "--temperature", "0.9"]
    base = ["generate", "--store-dir", str(stores), "--offload-dir", str(tmp_path / "off"), "-q"]
    r = run(*base, "-m", str(other_ckpt), "--placement", "manual", *other)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    (line,) = r.output.splitlines()
    assert "out.jsonl holds 2 records of another job" in line
    assert "model ckpt (weights " in line and "other-opt (weights " in line
    assert "--max-new-tokens 3 there, 8 here" in line and "--temperature 0.0 there, 0.9 here" in line
    assert "--top-p" not in line  # follows from the temperature: a greedy job has no top-p
    assert "--overwrite" in line and "--output" in line
    assert out.read_text() == kept and job_path(out).read_text() == kept_job
    # The same model with one other setting is refused as well, naming only that setting.
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out), "--max-new-tokens", "3", "--stop", "zz")
    assert r.exit_code == 1 and '(--stop [] there, ["zz"] here)' in r.output, r.output
    # --overwrite starts the other job afresh, with its own description; that job then resumes.
    r = run(*base, "-m", str(other_ckpt), "--placement", "manual", *other, "--overwrite")
    assert r.exit_code == 0, r.output
    assert len(lines(out)) == 3 and json.loads(job_path(out).read_text())["job"]["model"] == "other-opt"
    full = out.read_text()
    out.write_text("".join(full.splitlines(keepends=True)[:1]))
    r = run(*base, "-m", str(other_ckpt), "--placement", "manual", *other)
    assert r.exit_code == 0 and out.read_text() == full, r.output


def test_records_without_a_job_description_are_refused(job_ckpt, stores, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    assert gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out)).exit_code == 0
    full = out.read_text()
    job_path(out).unlink()  # e.g. records from an older flexrun, or copied without their description
    out.write_text(full.splitlines(keepends=True)[0])
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out))
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "out.jsonl holds 1 record but has no out.jsonl.job.json" in r.output and "--overwrite" in r.output
    assert out.read_text() == full.splitlines(keepends=True)[0] and not job_path(out).exists()
    # An empty file (one a failed run created) has nothing to mix up: the job runs.
    out.write_text("")
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out))
    assert r.exit_code == 0 and out.read_text() == full, r.output
    # A damaged description is refused, never guessed at.
    job_path(out).write_text('{"format": ')
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out))
    assert r.exit_code == 1 and "out.jsonl.job.json: damaged job description" in r.output, r.output


# ---- the job fingerprint --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"max_new_tokens": 8}, "--max-new-tokens 4 there, 8 here"),
        ({"temperature": 0.7}, "--temperature 0.5 there, 0.7 here"),
        ({"top_p": 0.9}, "--top-p 1.0 there, 0.9 here"),
        ({"top_k": 5}, "--top-k 0 there, 5 here"),
        ({"repetition_penalty": 1.3}, "--repetition-penalty 1.0 there, 1.3 here"),
        ({"seed": 2}, "--seed 0 there, 2 here"),
        ({"stop": ("x",)}, '--stop [] there, ["x"] here'),
        ({"num_return_sequences": 2}, "--num-return-sequences 1 there, 2 here"),
        ({"chat": True}, "--chat false there, true here"),
        ({"truncate": "left"}, "--truncate none there, left here"),
    ],
)
def test_every_setting_that_changes_the_records_is_in_the_fingerprint(job_ckpt, stores, change, named) -> None:
    from dataclasses import replace

    from flexrun.jobs.fingerprint import job_differences, job_fingerprint
    from flexrun.jobs.options import JobOptions
    from flexrun.resolver import ensure_store
    from flexrun.runtime.sampling import SamplingParams

    store = ensure_store(str(job_ckpt.path), store_root=stores, progress=False)
    job = JobOptions(params=SamplingParams(max_new_tokens=4, temperature=0.5))
    params = {k: v for k, v in change.items() if hasattr(job.params, k)}
    other = replace(job, params=replace(job.params, **params), **{k: v for k, v in change.items() if k not in params})
    # Through JSON, as the description is kept on disk.
    recorded = json.loads(json.dumps(job_fingerprint(store, job)))
    assert job_differences(recorded, job_fingerprint(store, other)) == [named]
    assert job_differences(recorded, job_fingerprint(store, job)) == []


def test_fingerprint_names_the_weights_and_ignores_what_greedy_decoding_does_not_use(
    job_ckpt, stores, tmp_path
) -> None:
    from dataclasses import replace

    from flexrun.jobs.fingerprint import job_differences, job_fingerprint
    from flexrun.jobs.options import JobOptions
    from flexrun.resolver import ensure_store
    from flexrun.runtime.sampling import SamplingParams

    store = ensure_store(str(job_ckpt.path), store_root=stores, progress=False)
    greedy = JobOptions(params=SamplingParams(max_new_tokens=4))
    seeded = replace(greedy, params=replace(greedy.params, seed=9, top_k=3, top_p=0.5))
    assert job_differences(job_fingerprint(store, greedy), job_fingerprint(store, seeded)) == []
    # The same weights converted elsewhere are the same model; another dtype is another one.
    moved = ensure_store(str(job_ckpt.path), store_root=tmp_path / "elsewhere", progress=False)
    assert job_differences(job_fingerprint(store, greedy), job_fingerprint(moved, greedy)) == []
    half = ensure_store(str(job_ckpt.path), dtype="bfloat16", store_root=tmp_path / "half", progress=False)
    diffs = job_differences(job_fingerprint(store, greedy), job_fingerprint(half, greedy))
    assert diffs[0].startswith("model ckpt (weights ") and diffs[1:] == ["--dtype float32 there, bfloat16 here"]


def test_fingerprint_names_the_tokenizer(job_ckpt, stores, tmp_path) -> None:
    import shutil

    from flexrun.jobs.fingerprint import job_differences, job_fingerprint
    from flexrun.jobs.options import JobOptions
    from flexrun.resolver import ensure_store
    from flexrun.runtime.sampling import SamplingParams
    from flexrun.weights.store import TensorStore

    store = ensure_store(str(job_ckpt.path), store_root=stores, progress=False)
    job = JobOptions(params=SamplingParams(max_new_tokens=4))
    recorded = json.loads(json.dumps(job_fingerprint(store, job)))
    assert len(recorded["tokenizer"]) == 16
    # The same weights with an edited tokenizer file: the prompts' ids and the records' text may differ.
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    config = copy / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text() + "\n")
    edited = job_fingerprint(TensorStore(copy), job)
    assert edited["weights"] == recorded["weights"] and edited["tokenizer"] != recorded["tokenizer"]
    there, here = recorded["tokenizer"][:8], edited["tokenizer"][:8]
    assert job_differences(recorded, edited) == [f"tokenizer {there} there, {here} here"]
    # A description written before tokenizers were recorded still resumes.
    older = {k: v for k, v in recorded.items() if k != "tokenizer"}
    assert job_differences(older, job_fingerprint(store, job)) == []
