"""Hostile inputs, each answered with one clear line on stderr and exit code 1, no traceback, and an existing
output file untouched: fuzzed JSONL prompt files, damaged tensor stores, absurd or contradictory config.json
files, GGUF files cut short. docs/reliability.md lists every input tried here, what flexrun answers, and the
test that checks it. A new case whose fix lies in another module goes in as xfail(strict=True), the reason
naming the module and the fix, until that fix removes the marker.

In-process CLI runs (click's runner) check that no exception escaped other than click's exit; a few cases
also run the real ``python -m flexrun`` in a subprocess, where a traceback would be printed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexrun.errors import CheckpointError, InputError
from flexrun.jobs.textio import read_jsonl, read_prompts
from flexrun.weights.store import TensorStore
from tests.helpers import gen, run, save_and_convert
from tests.hf_reference import tiny_opt

ROOT = Path(__file__).resolve().parents[1]
DONE = '{"id": "a", "input_ids": [5, 6, 7], "output_ids": [8]}\n'
FAST = settings(
    max_examples=300, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def one_line_error(r: Result, message: str) -> None:
    """Exit 1, nothing escaped but click's exit, and exactly one line on stderr: the error, holding ``message``."""
    assert type(r.exception) is SystemExit, f"uncaught {r.exception!r}"
    assert r.exit_code == 1, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert message in lines[0], lines[0]


