"""`flexrun embed` end to end, and `generate` / `bench` refusing an encoder, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import run
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


def test_embed_summary_names_the_compute_dtype(bert, tmp_path: Path) -> None:
    ckpt, _, _ = bert
    args = ["--dummy-weights", "--dtype", "bfloat16", "--input", "-"]
    line = '{"input_ids": [2, 7, 8, 3]}\n'
    result = embed(ckpt, tmp_path, *args, "--compute-dtype", "float32", input=line)
    assert result.exit_code == 0, result.output
    assert "bfloat16 computed in float32" in result.stderr
    same = embed(ckpt, tmp_path, *args, "--compute-dtype", "bfloat16", input=line)
    assert same.exit_code == 0, same.output
    assert "bfloat16, " in same.stderr and "computed in" not in same.stderr


def ids_records(lengths: list[int]) -> str:
    """One {"id", "input_ids"} line per length: [CLS] n n ... [SEP] with distinct ids per record."""
    return "".join(
        json.dumps({"id": f"r{n}", "input_ids": [2] + [10 + n] * (length - 2) + [3]}) + "\n"
        for n, length in enumerate(lengths)
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--host-mem", "1KiB"],  # the encoder does not fit: fails after the input is read
        ["--offload-dir", "/proc/flexrun-no"],  # the offload dir cannot be made
    ],
)
def test_embed_failure_keeps_the_existing_output(bert, tmp_path: Path, args: list[str]) -> None:
    ckpt, _, _ = bert
    inp, out = tmp_path / "in.jsonl", tmp_path / "keep.jsonl"
    inp.write_text(ids_records([4, 6]))
    out.write_text("precious\n")
    result = embed(ckpt, tmp_path, "-i", str(inp), "-o", str(out), *args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["in.jsonl", "keep.jsonl"]  # no temp left


def test_embed_failure_leaves_no_new_output(bert, tmp_path: Path) -> None:
    ckpt, _, _ = bert
    out = tmp_path / "new.jsonl"
    result = embed(ckpt, tmp_path, "-t", "hi", "-o", str(out), "--host-mem", "1KiB")
    assert result.exit_code == 1, result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.is_file()]


def test_embed_refuses_to_write_over_its_input(bert, tmp_path: Path) -> None:
    ckpt, _, _ = bert
    inp = tmp_path / "in.jsonl"
    inp.write_text(ids_records([4, 6]))
    (tmp_path / "sub").mkdir()
    for out in (inp, tmp_path / "sub" / ".." / "in.jsonl"):  # the same file, spelled differently
        result = embed(ckpt, tmp_path, "-i", str(inp), "-o", str(out))
        assert result.exit_code == 1, result.output
        assert "is the input file" in result.output and "Traceback" not in result.output
        assert inp.read_text() == ids_records([4, 6])
    assert not (tmp_path / "stores").exists()  # refused before converting anything


def test_embed_replaces_an_existing_output_only_when_done(bert, tmp_path: Path) -> None:
    ckpt, _, _ = bert
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(ids_records([4, 6, 5]))
    out.write_text("old\n" * 100)
    out.chmod(0o640)
    result = embed(ckpt, tmp_path, "-i", str(inp), "-o", str(out), "--pooling", "cls")
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in rows_of(out.read_text())] == ["r0", "r1", "r2"]
    assert "old" not in out.read_text()
    assert out.stat().st_mode & 0o777 == 0o640  # the file it replaced kept its permissions
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["in.jsonl", "out.jsonl"]


@pytest.mark.parametrize("extra", [[], ["--all-tokens"]])
def test_embed_writes_input_order_across_many_blocks(bert, tmp_path: Path, extra: list[str]) -> None:
    """Lengths that a job-wide length sort would reorder; rows still come out in input order and match HF."""
    ckpt, model, _ = bert
    lengths = [3, 17, 5, 30, 4, 9, 22, 6, 3, 12, 8, 26]
    inp = tmp_path / "in.jsonl"
    inp.write_text(ids_records(lengths))
    args = ["-i", str(inp), "--pooling", "cls", "--gpu-batch-size", "2", "--num-gpu-batches", "2", *extra]
    result = embed(ckpt, tmp_path, *args)
    assert result.exit_code == 0, result.output
    rows = rows_of(result.stdout)
    assert [r["id"] for r in rows] == [f"r{n}" for n in range(len(lengths))]
    for row, line in zip(rows, inp.read_text().splitlines(), strict=True):
        seq = json.loads(line)["input_ids"]
        with torch.no_grad():
            want = model(torch.tensor([seq])).last_hidden_state[0]
        got = torch.tensor(row["last_hidden_state"] if extra else row["embedding"])
        torch.testing.assert_close(got, want if extra else want[0], atol=ATOL, rtol=0)


def test_embed_writes_each_block_as_it_finishes(bert, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure in the third block: the first two blocks' rows are already on stdout; a file is untouched."""
    from flexrun.errors import InputError
    from flexrun.runtime.encoder import Encoder

    ckpt, _, _ = bert
    real_block = Encoder._block
    calls: list[int] = []

    def failing_block(self, ids, valid, pooling):
        calls.append(ids.shape[0])
        if len(calls) == 3:
            raise InputError("disk gone")
        return real_block(self, ids, valid, pooling)

    monkeypatch.setattr(Encoder, "_block", failing_block)
    records = ids_records([5] * 7)
    result = embed(ckpt, tmp_path, "--all-tokens", "--gpu-batch-size", "2", input=records)
    assert result.exit_code == 1 and "disk gone" in result.output
    assert [r["id"] for r in rows_of(result.stdout)] == ["r0", "r1", "r2", "r3"]
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    calls.clear()
    result = embed(ckpt, tmp_path, "--all-tokens", "--gpu-batch-size", "2", "-o", str(out), input=records)
    assert result.exit_code == 1 and out.read_text() == "precious\n"


def test_run_embed_uses_the_streams_it_is_given(bert, tmp_path: Path) -> None:
    """Library code does not own the terminal: stdin and stdout are passed in."""
    import io

    from flexrun.jobs.embed import EmbedOptions, run_embed
    from flexrun.jobs.options import EngineOptions, ModelOptions, PlacementRequest

    ckpt, _, _ = bert
    opts = EngineOptions(
        ModelOptions(str(ckpt), store_dir=str(tmp_path / "stores")),
        PlacementRequest(mode="manual", gpu_batch_size=2, num_gpu_batches=1),
        offload_dir=str(tmp_path / "off"),
    )
    stdout = io.StringIO()
    job = EmbedOptions(input_file="-", pooling="mean")
    result = run_embed(opts, job, stdin=io.StringIO(ids_records([4, 5, 6])), stdout=stdout)
    assert [r["id"] for r in rows_of(stdout.getvalue())] == ["r0", "r1", "r2"]
    assert result.stats.sequences == 3 and result.pooling == "mean"


def test_embed_output_through_a_symlink_replaces_the_file_it_points_to(bert, tmp_path: Path) -> None:
    ckpt, _, _ = bert
    (tmp_path / "real").mkdir()
    target, link = tmp_path / "real" / "out.jsonl", tmp_path / "link.jsonl"
    target.write_text("old\n")
    link.symlink_to(target)
    result = embed(ckpt, tmp_path, "-t", "hi", "-o", str(link), "--pooling", "cls")
    assert result.exit_code == 0, result.output
    # A --text is numbered from 1, as --input lines are.
    assert link.is_symlink() and [r["id"] for r in rows_of(target.read_text())] == [1]
