"""Long generate jobs: block-by-block output, resume, bad inputs that lose nothing, sampling that reproduces,
and text prompts -> text -> stop strings against Hugging Face with a real (tiny, trained) tokenizer."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from flexrun.cli import cli
from flexrun.jobs.results import job_path
from tests.hf_reference import tiny_opt
from tests.tiny_tokenizer import save_tiny_tokenizer

VOCAB = 300


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory):
    """A tiny OPT checkpoint with a trained byte-level BPE tokenizer, and its HF model and tokenizer."""
    _, model = tiny_opt(seed=5, vocab_size=VOCAB)
    d = tmp_path_factory.mktemp("jobs") / "ckpt"
    model.save_pretrained(d)
    tok = save_tiny_tokenizer(d, VOCAB)
    return d, model, tok


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stores")


def gen(ckpt, stores: Path, tmp_path: Path, *args: str, input: str | None = None):
    base = ["generate", "-m", str(ckpt[0]), "--store-dir", str(stores), "--offload-dir", str(tmp_path / "off")]
    # Few new tokens by default (a later --max-new-tokens wins): these tests are about the job, not the model.
    manual = ["--placement", "manual", "--gpu-batch-size", "2", "--quiet", "--max-new-tokens", "4"]
    return CliRunner().invoke(cli, [*base, *manual, *args], input=input)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_input(path: Path, n: int, length: int = 3) -> Path:
    """n input_ids records of varying length (so the length order differs from the input order)."""
    rows = [{"id": f"p{k}", "input_ids": [4 + (k * 7 + j) % 200 for j in range(length + k % 4)]} for k in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=1)
    return out[0, len(ids) :].tolist()


# ---- output, resume, overwrite -------------------------------------------------------------------------
def test_records_match_hf_and_resume_repairs_a_partial_line(ckpt, stores, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 7)
    full = tmp_path / "full.jsonl"
    r = gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(full), "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    rows = lines(full)
    # Every sequence once; longest prompts first (the default order), each block's records together.
    assert sorted(row["id"] for row in rows) == sorted(f"p{k}" for k in range(7))
    assert [len(row["input_ids"]) for row in rows] == sorted((len(row["input_ids"]) for row in rows), reverse=True)
    for row in rows:
        expected = hf_greedy(ckpt[1], row["input_ids"], 5)
        assert row["output_ids"] == expected[: len(row["output_ids"])]
        assert row["finish_reason"] in ("eos", "length") and "text" in row

    # A job killed after 3 blocks, mid-way through writing the 4th record: resume cuts the partial line.
    text = full.read_text()
    cut = tmp_path / "cut.jsonl"
    first = text.splitlines(keepends=True)
    cut.write_text("".join(first[:3]) + first[3][:17])
    job_path(cut).write_text(job_path(full).read_text())  # the job's description goes with its records
    r = gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(cut), "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    assert cut.read_text() == text
    # Done is done: a rerun generates nothing and changes nothing.
    r = gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(cut), "--max-new-tokens", "5")
    assert r.exit_code == 0 and "nothing to do" in r.output and cut.read_text() == text
    # --overwrite starts afresh, here in the input's order.
    r = gen(
        ckpt,
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
def test_output_of_another_job_is_refused_untouched(ckpt, stores, tmp_path: Path, existing: str, message: str) -> None:
    inp = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    # This job's own description next to records that are not its own (or not records at all).
    assert gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out)).exit_code == 0
    out.write_text(existing + '{"id": "partial')
    r = gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out))
    assert r.exit_code == 1 and message in r.output and "out.jsonl:1:" in r.output, r.output
    assert "--overwrite" in r.output and "Traceback" not in r.output
    assert out.read_text() == existing + '{"id": "partial'


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny OPT of the same shapes: other weights, no tokenizer."""
    _, model = tiny_opt(seed=6, vocab_size=VOCAB)
    d = tmp_path_factory.mktemp("other") / "other-opt"
    model.save_pretrained(d)
    return d