# ---- JSONL prompt files --------------------------------------------------------------------------------
GOOD = b'{"id": "g", "input_ids": [5, 6, 7]}\n'
JSONL_CASES: dict[str, tuple[bytes, str]] = {
    "random bytes": (bytes(range(256)) * 3, "in.jsonl:1: malformed JSON"),
    "invalid UTF-8 on line 2": (GOOD + b'{"prompt": "caf\xe9"}\n', "in.jsonl:2: not UTF-8 text (byte 0xe9)"),
    "UTF-16 with its BOM": ('{"input_ids": [5]}\n'.encode("utf-16"), "in.jsonl:1: not UTF-8 text (byte 0xff)"),
    "a lone surrogate escape": (b'{"prompt": "\\ud800"}\n', 'in.jsonl:1: "prompt" is not valid Unicode'),
    "a huge line": (b'{"input_ids": [' + b"5," * 300_000 + b"5]}\n", "in.jsonl:1: prompt has 300001 tokens"),
    "nested 100000 deep": (b'{"input_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "nested too deeply"),
    "an integer of 5000 digits": (b'{"input_ids": [' + b"9" * 5000 + b"]}\n", "in.jsonl:1: malformed JSON (Exceeds"),
    "a control character": (b'{"prompt": "a\x01b"}\n', "in.jsonl:1: malformed JSON (Invalid control character"),
    "truncated JSON": (GOOD + b'{"input_ids": [3,\n', "in.jsonl:2: malformed JSON"),
    "an array": (b"[1, 2, 3]\n", 'in.jsonl:1: expected a JSON object with "prompt" or "input_ids"'),
    "a string": (b'"hello"\n', "in.jsonl:1: expected a JSON object"),
    "null": (b"null\n", "in.jsonl:1: expected a JSON object"),
    "neither key": (b'{"text": "hi"}\n', 'in.jsonl:1: record has neither "prompt" nor "input_ids"'),
    "both null": (b'{"prompt": null, "input_ids": null}\n', 'record has neither "prompt" nor "input_ids"'),
    "prompt a list": (b'{"prompt": ["a"]}\n', 'in.jsonl:1: "prompt" must be a string'),
    "ids a string": (b'{"input_ids": "5 6"}\n', 'in.jsonl:1: "input_ids" must be a list of integers'),
    "ids nested": (b'{"input_ids": [[5]]}\n', '"input_ids" must be a list of integers'),
    "ids floats": (b'{"input_ids": [5.0]}\n', '"input_ids" must be a list of integers'),
    "ids booleans": (b'{"input_ids": [true]}\n', '"input_ids" must be a list of integers'),
    "ids Infinity": (b'{"input_ids": [Infinity]}\n', '"input_ids" must be a list of integers'),
    "id negative": (b'{"input_ids": [4, -1]}\n', "in.jsonl:1: token id -1 is outside the vocabulary (0..299)"),
    "id past the vocabulary": (b'{"input_ids": [300]}\n', "token id 300 is outside the vocabulary (0..299)"),
    "id past int64": (b'{"input_ids": [9223372036854775808]}\n', "token id 9223372036854775808 is outside"),
    "empty ids": (b'{"input_ids": []}\n', "in.jsonl:1: empty prompt"),
    "record id NaN": (b'{"id": NaN, "input_ids": [5]}\n', 'in.jsonl:1: "id" must be a string or a finite number'),
    "record id 1e999": (b'{"id": 1e999, "input_ids": [5]}\n', '"id" must be a string or a finite number'),
    "record id an object": (b'{"id": {}, "input_ids": [5]}\n', '"id" must be a string or a finite number'),
    "repeated id": (GOOD + b'{"id": "g", "input_ids": [4]}\n', "in.jsonl:2: id 'g' repeats line 1"),
    "blank lines only": (b"\n \n\t\n", "in.jsonl: no prompts"),
    "empty file": (b"", "in.jsonl: no prompts"),
}


@pytest.mark.parametrize("name", sorted(JSONL_CASES))
def test_hostile_jsonl_file_is_one_line_and_loses_nothing(name: str, job_ckpt, stores, tmp_path: Path) -> None:
    content, message = JSONL_CASES[name]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(content)
    out = tmp_path / "out.jsonl"
    out.write_text(DONE)
    one_line_error(gen(job_ckpt, stores, tmp_path, "-i", str(inp), "-o", str(out)), message)
    assert out.read_text() == DONE


STDIN_CASES = ["random bytes", "invalid UTF-8 on line 2", "UTF-16 with its BOM", "nested 100000 deep", "empty file"]


@pytest.mark.parametrize("name", STDIN_CASES)
def test_hostile_jsonl_on_stdin_is_one_line(name: str, job_ckpt, stores, tmp_path: Path) -> None:
    content, message = JSONL_CASES[name]
    r = gen(job_ckpt, stores, tmp_path, "-i", "-", input=content)  # type: ignore[arg-type]
    one_line_error(r, message.replace("in.jsonl", "<stdin>"))


def test_a_bom_and_crlf_line_ends_are_read(job_ckpt, stores, tmp_path: Path) -> None:
    """A UTF-8 byte-order mark (Windows editors write one) and CRLF line ends are text, not errors."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'\xef\xbb\xbf{"id": "a", "input_ids": [5, 6]}\r\n{"id": "b", "input_ids": [7]}\r\n')
    r = gen(job_ckpt, stores, tmp_path, "-i", str(inp))
    assert r.exit_code == 0 and r.exception is None, r.output
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == ["a", "b"]


def test_a_prompt_argument_that_is_not_utf8_is_one_line(job_ckpt, stores, tmp_path: Path) -> None:
    """Bytes that are not UTF-8 in argv reach Python as lone surrogates; the tokenizer would raise TypeError."""
    one_line_error(gen(job_ckpt, stores, tmp_path, "-p", "ok", "-p", "caf\udce9"), "--prompt 2 is not valid Unicode")


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_are_records_or_one_input_error(data: bytes) -> None:
    """Library level, many inputs: reading arbitrary bytes as a JSONL file gives records whose fields have the
    promised types, or an InputError; nothing else escapes."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "in.jsonl"
        path.write_bytes(data)
        try:
            records = read_prompts((), str(path), None)
        except InputError as exc:
            assert "\n" not in str(exc)
            return
    for r in records:
        assert r.prompt is not None or r.input_ids is not None
        assert r.input_ids is None or all(type(t) is int for t in r.input_ids)
        assert r.prompt is None or r.prompt.encode("utf-8")
        json.dumps(r.id, allow_nan=False)  # written back into the output as valid JSON


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["id", "prompt", "input_ids"]), inner),
    max_leaves=8,
)


