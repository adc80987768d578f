"""`flexrun embed` end to end, and `generate` / `bench` refusing an encoder, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from flexrun.cli import cli
from tests.hf_encoders import tiny_bert_tokenizer, tiny_encoder

# See tests/test_bert_vs_hf.py: float32 rounding over 3 layers is ~3e-6; a wrong slot is O(0.1).
ATOL = 1e-4


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory):
    """A tiny BERT checkpoint with its tokenizer, the HF model and the tokenizer."""
    d = tmp_path_factory.mktemp("bert-cli")
    model = tiny_encoder("bert", seed=7)
    tokenizer = tiny_bert_tokenizer(d / "vocab")
    model.save_pretrained(d / "ckpt")
    tokenizer.save_pretrained(d / "ckpt")
    return d / "ckpt", model, tokenizer


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input)


def embed(ckpt: Path, tmp: Path, *args: str, input: str | None = None):
    return run("embed", "-m", str(ckpt), "--store-dir", str(tmp / "stores"), *args, input=input)


def rows_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_embed_jsonl_matches_hf_pooler(bert, tmp_path: Path) -> None:
    ckpt, model, tokenizer = bert
    texts = ["the cat sat on the mat", "hello world", "a dog ran far far away, the end!"]
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        json.dumps({"id": "a", "text": texts[0]})
        + "\n\n"
        + json.dumps({"text": texts[1]})
        + "\n"
        + json.dumps({"id": 9, "prompt": texts[2]})
        + "\n"
        + json.dumps({"id": "ids", "input_ids": [2, 50, 51, 3]})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    args = ["--input", str(inp), "--output", str(out), "--weights", "disk=100", "--gpu-batch-size", "2"]
    result = embed(ckpt, tmp_path, *args, "--num-gpu-batches", "2", "--offload-dir", str(tmp_path / "off"))
    assert result.exit_code == 0, result.output
    assert "pooling: pooler" in result.output and "disk read" in result.output
    rows = rows_of(out.read_text())
    assert [r["id"] for r in rows] == ["a", 3, 9, "ids"]
    seqs = [tokenizer(t)["input_ids"] for t in texts] + [[2, 50, 51, 3]]
    for row, seq in zip(rows, seqs, strict=True):
        assert row["tokens"] == len(seq)
        with torch.no_grad():
            want = model(torch.tensor([seq])).pooler_output[0]
        torch.testing.assert_close(torch.tensor(row["embedding"]), want, atol=ATOL, rtol=0)


def test_embed_all_tokens_mean_and_normalize(bert, tmp_path: Path) -> None:
    ckpt, model, tokenizer = bert
    seq = tokenizer("hello world")["input_ids"]
    with torch.no_grad():
        hidden = model(torch.tensor([seq])).last_hidden_state[0]
    result = embed(ckpt, tmp_path, "--text", "hello world", "--all-tokens")
    assert result.exit_code == 0, result.output
    (row,) = rows_of(result.stdout)
    assert row["input_ids"] == seq
    torch.testing.assert_close(torch.tensor(row["last_hidden_state"]), hidden, atol=ATOL, rtol=0)
    result = embed(ckpt, tmp_path, "-t", "hello world", "--pooling", "mean", "--normalize")
    assert result.exit_code == 0, result.output
    (row,) = rows_of(result.stdout)
    want = torch.nn.functional.normalize(hidden.mean(0), dim=0)
    torch.testing.assert_close(torch.tensor(row["embedding"]), want, atol=ATOL, rtol=0)


def test_embed_reads_stdin_and_truncates_on_request(bert, tmp_path: Path) -> None:
    ckpt, model, tokenizer = bert
    long_text = " ".join(["cat"] * 60)  # 62 tokens with [CLS]/[SEP]; the model has 40 positions
    result = embed(ckpt, tmp_path, "--truncate", "--pooling", "cls", input=json.dumps({"text": long_text}) + "\n")
    assert result.exit_code == 0, result.output
    (row,) = rows_of(result.stdout)
    seq = tokenizer(long_text, truncation=True, max_length=40)["input_ids"]
    assert row["tokens"] == 40 and seq[-1] == tokenizer.sep_token_id
    with torch.no_grad():
        want = model(torch.tensor([seq])).last_hidden_state[0, 0]
    torch.testing.assert_close(torch.tensor(row["embedding"]), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "hi"}\n{oops\n', "in.jsonl:2: malformed JSON"),
        ('{"txt": "hi"}\n', 'in.jsonl:1: record has neither "text", "prompt" nor "input_ids"'),
        ("\n", "no prompts (give --text TEXT"),
        ('{"input_ids": [2, 5, 3]}\n{"input_ids": []}\n', "record 2 has no tokens"),
        ('{"input_ids": [2, 999]}\n', "outside the vocabulary"),
        (json.dumps({"text": " ".join(["cat"] * 60)}) + "\n", "62 tokens, over the model's limit of 40"),
    ],
)
def test_embed_bad_input_is_one_line_exit_1(bert, tmp_path: Path, content: str, message: str) -> None:
    ckpt, _, _ = bert
    inp = tmp_path / "in.jsonl"
    inp.write_text(content)
    result = embed(ckpt, tmp_path, "--input", str(inp))
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output and result.output.count("Error:") == 1


def test_embed_bad_option_values_exit_2(bert, tmp_path: Path) -> None:
    ckpt, _, _ = bert
    for args in (["--pooling", "max"], ["--gpu-batch-size", "0"], ["--weights", "disk=50"]):
        result = embed(ckpt, tmp_path, "-t", "hi", *args)
        assert result.exit_code == 2, (args, result.output)


def test_generate_and_bench_refuse_an_encoder(bert, tmp_path: Path) -> None:
    ckpt, _, _ = bert
    stores = ["--store-dir", str(tmp_path / "stores")]
    for args in (["generate", "-p", "hello"], ["bench", "--dummy-weights", "--prompt-len", "4", "--gen-len", "2"]):
        result = run(args[0], "-m", str(ckpt), *stores, *args[1:])
        assert result.exit_code == 1, result.output
        assert "is an encoder model (bert) and cannot generate text; use `flexrun embed" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "stores").exists()  # refused before converting anything


def test_embed_refuses_a_decoder_and_a_missing_pooler(bert, tmp_path: Path) -> None:
    result = run("embed", "-m", "opt-125m", "--dummy-weights", "--store-dir", str(tmp_path / "s"), "-t", "hi")
    assert result.exit_code == 1 and "decoder model (opt)" in result.output
    model = tiny_encoder("bert")
    from transformers import BertForMaskedLM

    BertForMaskedLM(model.config).save_pretrained(tmp_path / "mlm")
    result = run(
        "embed", "-m", str(tmp_path / "mlm"), "--store-dir", str(tmp_path / "s"), "-t", "hi", "--pooling", "pooler"
    )
    assert result.exit_code == 1 and "has no pooler layer" in result.output


def test_embed_dummy_weights_with_input_ids(bert, tmp_path: Path) -> None:
    ckpt, _, _ = bert
    result = embed(ckpt, tmp_path, "--dummy-weights", "--input", "-", input='{"input_ids": [2, 7, 8, 3]}\n')
    assert result.exit_code == 0, result.output
    (row,) = rows_of(result.stdout)
    assert len(row["embedding"]) == 48 and all(abs(v) <= 1 for v in row["embedding"])  # tanh pooler
