"""``flexrun score`` end to end: text records tokenized as lm-eval's hf backend does and scored as HF scores
them, perplexity records, bad records refused in one line naming the line, resume and its refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import lines, run
from tests.hf_reference import OptCheckpoint

RECORDS = [
    {"id": "q-a", "context": "the quick brown fox", "continuation": " jumps"},
    {"id": "q-b", "context": "the quick brown fox ", "continuation": "sleeps over the dog"},
    {"id": "ids", "context": [5, 6, 7], "continuation": [8, 9]},
    {"id": "no-context", "context": "", "continuation": "hello world"},
    {"id": "text", "text": "hello world, this is the end of the story. " * 3},
]


def score(ckpt: OptCheckpoint, stores: Path, tmp_path: Path, *args: str, input: str | None = None) -> Any:
    base = ["score", "-m", str(ckpt.path), "--store-dir", str(stores), "--offload-dir", str(tmp_path / "off")]
    return run(*base, "--placement", "manual", "--gpu-batch-size", "2", "--quiet", *args, input=input)


def write(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def hf_logprob(model: Any, context: list[int], continuation: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return float(sum(lp[len(context) - 1 + i, t] for i, t in enumerate(continuation)))


def test_records_score_as_hf(job_ckpt: OptCheckpoint, stores: Path, tmp_path: Path) -> None:
    src = write(tmp_path / "in.jsonl", RECORDS)
    result = score(job_ckpt, stores, tmp_path, "-i", str(src), "--window", "16", "--tokens")
    assert result.exit_code == 0, result.output
    got = {r["id"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(got) == {r["id"] for r in RECORDS}
    tok, model = job_ckpt.tokenizer, job_ckpt.model
    assert tok is not None

    def enc(text: str, special: bool = True) -> list[int]:
        return list(tok(text, add_special_tokens=special)["input_ids"])

    # lm-eval's pairing: the context's trailing space goes to the continuation, the pair is encoded whole
    # with the tokenizer's special tokens (this one starts every text with </s>, as OPT's does).
    ctx = enc("the quick brown fox")
    for rid, cont_text in (("q-a", " jumps"), ("q-b", " sleeps over the dog")):
        cont = enc("the quick brown fox" + cont_text)[len(ctx) :]
        assert got[rid]["token_ids"] == cont and got[rid]["context_tokens"] == len(ctx)
        assert got[rid]["logprob"] == pytest.approx(hf_logprob(model, ctx, cont), abs=1e-4)
    assert got["ids"]["logprob"] == pytest.approx(hf_logprob(model, [5, 6, 7], [8, 9]), abs=1e-4)
    bos = tok.bos_token_id
    assert ctx[0] == bos
    assert got["no-context"]["logprob"] == pytest.approx(
        hf_logprob(model, [bos], enc("hello world", special=False)), abs=1e-4
    )
    text = got["text"]
    assert text["tokens"] == len(enc(RECORDS[4]["text"])) and text["windows"] == math.ceil(text["tokens"] / 16)
    assert text["perplexity"] == pytest.approx(math.exp(-text["logprob"] / text["tokens"]))
    assert sum(text["token_logprobs"]) == pytest.approx(text["logprob"], abs=1e-4)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": 1, "continuation": " x"}, 'record has "continuation" but no "context"'),
        ({"id": 1, "context": "a"}, 'record has "context" but no "continuation"'),
        ({"id": 1, "context": "a", "continuation": ""}, '"continuation" is empty: there is nothing to score'),
        ({"id": 1, "context": [1, "a"], "continuation": [2]}, '"context" must be a string or a list of token ids'),
        ({"id": 1, "context": [5], "continuation": [9999]}, "token id 9999 is outside the vocabulary (0..299)"),
        ({"id": 1, "text": "a", "context": "b"}, 'give "text" (perplexity) or "context" and "continuation", not both'),
        ({"id": 1}, 'record has no "context" (or "text" for perplexity)'),
        ("{not json", "malformed JSON"),
    ],
)
def test_bad_records_are_one_line_naming_the_line(
    job_ckpt: OptCheckpoint, stores: Path, tmp_path: Path, record: Any, message: str
) -> None:
    src = write(tmp_path / "in.jsonl", [{"id": 0, "context": [5], "continuation": [6]}, record])
    result = score(job_ckpt, stores, tmp_path, "-i", str(src))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {src}:2: {message}") and result.stderr.count("\n") == 1


def test_long_text_without_windows_and_cache_placement_are_refused(
    job_ckpt: OptCheckpoint, stores: Path, tmp_path: Path
) -> None:
    src = write(tmp_path / "in.jsonl", [{"id": "t", "text": list(range(5, 75))}])
    result = score(job_ckpt, stores, tmp_path, "-i", str(src), "--window", "off")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {src}:1: text has 70 tokens, over the model's 64 positions; score it in windows (drop --window off)\n"
    )
    result = score(job_ckpt, stores, tmp_path, "-i", str(src), "--cache", "disk=100")
    assert result.exit_code == 1 and "score keeps no KV cache" in result.stderr
    assert score(job_ckpt, stores, tmp_path, "-i", str(src), "--window", "0").exit_code == 2


def test_resume_writes_what_an_uninterrupted_job_would(job_ckpt: OptCheckpoint, stores: Path, tmp_path: Path) -> None:
    records = [{"id": f"r{k}", "context": [5 + k, 6, 7], "continuation": [8 + k, 9]} for k in range(5)]
    src = write(tmp_path / "in.jsonl", records)
    full, out = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    assert score(job_ckpt, stores, tmp_path, "-i", str(src), "-o", str(full)).exit_code == 0
    done = full.read_text().splitlines(keepends=True)
    assert len(done) == 5
    # Two records and half of a third, as a job killed mid-write leaves them.
    out.write_text("".join(done[:2]) + done[2][:10])
    (tmp_path / "out.jsonl.job.json").write_text((tmp_path / "full.jsonl.job.json").read_text())
    result = score(job_ckpt, stores, tmp_path, "-i", str(src), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(map(json.dumps, lines(out))) == sorted(map(json.dumps, lines(full)))
    other = score(job_ckpt, stores, tmp_path, "-i", str(src), "-o", str(out), "--window", "8")
    assert other.exit_code == 1 and "window 64 there, 8 here" in other.stderr
    changed = write(tmp_path / "changed.jsonl", [{**records[0], "continuation": [8]}, *records[1:]])
    result = score(job_ckpt, stores, tmp_path, "-i", str(changed), "-o", str(out))
    assert result.exit_code == 1 and "id 'r0' was scored from other tokens than" in result.stderr