@FAST
@given(st.lists(st.dictionaries(st.sampled_from(["id", "prompt", "input_ids", "x"]), JSON_VALUES), max_size=4))
def test_any_json_records_are_prompts_or_one_input_error(objs: list[dict[str, Any]]) -> None:
    text = "\n".join(json.dumps(o) for o in objs)
    try:
        records = read_jsonl(io.StringIO(text), "in.jsonl")
    except InputError as exc:
        assert str(exc).startswith("in.jsonl:") and "\n" not in str(exc)
        return
    for r in records:
        assert isinstance(r.prompt, str) or isinstance(r.input_ids, list)
        json.dumps(r.id, allow_nan=False)


# ---- tensor stores ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny OPT's tensor store (vocabulary 211), converted once for the module's damaged copies."""
    _, model = tiny_opt(seed=4)
    d = tmp_path_factory.mktemp("hostile-store")
    return save_and_convert(model, d).path


def _index(store: Path) -> dict[str, Any]:
    return json.loads((store / "index.json").read_text())


def _write_index(store: Path, index: Any) -> None:
    (store / "index.json").write_text(json.dumps(index))


def _flip(path: Path, at: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _swap(a: Path, b: Path) -> None:
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)


def _edit_index(**changes: Any) -> Any:
    def edit(s: Path) -> None:
        index = _index(s)
        for key, value in changes.items():
            if key.startswith("tensor:"):
                index["tensors"]["layers.1.fc1_w"][key[7:]] = value
            elif value is None:
                del index[key]
            else:
                index[key] = value
        _write_index(s, index)

    return edit


STORE_CASES: dict[str, tuple[Any, str]] = {
    "a tensor file truncated": (
        lambda s: (s / "layers.1.fc1_w.bin").write_bytes((s / "layers.1.fc1_w.bin").read_bytes()[:100]),
        "layers.1.fc1_w.bin is truncated (100 of 15360 bytes); convert again",
    ),
    "a tensor file emptied": (
        lambda s: (s / "layers.1.fc1_w.bin").write_bytes(b""),
        "layers.1.fc1_w.bin is truncated (0 of 15360 bytes)",
    ),
    "a byte flipped": (lambda s: _flip(s / "layers.1.fc1_w.bin"), "layers.1.fc1_w.bin: checksum mismatch"),
    "the last data byte flipped": (lambda s: _flip(s / "layers.0.qkv_w.bin", 27647), "layers.0.qkv_w.bin: checksum"),
    "two tensor files swapped": (
        lambda s: _swap(s / "layers.0.fc1_w.bin", s / "layers.2.fc1_w.bin"),
        "layers.0.fc1_w.bin: checksum mismatch",
    ),
    "files of two sizes swapped": (
        lambda s: _swap(s / "layers.0.fc1_w.bin", s / "layers.0.ln1_w.bin"),
        "layers.0.ln1_w.bin: checksum mismatch",
    ),
    "a tensor file deleted": (
        lambda s: (s / "layers.1.fc1_w.bin").unlink(),
        "layers.1.fc1_w.bin is missing; the store is incomplete, convert again",
    ),
    "a tensor left out of the index": (
        lambda s: _write_index(
            s, {**_index(s), "tensors": {k: v for k, v in _index(s)["tensors"].items() if k != "layers.1.fc1_w"}}
        ),
        "tensor layers.1.fc1_w is missing from the store; convert again",
    ),
    "a tensor file that is a directory": (
        lambda s: ((s / "layers.1.fc1_w.bin").unlink(), (s / "layers.1.fc1_w.bin").mkdir()),
        "cannot read {store}/layers.1.fc1_w.bin: Is a directory",
    ),
    "a checksum that is a string": (_edit_index(**{"tensor:crc32": "x"}), "layers.1.fc1_w.bin: checksum mismatch"),
    "index.json cut in half": (
        lambda s: (s / "index.json").write_text((s / "index.json").read_text()[:500]),
        "index.json: corrupted index",
    ),
    "index.json empty": (lambda s: (s / "index.json").write_text(""), "index.json: corrupted index"),
    "written by a newer flexrun": (_edit_index(version=3), "store version 3 was written by a newer flexrun"),
    "a tensor file outside the store": (_edit_index(**{"tensor:file": "../x.bin"}), "names a file outside the store"),
    "not a flexrun store": (_edit_index(format="something else"), "index.json: not a version-2 flexrun store"),
    "an absurd config in the index": (
        lambda s: _write_index(s, {**_index(s), "config": {**_index(s)["config"], "vocab_size": 10**12}}),
        "vocab_size 1000000000000 is past any real model's",
    ),
    "a config with zero heads": (
        lambda s: _write_index(s, {**_index(s), "config": {**_index(s)["config"], "n_head": 0}}),
        "n_head must be a positive integer, got 0",
    ),
}

