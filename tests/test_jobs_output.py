"""What a generate job writes: the --json summary on stderr apart from the records on stdout, seeded sampling
that reproduces across runs and micro-batch sizes, and text prompts -> text -> stop strings and --stream
against Hugging Face with a real (tiny, trained) tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import gen, run, write_input
from tests.hf_reference import hf_tokens


# ---- --json: the summary apart from the records ---------------------------------------------------------
def test_json_summary_is_one_line_on_stderr_and_the_records_stay_alone_on_stdout(job_ckpt, stores, tmp_path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 3)
    for output in ([], ["-o", str(tmp_path / "out.jsonl")]):
        r = gen(job_ckpt, stores, tmp_path, "-i", str(inp), "--json", *output)
        assert r.exit_code == 0, r.output
        rows = [json.loads(line) for line in r.stdout.splitlines()]
        assert len(rows) == (0 if output else 3) and all("output_ids" in row for row in rows)
        summary = json.loads(r.stderr.splitlines()[-1])
        assert summary["sequences"] == 3 and summary["generated_tokens"] >= 3, r.stderr
    assert "one JSON line on stderr" in run("generate", "-h").stdout
    assert "JSON on stdout" in run("bench", "-h").stdout


# ---- sampling -------------------------------------------------------------------------------------------
def test_seeded_sampling_reproduces_across_runs_and_micro_batch_sizes(job_ckpt, stores, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 5)
    sampling = ["--temperature", "1.3", "--top-k", "50", "--top-p", "0.95", "--repetition-penalty", "1.2"]
    sampling += ["--seed", "7", "-n", "2", "--max-new-tokens", "6"]

    def sample(*placement: str) -> dict:
        base = ["generate", "-m", str(job_ckpt.path), "--store-dir", str(stores), "-i", str(inp), "-q", *sampling]
        r = run(*base, "--placement", "manual", *placement)
        assert r.exit_code == 0, r.output
        return {(row["id"], row["seq"]): row["output_ids"] for row in map(json.loads, r.stdout.splitlines())}

    first = sample("--gpu-batch-size", "2")
    assert len(first) == 10
    assert sample("--gpu-batch-size", "2") == first
    assert sample("--gpu-batch-size", "1", "--num-gpu-batches", "3", "--order", "input") == first
    assert sample("--gpu-batch-size", "4", "--num-gpu-batches", "2", "--weights", "disk=100") == first
    # Each return sequence is its own sample, and the seed matters.
    assert any(first[(f"p{k}", 0)] != first[(f"p{k}", 1)] for k in range(5))
    other = sample("--gpu-batch-size", "2", "--seed", "8")
    assert other != first


def test_several_sequences_need_sampling(job_ckpt, stores, tmp_path: Path) -> None:
    r = gen(job_ckpt, stores, tmp_path, "-p", "hi", "-n", "3")
    assert r.exit_code == 2 and "--num-return-sequences" in r.output


# ---- text in, text out, stop strings, streaming (real tokenizer) ----------------------------------------
def test_text_prompts_stop_strings_and_streaming_match_hf(job_ckpt, stores, tmp_path: Path) -> None:
    _, model, tok = job_ckpt
    prompts = ["the quick brown fox", "hello world, this", "a small café", "numbers: 1 2"]
    new = 16
    refs = {}
    for p in prompts:
        ids = tok(p)["input_ids"]
        out = hf_tokens(model, ids, new)
        refs[p] = (ids, out, tok.decode(out, skip_special_tokens=True))
    # A stop string taken from the middle of the longest HF completion.
    p_stop = max(prompts, key=lambda p: len(refs[p][2].replace("\ufffd", "")))
    clean = refs[p_stop][2]
    at = next(
        i for i in range(len(clean) // 3, len(clean)) if clean[i : i + 2].strip() and "\ufffd" not in clean[i : i + 2]
    )
    stop = clean[at : at + 2]

    args = ["--max-new-tokens", str(new), "--stop", stop]
    r = gen(job_ckpt, stores, tmp_path, *[a for p in prompts for a in ("-p", p)], *args)
    assert r.exit_code == 0, r.output
    rows = {row["prompt"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert set(rows) == set(prompts)
    for p, (ids, out, text) in refs.items():
        row = rows[p]
        assert row["input_ids"] == ids
        if stop in text:
            # The text ends before the stop string, and output_ids with it: HF's fewest tokens whose text
            # covers what comes before it (none that lies wholly in the stop string).
            cut = text.index(stop)
            t = next(t for t in range(len(out) + 1) if len(tok.decode(out[:t], skip_special_tokens=True)) >= cut)
            assert row["output_ids"] == out[:t] and row["text"] == text[:cut]
            assert row["finish_reason"] == "stop"
        else:
            assert row["output_ids"] == out[: len(row["output_ids"])]
            assert row["text"] == tok.decode(row["output_ids"], skip_special_tokens=True)
    assert rows[p_stop]["finish_reason"] == "stop"

    # --format text prints the same texts as they are produced, in input order, each under its prompt; the
    # micro-batches stay the placement's (2 here), not one sequence at a time.
    r = gen(
        job_ckpt, stores, tmp_path, *[a for p in prompts for a in ("-p", p)], *args, "--format", "text", "--verbose"
    )
    assert r.exit_code == 0, r.output
    assert r.stdout == "\n".join(f"> {p}\n" + rows[p]["text"] + "\n" for p in prompts)
    assert "sequences: 4 in 2 block(s)" in r.stderr


def test_a_prompt_that_is_a_path_is_text(job_ckpt, stores, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the quick brown fox " * 20)
    r = gen(
        job_ckpt,
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
    assert row["prompt"] == str(secret) and row["input_ids"] == job_ckpt.tokenizer(str(secret))["input_ids"][-62:]
