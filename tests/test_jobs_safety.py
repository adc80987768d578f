"""Loading never runs code from a checkpoint: pickles that need it are refused, ``auto_map`` code is ignored;
and the incremental detokenizer that ``--stream`` uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexrun.errors import CheckpointError
from flexrun.jobs.streaming import TextStream, cut_at_stop
from flexrun.weights.checkpoint import Checkpoint
from tests.helpers import run
from tests.hf_reference import save_tiny_opt


class _Payload:
    """Unpickling this would run ``Path.touch`` on the marker: code execution at load time."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_needs_code_is_refused(tmp_path: Path) -> None:
    ckpt, model, _ = save_tiny_opt(tmp_path / "ckpt", seed=1)
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    # A .bin checkpoint whose pickle calls a function on load (the classic malicious checkpoint).
    marker = tmp_path / "ran"
    torch.save({**model.state_dict(), "evil": _Payload(marker)}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refused to load .*only plain tensor pickles are accepted"):
        Checkpoint(ckpt)
    # Token ids: the checkpoint has no tokenizer, and a prompt it cannot read is refused before converting.
    r = run("generate", "-m", str(ckpt), "--store-dir", str(tmp_path / "s"), "-i", "-", input='{"input_ids": [5]}\n')
    assert r.exit_code == 1 and "refused to load" in r.output and "Traceback" not in r.output, r.output
    assert not marker.exists()


def test_custom_code_in_a_checkpoint_is_never_run(tmp_path: Path) -> None:
    ckpt = save_tiny_opt(tmp_path / "ckpt", seed=2, tokenizer=True, vocab_size=300).path
    marker = tmp_path / "ran"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    code += "from transformers import PreTrainedTokenizerFast, OPTForCausalLM\n"
    code += "class Evil(OPTForCausalLM): pass\nclass EvilTok(PreTrainedTokenizerFast): pass\n"
    (ckpt / "evil.py").write_text(code)
    for name, auto_map in (
        ("config.json", {"AutoModelForCausalLM": "evil.Evil", "AutoConfig": "evil.Evil"}),
        ("tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTok", "evil.EvilTok"]}),
    ):
        cfg = json.loads((ckpt / name).read_text())
        (ckpt / name).write_text(json.dumps({**cfg, "auto_map": auto_map}))
    args = ["generate", "-m", str(ckpt), "--store-dir", str(tmp_path / "s"), "-p", "hello world", "-q"]
    r = run(*args, "--max-new-tokens", "3")
    # The built-in OPT policy and the tokenizer's own tokenizer.json are used; evil.py is never imported.
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["text"] is not None
    assert not marker.exists()


class _Chars:
    """A stand-in tokenizer whose tokens are UTF-8 bytes, so one character can span several tokens."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _stream(text: str, stop: tuple[str, ...] = ()) -> list[str]:
    s = TextStream(_Chars(), stop)
    return [s.push(b) for b in text.encode()] + [s.finish()]


def test_stream_holds_half_characters_and_possible_stop_strings() -> None:
    pieces = _stream("café ok")
    assert "".join(pieces) == "café ok"
    assert "\ufffd" not in "".join(pieces[:-1])  # "é" is two bytes: nothing printed between them
    # "EN" might start the stop string "END": held back until "ENx" shows it does not.
    pieces = _stream("aENxbEND tail", stop=("END",))
    assert "".join(pieces) == "aENxb" and pieces[1:3] == ["", ""]
    assert cut_at_stop("one STOP two END", ("END", "STOP")) == ("one ", True)
    # Without a tokenizer the ids themselves are streamed.
    s = TextStream(None)
    assert s.push(5) + s.push(17) + s.finish() == " 5 17"
