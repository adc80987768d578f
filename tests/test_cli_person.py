"""``flexrun generate`` as a person meets it: text at a terminal (a pseudo-terminal here), in the order asked,
streamed with the placement's batching; a positional prompt and plain text on stdin; the chat template a
checkpoint ships in ``chat_template.jinja`` applied to typed prompts; a chat answer's length; one id
convention; options refused up front."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run
from tests.hf_reference import OptCheckpoint

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>"
    "{% endif %}"
)
# A short prompt before a long one: longest-first order would swap them.
PROMPTS = ["hi", "the quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def chat_ckpt(job_ckpt: OptCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job checkpoint with a chat template where transformers saves it today: chat_template.jinja."""
    path = tmp_path_factory.mktemp("chat") / "ckpt"
    shutil.copytree(job_ckpt.path, path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


def _base(ckpt: Path, stores: Path, tmp: Path) -> list[str]:
    args = ["generate", "-m", str(ckpt), "--store-dir", str(stores), "--offload-dir", str(tmp / "off")]
    return [*args, "--placement", "manual", "--gpu-batch-size", "2"]


def _chat_ids(job_ckpt: OptCheckpoint, prompt: str) -> list[int]:
    tok = job_ckpt.tokenizer
    text = f"<|user|>{prompt}\n<|assistant|>"  # TEMPLATE, rendered
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _at_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """``python -m flexrun ARGS`` with stdout on a pseudo-terminal: exit code, what the terminal showed
    (newlines as written), stderr."""
    master, slave = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "flexrun", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's other side closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert p.stderr is not None
    err = p.stderr.read().decode()
    return p.wait(timeout=300), shown.decode().replace("\r\n", "\n"), err


def test_a_terminal_gets_the_text_in_order_with_the_chat_template(job_ckpt, chat_ckpt, stores, tmp_path) -> None:
    base = _base(chat_ckpt, stores, tmp_path)
    # What a program gets (stdout not a terminal): JSONL records, ids counted from 1 as --input's lines are.
    r = run(*base, *PROMPTS, "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(row["id"] for row in rows) == [1, 2]
    by_id = {row["id"]: row for row in rows}
    # Typed prompts get the template the checkpoint ships in chat_template.jinja.
    assert [by_id[k + 1]["input_ids"] for k in range(2)] == [_chat_ids(job_ckpt, p) for p in PROMPTS]

    code, shown, err = _at_a_terminal([*base, *PROMPTS, "--max-new-tokens", "5"])
    assert code == 0, err
    # Each completion under its prompt, in the order asked, the same text as the records.
    assert shown == "\n".join(f"> {p}\n{by_id[k + 1]['text']}\n" for k, p in enumerate(PROMPTS))
    assert "{" not in shown and "Traceback" not in err
    # One summary line, not the report; the length limit named for each answer it cut.
    assert err.count("tokens in") == 1 and "(--verbose for the full report)" in err and "peak resident" not in err
    cut = sum(row["finish_reason"] == "length" for row in rows)
    assert err.count("--max-new-tokens N for a longer answer") == cut


def test_chat_is_for_typed_prompts_and_recorded(job_ckpt, chat_ckpt, stores, tmp_path) -> None:
    base = _base(chat_ckpt, stores, tmp_path)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "hi"}) + "\n\n" + json.dumps({"prompt": "hello world"}) + "\n")
    # JSONL prompts are data: no template unless --chat; ids are line numbers.
    r = run(*base, "-i", str(inp), "--max-new-tokens", "2", "--order", "input")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["id"] for row in rows] == [1, 3]
    assert rows[0]["input_ids"] == job_ckpt.tokenizer("hi")["input_ids"]
    # --no-chat turns it off for a typed prompt; the job file records what was applied.
    out = tmp_path / "out.jsonl"
    r = run(*base, "hi", "--no-chat", "--max-new-tokens", "2", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["input_ids"] == job_ckpt.tokenizer("hi")["input_ids"]
    assert json.loads(Path(f"{out}.job.json").read_text())["job"]["chat"] is False
    # Plain text on stdin is one typed prompt, whole.
    r = run(*base, "--max-new-tokens", "2", input="hello\nworld\n")
    assert r.exit_code == 0, r.output
    (row,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert row["prompt"] == "hello\nworld" and row["input_ids"] == _chat_ids(job_ckpt, "hello\nworld")
    # Converted, the store keeps the template (chat_template.jinja copied with the tokenizer).
    store = tmp_path / "store"
    assert run("convert", "-m", str(chat_ckpt), "-o", str(store)).exit_code == 0
    r = run(*_base(store, stores, tmp_path), "hi", "--max-new-tokens", "2")
    assert r.exit_code == 0 and json.loads(r.stdout)["input_ids"] == _chat_ids(job_ckpt, "hi"), r.output
    # A checkpoint without a template: --chat is refused, a typed prompt goes as it is.
    plain = _base(job_ckpt.path, stores, tmp_path)
    r = run(*plain, "hi", "--chat")
    assert r.exit_code == 1 and "has no chat template; drop --chat" in r.stderr
    r = run(*plain, "hi", "--max-new-tokens", "2")
    assert r.exit_code == 0 and json.loads(r.stdout)["input_ids"] == job_ckpt.tokenizer("hi")["input_ids"]


def test_a_chat_answer_is_not_cut_at_32_tokens(job_ckpt, chat_ckpt, stores, tmp_path) -> None:
    r = run(*_base(chat_ckpt, stores, tmp_path), "hi", "--seed", "1")
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)
    room = 64 - len(row["input_ids"])  # the tiny model's 64 positions, less the prompt
    assert room > 32
    assert len(row["output_ids"]) == room or row["finish_reason"] == "eos"
    # Without the template, the default stays 32.
    r = run(*_base(chat_ckpt, stores, tmp_path), "hi", "--no-chat")
    row = json.loads(r.stdout)
    assert len(row["output_ids"]) == 32 or row["finish_reason"] == "eos"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["hi", "--input", "x.jsonl"], "give prompts either as PROMPT/--prompt or with --input, not both"),
        (["-p", "hi", "--input", "x.jsonl"], "give prompts either as PROMPT/--prompt or with --input, not both"),
        (["hi", "--stop", ""], "an empty stop string would end every sequence at once"),
        (["hi", "--format", "text", "-o", "-"], "--format text writes the text to stdout"),
    ],
    ids=["positional-and-input", "prompt-and-input", "empty-stop", "text-to-stdout-twice"],
)
def test_conflicting_or_empty_options_are_refused(job_ckpt, stores, tmp_path, extra, message) -> None:
    r = run(*_base(job_ckpt.path, stores, tmp_path), *extra)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and "Traceback" not in r.output