# Damage to index.json itself (the rest damage tensor files).
INDEX_EDITS = {name for name in STORE_CASES if "index" in name or "flexrun" in name or "config" in name} | {
    "a checksum that is a string"
}

STORE_INDEX_CASES: dict[str, tuple[Any, str]] = {
    "index.json a JSON list": (lambda s: (s / "index.json").write_text("[]"), "index.json"),
    "index.json not UTF-8": (lambda s: (s / "index.json").write_bytes(b"\xff\xfe garbage"), "index.json"),
    "no config in the index": (_edit_index(config=None), "index.json"),
    "no tensors in the index": (_edit_index(tensors=None), "index.json"),
    "a shape that does not match the bytes": (_edit_index(**{"tensor:shape": [80, 47]}), "layers.1.fc1_w"),
    "an unknown dtype": (_edit_index(**{"tensor:dtype": "int3"}), "layers.1.fc1_w"),
    "a config field from a newer flexrun": (
        lambda s: _write_index(s, {**_index(s), "config": {**_index(s)["config"], "new_field": 1}}),
        "new_field",
    ),
}
# TensorStore checks index.json's structure (an object holding a config object and a tensors object; each
# entry's dtype known and its bytes those its shape and encoding give; config fields this flexrun knows, else
# "a newer one wrote the store"; a file that is not UTF-8), naming index.json or the tensor.


def _damaged_copy(good_store: Path, tmp_path: Path, damage: Any) -> Path:
    store = tmp_path / "store"
    shutil.copytree(good_store, store)
    damage(store)
    return store


SECOND = b'{"id": "h", "input_ids": [8, 9]}\n'


def _resume_on_damaged_store(good_store: Path, tmp_path: Path, damage: Any, weights: str, fresh: bool) -> Result:
    """A job's first record written from the intact store, the store damaged, the job resumed with a second
    prompt: the output keeps exactly its first record. A damaged index changes the weights' fingerprint (the
    resume would be refused as another job's), so those cases start a ``fresh`` output, which stays empty."""
    store = _damaged_copy(good_store, tmp_path, lambda s: None)
    out = tmp_path / "out.jsonl"
    args = ["generate", "-m", str(store), "--offload-dir", str(tmp_path / "off"), "-i", "-", "-q", "-o", str(out)]
    args += ["--max-new-tokens", "2", "--placement", "manual", "--weights", weights]
    if fresh:
        done = ""
    else:
        first = run(*args, input=GOOD.decode())
        assert first.exit_code == 0, first.output
        done = out.read_text()
    damage(store)
    r = run(*args, input=(GOOD + SECOND).decode())
    assert (out.read_text() if out.exists() else "") == done
    return r


@pytest.mark.parametrize("weights", ["host=100", "disk=100"])
@pytest.mark.parametrize("name", sorted(STORE_CASES))
def test_damaged_store_is_one_line_naming_the_tensor(name: str, weights: str, good_store, tmp_path: Path) -> None:
    """Weights held in memory or streamed from disk: the store's CRCs catch a damaged tensor file when it is
    first read, naming it; the output file keeps its records."""
    damage, message = STORE_CASES[name]
    message = message.format(store=tmp_path / "store")
    one_line_error(_resume_on_damaged_store(good_store, tmp_path, damage, weights, name in INDEX_EDITS), message)


