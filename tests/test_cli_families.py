"""config / bench --dummy-weights / generate through the CLI for every supported decoder family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexrun.config import DTYPE_BYTES
from tests.helpers import run
from tests.hf_decoders import FAMILIES, tiny_decoder
from tests.hf_reference import hf_param_bytes, hf_tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_and_dummy_bench_need_only_config_json(family: str, tmp_path: Path) -> None:
    model = tiny_decoder(family)
    model.config.save_pretrained(tmp_path / "cfg")  # config.json only, no weights
    result = run("config", str(tmp_path / "cfg"), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    # Exactly the HF model's parameters at the config's dtype (a config.json alone defaults to float16).
    assert info["config"]["arch"] == family
    assert info["model_bytes"] == hf_param_bytes(model, DTYPE_BYTES[info["config"]["dtype"]])
    result = run(
        "bench",
        "-m",
        str(tmp_path / "cfg"),
        "--dummy-weights",
        "--store-dir",
        str(tmp_path / "stores"),
        "--offload-dir",
        str(tmp_path / "off"),
        "--weights",
        "host=50,disk=50",
        "--cache",
        "host=100",
        "--activations",
        "host=100",
        "--gpu-batch-size",
        "2",
        "--num-gpu-batches",
        "2",
        "--prompt-len",
        "8",
        "--gen-len",
        "3",
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["generated_tokens"] == 4 * 3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_from_a_local_checkpoint(family: str, tmp_path: Path) -> None:
    model = tiny_decoder(family, seed=4)
    model.save_pretrained(tmp_path / "ckpt")
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps({"input_ids": ids}) for ids in ([5, 6, 7, 8], [9, 10])) + "\n")
    result = run(
        "generate",
        "-m",
        str(tmp_path / "ckpt"),
        "--store-dir",
        str(tmp_path / "stores"),
        "--offload-dir",
        str(tmp_path / "off"),
        "--input",
        str(inp),
        "--weights",
        "disk=100",
        "--cache",
        "host=100",
        "--activations",
        "host=100",
        "--gpu-batch-size",
        "1",
        "--num-gpu-batches",
        "2",
        "--dtype",
        "float32",
        "--max-new-tokens",
        "4",
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    for row in rows:
        # Generation stops at EOS on both sides.
        assert row["output_ids"] == hf_tokens(model, row["input_ids"], 4)
    assert len(rows) == 2