def test_resuming_with_another_model_or_settings_is_refused(ckpt, stores, other_ckpt, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    r = gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out), "--max-new-tokens", "3")
    assert r.exit_code == 0, r.output
    recorded = json.loads(job_path(out).read_text())["job"]
    assert recorded["model"] == "ckpt" and recorded["max_new_tokens"] == 3 and recorded["temperature"] == 0.0
    # The job stopped after two records; rerun with another model, more tokens and sampling.
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:2]))
    kept, kept_job = out.read_text(), job_path(out).read_text()
    other = ["-i", str(inp), "-o", str(out), "--max-new-tokens", "8", "--temperature", "0.9"]
    base = ["generate", "--store-dir", str(stores), "--offload-dir", str(tmp_path / "off"), "-q"]
    r = CliRunner().invoke(cli, [*base, "-m", str(other_ckpt), "--placement", "manual", *other])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    (line,) = r.output.splitlines()
    assert "out.jsonl holds 2 records of another job" in line
    assert "model ckpt (weights " in line and "other-opt (weights " in line
    assert "--max-new-tokens 3 there, 8 here" in line and "--temperature 0.0 there, 0.9 here" in line
    assert "--top-p" not in line  # follows from the temperature: a greedy job has no top-p
    assert "--overwrite" in line and "--output" in line
    assert out.read_text() == kept and job_path(out).read_text() == kept_job
    # The same model with one other setting is refused as well, naming only that setting.
    r = gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out), "--max-new-tokens", "3", "--stop", "zz")
    assert r.exit_code == 1 and '(--stop [] there, ["zz"] here)' in r.output, r.output
    # --overwrite starts the other job afresh, with its own description; that job then resumes.
    r = CliRunner().invoke(cli, [*base, "-m", str(other_ckpt), "--placement", "manual", *other, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert len(lines(out)) == 3 and json.loads(job_path(out).read_text())["job"]["model"] == "other-opt"
    full = out.read_text()
    out.write_text("".join(full.splitlines(keepends=True)[:1]))
    r = CliRunner().invoke(cli, [*base, "-m", str(other_ckpt), "--placement", "manual", *other])
    assert r.exit_code == 0 and out.read_text() == full, r.output


def test_records_without_a_job_description_are_refused(ckpt, stores, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    assert gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out)).exit_code == 0
    full = out.read_text()
    job_path(out).unlink()  # e.g. records from an older flexrun, or copied without their description
    out.write_text(full.splitlines(keepends=True)[0])
    r = gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out))
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "out.jsonl holds 1 record but has no out.jsonl.job.json" in r.output and "--overwrite" in r.output
    assert out.read_text() == full.splitlines(keepends=True)[0] and not job_path(out).exists()
    # An empty file (one a failed run created) has nothing to mix up: the job runs.
    out.write_text("")
    r = gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out))
    assert r.exit_code == 0 and out.read_text() == full, r.output
    # A damaged description is refused, never guessed at.
    job_path(out).write_text('{"format": ')
    r = gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out))
    assert r.exit_code == 1 and "out.jsonl.job.json: damaged job description" in r.output, r.output


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
def test_every_setting_that_changes_the_records_is_in_the_fingerprint(ckpt, stores, change, named) -> None:
    from dataclasses import replace

    from flexrun.jobs.fingerprint import job_differences, job_fingerprint
    from flexrun.jobs.options import JobOptions
    from flexrun.resolver import ensure_store
    from flexrun.runtime.sampling import SamplingParams

    store = ensure_store(str(ckpt[0]), store_root=stores, progress=False)
    job = JobOptions(params=SamplingParams(max_new_tokens=4, temperature=0.5))
    params = {k: v for k, v in change.items() if hasattr(job.params, k)}
    other = replace(job, params=replace(job.params, **params), **{k: v for k, v in change.items() if k not in params})
    # Through JSON, as the description is kept on disk.
    recorded = json.loads(json.dumps(job_fingerprint(store, job)))
    assert job_differences(recorded, job_fingerprint(store, other)) == [named]
    assert job_differences(recorded, job_fingerprint(store, job)) == []


def test_fingerprint_names_the_weights_and_ignores_what_greedy_decoding_does_not_use(ckpt, stores, tmp_path) -> None:
    from dataclasses import replace

    from flexrun.jobs.fingerprint import job_differences, job_fingerprint
    from flexrun.jobs.options import JobOptions
    from flexrun.resolver import ensure_store
    from flexrun.runtime.sampling import SamplingParams

    store = ensure_store(str(ckpt[0]), store_root=stores, progress=False)
    greedy = JobOptions(params=SamplingParams(max_new_tokens=4))
    seeded = replace(greedy, params=replace(greedy.params, seed=9, top_k=3, top_p=0.5))
    assert job_differences(job_fingerprint(store, greedy), job_fingerprint(store, seeded)) == []
    # The same weights converted elsewhere are the same model; another dtype is another one.
    moved = ensure_store(str(ckpt[0]), store_root=tmp_path / "elsewhere", progress=False)
    assert job_differences(job_fingerprint(store, greedy), job_fingerprint(moved, greedy)) == []
    half = ensure_store(str(ckpt[0]), dtype="bfloat16", store_root=tmp_path / "half", progress=False)
    diffs = job_differences(job_fingerprint(store, greedy), job_fingerprint(half, greedy))
    assert diffs[0].startswith("model ckpt (weights ") and diffs[1:] == ["--dtype float32 there, bfloat16 here"]