@pytest.mark.parametrize("name", sorted(STORE_INDEX_CASES))
def test_damaged_store_index_is_one_line(name: str, good_store, tmp_path: Path) -> None:
    damage, message = STORE_INDEX_CASES[name]
    one_line_error(_resume_on_damaged_store(good_store, tmp_path, damage, "host=100", fresh=True), message)


def test_the_crcs_are_checked_on_every_first_read(good_store, tmp_path: Path) -> None:
    """Every tensor of the store is verified: a flipped byte in any one of them is named."""
    names = sorted(TensorStore(good_store).tensors)
    store = _damaged_copy(good_store, tmp_path, lambda s: None)
    for name in names:
        f = store / f"{name}.bin"
        before = f.read_bytes()
        _flip(f, 0)
        with pytest.raises(CheckpointError, match=f"{name}.bin: checksum mismatch"):
            for n in names:
                TensorStore(store).read(n)
        f.write_bytes(before)


# ---- config.json -----------------------------------------------------------------------------------------
def _ckpt_with(tmp_path: Path, job_ckpt, edit: Any) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(job_ckpt.path, d)
    hf = json.loads((d / "config.json").read_text())
    edit(hf)
    (d / "config.json").write_text(json.dumps(hf))
    return d


def _set(**fields: Any) -> Any:
    return lambda hf: hf.update(fields)


CONFIG_CASES: dict[str, tuple[Any, str]] = {
    "zero heads": (_set(num_attention_heads=0), "n_head must be a positive integer, got 0"),
    "hidden not divisible by heads": (_set(num_attention_heads=5), "hidden_size 48 is not divisible by n_head 5"),
    "negative hidden size": (_set(hidden_size=-48), "hidden_size must be a positive integer, got -48"),
    "negative layers": (_set(num_hidden_layers=-1), "num_hidden_layers must be a positive integer, got -1"),
    "zero layers": (_set(num_hidden_layers=0), "num_hidden_layers must be a positive integer, got 0"),
    "a 10^12 vocabulary": (_set(vocab_size=10**12), "vocab_size 1000000000000 is past any real model's"),
    "10^9 layers": (_set(num_hidden_layers=10**9), "num_hidden_layers 1000000000 is past any real model's"),
    "a 3e9 hidden size": (_set(hidden_size=3 * 10**9), "hidden_size 3000000000 is past any real model's"),
    "a 1e13 FFN": (_set(ffn_dim=10**13), "ffn_embed_dim 10000000000000 is past any real model's"),
    "1e15 positions": (_set(max_position_embeddings=10**15), "max_seq_len 1000000000000000 is past any real"),
    "negative positions": (_set(max_position_embeddings=-5), "max_seq_len must be a positive integer, got -5"),
    "a size that is a string": (_set(hidden_size="48"), "hidden_size must be a positive integer, got '48'"),
    "a size that is a float": (_set(hidden_size=48.0), "hidden_size must be a positive integer, got 48.0"),
    "a size that is a boolean": (_set(num_hidden_layers=True), "num_hidden_layers must be a positive integer"),
    "a size that is a list": (_set(vocab_size=[300]), "vocab_size must be a positive integer, got [300]"),
    "a negative projection": (_set(word_embed_proj_dim=-3), "word_embed_proj_dim must be a non-negative integer"),
    "an eos id that is a string": (_set(eos_token_id="x"), "eos_token_id must be an integer, got 'x'"),
    "an unsupported activation": (_set(activation_function="swish9"), "unsupported OPT activation 'swish9'"),
    "an unknown architecture": (
        _set(architectures=["FooForCausalLM"], model_type="foo"),
        "unsupported architecture FooForCausalLM",
    ),
    "no architecture at all": (
        lambda hf: [hf.pop("architectures"), hf.pop("model_type")],
        "unsupported architecture model_type None",
    ),
    "a vocabulary the weights do not have": (
        _set(vocab_size=301),
        "embed_tokens has shape (300, 48), expected (301, 48)",
    ),
    "a hidden size the weights do not have": (
        _set(hidden_size=60, num_attention_heads=3),
        "embed_positions has shape (66, 48), expected (66, 60)",
    ),
}


