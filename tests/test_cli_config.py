from __future__ import annotations

import json

from tests.helpers import run


def test_help_and_version() -> None:
    for flag in ("-h", "--help"):
        result = run(flag)
        assert result.exit_code == 0 and "flexrun" in result.output and "config" in result.output
    result = run("--version")
    assert result.exit_code == 0 and result.output.startswith("flexrun, version")


def test_config_text() -> None:
    result = run("config", "facebook/opt-30b")
    assert result.exit_code == 0
    assert "hidden_size            7168" in result.output
    assert "55.8 GiB" in result.output


def test_config_json_exact_bytes() -> None:
    result = run("config", "galactica-30b", "--json", "--batch-size", "4", "--prompt-len", "100", "--gen-len", "28")
    assert result.exit_code == 0
    data = json.loads(result.output)
    cfg = data["config"]
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["n_head"]) == (7168, 50000, 56)
    assert data["cache_bytes"] == 2 * 48 * 4 * 128 * 7168 * 2
    assert data["hidden_bytes"] == 4 * 100 * 7168 * 2


def test_unknown_model_exits_1_with_one_line() -> None:
    result = run("config", "facebook/opt-999b")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "close matches" in lines[0] and "Traceback" not in result.output


def test_bad_option_value_exits_2() -> None:
    assert run("config", "opt-1.3b", "--batch-size", "-3").exit_code == 2
    assert run("config", "opt-1.3b", "--dtype", "int3").exit_code == 2