def test_fingerprint_names_the_tokenizer(ckpt, stores, tmp_path) -> None:
    import shutil

    from flexrun.jobs.fingerprint import job_differences, job_fingerprint
    from flexrun.jobs.options import JobOptions
    from flexrun.resolver import ensure_store
    from flexrun.runtime.sampling import SamplingParams
    from flexrun.weights.store import TensorStore

    store = ensure_store(str(ckpt[0]), store_root=stores, progress=False)
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


def test_json_summary_is_one_line_on_stderr_and_the_records_stay_alone_on_stdout(ckpt, stores, tmp_path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 3)
    for output in ([], ["-o", str(tmp_path / "out.jsonl")]):
        r = gen(ckpt, stores, tmp_path, "-i", str(inp), "--json", *output)
        assert r.exit_code == 0, r.output
        rows = [json.loads(line) for line in r.stdout.splitlines()]
        assert len(rows) == (0 if output else 3) and all("output_ids" in row for row in rows)
        summary = json.loads(r.stderr.splitlines()[-1])
        assert summary["sequences"] == 3 and summary["generated_tokens"] >= 3, r.stderr
    assert "one JSON line on stderr" in CliRunner().invoke(cli, ["generate", "-h"]).stdout
    assert "JSON on stdout" in CliRunner().invoke(cli, ["bench", "-h"]).stdout


# ---- bad inputs: one line, exit 1, nothing written is lost ---------------------------------------------
GOOD = '{"id": "a", "input_ids": [5, 6, 7]}\n'
DONE = '{"id": "a", "input_ids": [5, 6, 7], "output_ids": [8]}\n'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (GOOD + '{"input_ids": [3,\n', "in.jsonl:2: malformed JSON"),
        (GOOD + '{"text": "hi"}\n', 'in.jsonl:2: record has neither "prompt" nor "input_ids"'),
        (GOOD + '{"input_ids": [4, 300]}\n', "in.jsonl:2: token id 300 is outside the vocabulary (0..299)"),
        (GOOD + '{"input_ids": [4, -1]}\n', "in.jsonl:2: token id -1 is outside the vocabulary"),
        (GOOD + '{"input_ids": []}\n', "in.jsonl:2: empty prompt"),
        (GOOD + '{"input_ids": ' + json.dumps([5] * 60) + "}\n", "in.jsonl:2: prompt has 60 tokens"),
        (GOOD + '{"id": "a", "input_ids": [4]}\n', "in.jsonl:2: id 'a' repeats line 1"),
        ("\n\n", "no prompts"),
    ],
)
def test_bad_input_loses_nothing(ckpt, stores, tmp_path: Path, content: str, message: str) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text(content)
    out = tmp_path / "out.jsonl"
    out.write_text(DONE)
    r = gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out), "--max-new-tokens", "8")
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output, r.output
    assert len([line for line in r.output.splitlines() if line.startswith("Error")]) == 1
    assert out.read_text() == DONE