WEIGHTS_DISAGREE = {"a vocabulary the weights do not have", "a hidden size the weights do not have"}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_absurd_config_is_refused_before_any_allocation(name: str, job_ckpt, tmp_path: Path) -> None:
    """Refused by ``config`` and by ``generate`` with the field (or tensor) named, before a store is written."""
    edit, message = CONFIG_CASES[name]
    ckpt = _ckpt_with(tmp_path, job_ckpt, edit)
    if name not in WEIGHTS_DISAGREE:  # `config` reads config.json only
        one_line_error(run("config", str(ckpt)), message)
    one_line_error(_generate(ckpt, tmp_path), message)
    assert not [p for p in (tmp_path / "stores").glob("*") if not p.name.endswith(".partial")]


def _generate(ckpt: Path, tmp_path: Path) -> Result:
    out = tmp_path / "out.jsonl"
    out.write_text(DONE)
    args = ["-m", str(ckpt), "--store-dir", str(tmp_path / "stores"), "--offload-dir", str(tmp_path / "off")]
    r = run("generate", *args, "-p", "hi", "-q", "--max-new-tokens", "2", "-o", str(out))
    assert out.read_text() == DONE
    return r


def _family_config(family: str, **changes: Any) -> dict[str, Any]:
    from tests.test_fuzz_vs_hf import MODEL_CLASSES

    small = {
        "opt": dict(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, ffn_dim=8),
        "gpt2": dict(n_embd=8, n_head=2, n_layer=1),
        "gpt_neo": dict(hidden_size=8, num_heads=2, num_layers=1, attention_types=[[["global"], 1]]),
        "gpt_neox": dict(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=8),
        "llama": dict(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=8),
    }[family]
    hf: dict[str, Any] = MODEL_CLASSES[family][0](vocab_size=10, **small).to_dict()
    for key, value in changes.items():
        if value is ...:
            hf.pop(key, None)
        else:
            hf[key] = value
    return hf


MALFORMED_CONFIGS: dict[str, Any] = {
    "opt without hidden_size": _family_config("opt", hidden_size=...),
    "opt without num_attention_heads": _family_config("opt", num_attention_heads=...),
    "opt without vocab_size": _family_config("opt", vocab_size=...),
    "opt with a null hidden_size": _family_config("opt", hidden_size=None),
    "opt with an empty eos list": _family_config("opt", eos_token_id=[]),
    "gpt2 with an eos id that is a string": _family_config("gpt2", eos_token_id="x"),
    "llama with an eos id that is an object": _family_config("llama", eos_token_id={"a": 1}),
    "gpt_neox with zero heads": _family_config("gpt_neox", num_attention_heads=0),
    "gpt_neox with a hidden size that is a string": _family_config("gpt_neox", hidden_size="8"),
    "llama with rope parameters that are a list": _family_config("llama", rope_parameters=[1]),
    "gpt_neo with attention types that are a string": _family_config(
        "gpt_neo", attention_types="global", attention_layers=None
    ),
    "config.json a JSON list": [1, 2],
}
# config_from_hf refuses a config.json that is not a JSON object and turns a KeyError / TypeError / ValueError /
# IndexError / ZeroDivisionError raised while a policy reads it into ConfigError naming config.json.


@pytest.mark.parametrize("name", sorted(MALFORMED_CONFIGS))
def test_malformed_config_of_any_family_is_one_line(name: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(MALFORMED_CONFIGS[name]))
    one_line_error(run("config", str(tmp_path)), "config.json")