def test_ctrl_c_ends_the_answer_at_once(job_ckpt, stores, tmp_path) -> None:
    """Text for a person, no records kept: Ctrl-C ends the answer at its next token, not after the block."""
    import io
    import signal

    from flexrun.jobs.generate import run_generate
    from flexrun.jobs.options import EngineOptions, JobOptions, ModelOptions, PlacementRequest
    from flexrun.runtime.sampling import SamplingParams

    class Terminal(io.StringIO):
        pressed = False

        def write(self, s: str) -> int:
            if s.strip() and not self.pressed:  # the first piece of the answer
                self.pressed = True
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(s)

    opts = EngineOptions(ModelOptions(str(job_ckpt.path), store_dir=str(stores)), PlacementRequest(mode="manual"))
    params = SamplingParams(max_new_tokens=30, stop_at_eos=False)
    job = JobOptions(params=params, prompts=("hi", "hello"), text=True, order="input", quiet=True)
    shown, notes = Terminal(), io.StringIO()
    result = run_generate(opts, job, stdin=io.StringIO(), stdout=shown, stderr=notes)
    assert result.interrupted is not None and result.interrupted.exit_code == 130
    assert str(result.interrupted) == "interrupted by SIGINT"
    assert 2 <= result.new_tokens < 2 * 30  # both sequences of the block ended early
    assert shown.getvalue().startswith("> hi\n") and "cut at" not in notes.getvalue()