def test_truncate_left_keeps_the_end_of_a_long_prompt(ckpt, stores, tmp_path: Path) -> None:
    long = [4 + k % 150 for k in range(70)]
    r = gen(ckpt, stores, tmp_path, "-i", "-", "--max-new-tokens", "4", input=json.dumps({"input_ids": long}))
    assert r.exit_code == 1 and "exceeds the model's 64 positions (--truncate left keeps its last 60" in r.output
    r = gen(
        ckpt,
        stores,
        tmp_path,
        "-i",
        "-",
        "--max-new-tokens",
        "4",
        "--truncate",
        "left",
        input=json.dumps({"input_ids": long}),
    )
    assert r.exit_code == 0, r.output
    (row,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert row["input_ids"] == long[10:] and row["truncated"] == 10
    assert row["output_ids"] == hf_greedy(ckpt[1], long[10:], 4)[: len(row["output_ids"])]
    r = gen(ckpt, stores, tmp_path, "-p", "x", "--max-new-tokens", "64")
    assert r.exit_code == 1 and "--max-new-tokens 64 leaves no room for a prompt" in r.output


def _fail_on_output(monkeypatch: pytest.MonkeyPatch, name: str, err: int, after: int) -> None:
    """Make ``os.<name>`` fail with ``err`` for the results file (not the engine's files) after ``after`` calls."""
    real = getattr(os, name)
    calls = {"n": 0}

    def fake(fd_or_path, *args, **kwargs):
        target = fd_or_path if isinstance(fd_or_path, (str, Path)) else os.readlink(f"/proc/self/fd/{fd_or_path}")
        if str(target).endswith("out.jsonl"):
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(err, os.strerror(err))
        return real(fd_or_path, *args, **kwargs)

    monkeypatch.setattr(os, name, fake)


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to tell the results file's fd")
def test_full_disk_mid_job_keeps_the_finished_blocks_and_resumes(ckpt, stores, tmp_path, monkeypatch) -> None:
    inp = write_input(tmp_path / "in.jsonl", 6)
    ref = tmp_path / "ref.jsonl"
    assert gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(ref)).exit_code == 0
    out = tmp_path / "out.jsonl"
    with monkeypatch.context() as m:
        _fail_on_output(m, "fsync", errno.ENOSPC, after=1)  # the second block's fsync finds the disk full
        r = gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "cannot write" in r.output and "No space left on device" in r.output
    assert "keeps the 2 records written before" in r.output and "resume" in r.output
    assert out.read_text() == "".join(ref.read_text().splitlines(keepends=True)[:2])
    r = gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out))
    assert r.exit_code == 0 and out.read_text() == ref.read_text()