# ---- GGUF files ------------------------------------------------------------------------------------------
def write_tiny_gguf(
    path: Path, vocab: int = 40, hidden: int = 16, heads: int = 2, ffn: int = 24, scores: bool = True
) -> Path:
    """A tiny one-layer LLaMA GGUF file (float32 tensors, a made-up byte-level vocabulary), written with the
    gguf package; without ``scores``, its tokenizer metadata lacks the token scores."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    if scores:
        w.add_token_scores([0.0] * vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    kv = hidden // heads
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (hidden, hidden),
        "blk.0.attn_k.weight": (kv, hidden),
        "blk.0.attn_v.weight": (kv, hidden),
        "blk.0.attn_output.weight": (hidden, hidden),
        "blk.0.ffn_gate.weight": (ffn, hidden),
        "blk.0.ffn_up.weight": (ffn, hidden),
        "blk.0.ffn_down.weight": (hidden, ffn),
        "output_norm.weight": (hidden,),
        "output.weight": (vocab, hidden),
    }
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.3).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    pytest.importorskip("gguf")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


# Cut in the header, the metadata, the tensor infos, the tensor data, and one byte short of the end.
GGUF_CUTS = [4, 24, 300, 2000, 3000, 10000, -1]


@pytest.mark.parametrize("cut", GGUF_CUTS)
def test_a_gguf_file_cut_short_is_one_line(cut: int, tiny_gguf: bytes, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FLEXRUN_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "model.gguf"
    f.write_bytes(tiny_gguf[:cut])
    for args in (["config", str(f)], ["convert", "-m", str(f), "-o", str(tmp_path / "store")]):
        one_line_error(run(*args), f"{f}: not a GGUF model")
    assert not (tmp_path / "store").exists()


def test_the_whole_tiny_gguf_file_converts(tiny_gguf: bytes, tmp_path: Path, monkeypatch) -> None:
    """The uncut file is a valid model: the failures above come from the cuts."""
    monkeypatch.setenv("FLEXRUN_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "model.gguf"
    f.write_bytes(tiny_gguf)
    r = run("convert", "-m", str(f), "-o", str(tmp_path / "store"))
    assert r.exit_code == 0 and r.exception is None, r.output
    assert TensorStore(tmp_path / "store").config.vocab_size == 40


def test_a_gguf_file_with_incomplete_tokenizer_metadata_is_one_line(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("gguf")
    monkeypatch.setenv("FLEXRUN_CACHE_DIR", str(tmp_path / "cache"))
    f = write_tiny_gguf(tmp_path / "model.gguf", scores=False)
    one_line_error(run("convert", "-m", str(f), "-o", str(tmp_path / "store")), str(f))


# ---- the real binary -------------------------------------------------------------------------------------
def _flexrun(args: list[str], stdin: bytes = b"", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flexrun", *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_the_real_binary_prints_no_traceback(job_ckpt, stores, good_store, tmp_path: Path) -> None:
    """Three of the cases above through ``python -m flexrun``: random bytes on stdin, a damaged tensor file, a
    10^12 vocabulary. Exit 1, one line on stderr, no traceback."""
    base = ["generate", "--store-dir", str(stores), "--offload-dir", str(tmp_path / "off"), "-q"]
    store = _damaged_copy(good_store, tmp_path, STORE_CASES["a byte flipped"][0])
    ckpt = _ckpt_with(tmp_path, job_ckpt, _set(vocab_size=10**12))
    runs = [
        (_flexrun([*base, "-m", str(job_ckpt.path), "-i", "-"], stdin=bytes(range(128, 256))), "<stdin>:1: not UTF-8"),
        (_flexrun([*base, "-m", str(store), "-i", "-"], stdin=GOOD), "layers.1.fc1_w.bin: checksum mismatch"),
        (_flexrun([*base, "-m", str(ckpt), "-p", "hi"]), "vocab_size 1000000000000 is past"),
    ]
    for proc, message in runs:
        err = proc.stderr.decode()
        assert proc.returncode == 1 and "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], err