def test_read_only_output_is_refused_before_any_work(ckpt, stores, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(DONE)
    _fail_on_output(monkeypatch, "open", errno.EACCES, after=0)
    r = gen(ckpt, stores, tmp_path, "-i", "-", "-o", str(out), input=GOOD + '{"input_ids": [4]}\n')
    assert r.exit_code == 1 and "cannot write" in r.output and "Permission denied" in r.output, r.output
    assert out.read_text() == DONE


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through permissions")
def test_read_only_directory(ckpt, stores, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        r = gen(ckpt, stores, tmp_path, "-p", "hi", "-o", str(ro / "out.jsonl"))
    finally:
        ro.chmod(0o700)
    assert r.exit_code == 1 and "Permission denied" in r.output


def test_offload_dir_without_room_is_refused_up_front(ckpt, stores, tmp_path, monkeypatch) -> None:
    import shutil

    out = tmp_path / "out.jsonl"
    assert gen(ckpt, stores, tmp_path, "-i", "-", "-o", str(out), input=GOOD).exit_code == 0  # a job's first record
    done = out.read_text()
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    args = ["-i", "-", "-o", str(out), "--cache", "disk=100"]
    r = gen(ckpt, stores, tmp_path, *args, input=GOOD + '{"input_ids": [4]}\n')
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "the disk tier needs" in r.output and "has 4.0 KiB free" in r.output and "--offload-dir" in r.output
    assert out.read_text() == done
    # The planner (auto placement) refuses as clearly, naming the offload dir's free space.
    base = ["generate", "-m", str(ckpt[0]), "--store-dir", str(stores), "--offload-dir", str(tmp_path / "off")]
    r = CliRunner().invoke(cli, [*base, *args, "-q", "--max-new-tokens", "4"], input=GOOD + '{"input_ids": [4]}\n')
    assert r.exit_code == 1 and "disk tier is short" in r.output and "4.0 KiB free" in r.output, r.output
    assert out.read_text() == done


# ---- sampling -------------------------------------------------------------------------------------------
def test_seeded_sampling_reproduces_across_runs_and_micro_batch_sizes(ckpt, stores, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 5)
    sampling = ["--temperature", "1.3", "--top-k", "50", "--top-p", "0.95", "--repetition-penalty", "1.2"]
    sampling += ["--seed", "7", "-n", "2", "--max-new-tokens", "6"]

    def run(*placement: str) -> dict:
        base = ["generate", "-m", str(ckpt[0]), "--store-dir", str(stores), "-i", str(inp), "-q", *sampling]
        r = CliRunner().invoke(cli, [*base, "--placement", "manual", *placement])
        assert r.exit_code == 0, r.output
        return {(row["id"], row["seq"]): row["output_ids"] for row in map(json.loads, r.stdout.splitlines())}

    first = run("--gpu-batch-size", "2")
    assert len(first) == 10
    assert run("--gpu-batch-size", "2") == first
    assert run("--gpu-batch-size", "1", "--num-gpu-batches", "3", "--order", "input") == first
    assert run("--gpu-batch-size", "4", "--num-gpu-batches", "2", "--weights", "disk=100") == first
    # Each return sequence is its own sample, and the seed matters.
    assert any(first[(f"p{k}", 0)] != first[(f"p{k}", 1)] for k in range(5))
    other = run("--gpu-batch-size", "2", "--seed", "8")
    assert other != first


def test_several_sequences_need_sampling(ckpt, stores, tmp_path: Path) -> None:
    r = gen(ckpt, stores, tmp_path, "-p", "hi", "-n", "3")
    assert r.exit_code == 2 and "--num-return-sequences" in r.output


# ---- text in, text out, stop strings, streaming (real tokenizer) ----------------------------------------
def test_text_prompts_stop_strings_and_streaming_match_hf(ckpt, stores, tmp_path: Path) -> None:
    _, model, tok = ckpt
    prompts = ["the quick brown fox", "hello world, this", "a small café", "numbers: 1 2"]
    new = 16
    refs = {}
    for p in prompts:
        ids = tok(p)["input_ids"]
        out = hf_greedy(model, ids, new)
        refs[p] = (ids, out, tok.decode(out, skip_special_tokens=True))
    # A stop string taken from the middle of the longest HF completion.
    p_stop = max(prompts, key=lambda p: len(refs[p][2].replace("\ufffd", "")))
    clean = refs[p_stop][2]
    at = next(
        i for i in range(len(clean) // 3, len(clean)) if clean[i : i + 2].strip() and "\ufffd" not in clean[i : i + 2]
    )
    stop = clean[at : at + 2]

    args = ["--max-new-tokens", str(new), "--stop", stop]
    r = gen(ckpt, stores, tmp_path, *[a for p in prompts for a in ("-p", p)], *args)
    assert r.exit_code == 0, r.output
    rows = {row["prompt"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert set(rows) == set(prompts)
    for p, (ids, out, text) in refs.items():
        row = rows[p]
        assert row["input_ids"] == ids
        if stop in text:
            # HF's tokens up to the one that completes the stop string; the text ends before it.
            t = next(t for t in range(1, len(out) + 1) if stop in tok.decode(out[:t], skip_special_tokens=True))
            assert row["output_ids"] == out[:t] and row["text"] == text[: text.index(stop)]
            assert row["finish_reason"] == "stop"
        else:
            assert row["output_ids"] == out[: len(row["output_ids"])]
            assert row["text"] == tok.decode(row["output_ids"], skip_special_tokens=True)
    assert rows[p_stop]["finish_reason"] == "stop"

    # --stream prints the same texts as they are produced, one completion per line, in input order.
    r = gen(ckpt, stores, tmp_path, *[a for p in prompts for a in ("-p", p)], *args, "--stream", "--order", "input")
    assert r.exit_code == 0, r.output
    assert r.stdout == "".join(rows[p]["text"] + "\n" for p in prompts)


def test_a_prompt_that_is_a_path_is_text(ckpt, stores, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the quick brown fox " * 20)
    r = gen(
        ckpt,
        stores,
        tmp_path,
        "-i",
        "-",
        "--max-new-tokens",
        "2",
        "--truncate",
        "left",
        input=json.dumps({"prompt": str(secret)}),
    )
    assert r.exit_code == 0, r.output
    (row,) = [json.loads(line) for line in r.stdout.splitlines()]
    # The path's own tokens (the end that fits the context), not the file's.
    assert row["prompt"] == str(secret) and row["input_ids"] == ckpt[2](str(secret))["input_ids"][-62:]


def test_an_abandoned_block_leaves_the_finished_ones(ckpt, stores, tmp_path, monkeypatch) -> None:
    from flexrun.runtime.engine import Engine

    inp = write_input(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out.jsonl"
    real, calls = Engine.generate, {"n": 0}

    def generate(self, *args, **kwargs):
        calls["n"] += 1
        assert job_path(out).exists(), "the job's description is written before its first record"
        if calls["n"] == 2:  # what a second Ctrl-C does in the middle of the second block
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", generate)
    r = gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out))
    assert r.exit_code == 130 and "abandoning the block in flight" in r.output, r.output
    assert f"{out} keeps the 2 records finished before; run the same command again to resume" in r.output
    assert len(lines(out)) == 2


def test_output_cannot_be_the_input(ckpt, stores, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 2)
    before = inp.read_text()
    r = gen(ckpt, stores, tmp_path, "-i", str(inp), "-o", str(inp))
    assert r.exit_code == 1 and "is the input file" in r.output and inp.read_text() == before
