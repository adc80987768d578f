"""``flexrun chat``: replies through the checkpoint's chat template with the history kept (checked against
``generate`` on the whole conversation's token ids), piped input, a terminal session (Ctrl-C at the prompt,
Ctrl-D ending it), Ctrl-C ending a reply, and a model without a template refused."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flexrun.jobs.chat import ChatOptions, run_chat
from flexrun.jobs.options import EngineOptions, ModelOptions, PlacementRequest
from flexrun.runtime.sampling import SamplingParams
from tests.helpers import run
from tests.hf_reference import OptCheckpoint

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def chat_ckpt(job_ckpt: OptCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "ckpt"
    shutil.copytree(job_ckpt.path, path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


def _model(ckpt: Path, stores: Path) -> list[str]:
    return ["-m", str(ckpt), "--store-dir", str(stores), "--placement", "manual"]


def test_replies_keep_the_history(job_ckpt, chat_ckpt, stores) -> None:
    r = run("chat", *_model(chat_ckpt, stores), "--max-new-tokens", "4", input="hi\n\nhello world\n")
    assert r.exit_code == 0, r.output
    first, second = r.stdout.splitlines()  # the blank line is no message
    assert ">>>" not in r.stdout  # no prompt when stdin is not a terminal
    assert "2 replies, " in r.stderr and "tokens in" in r.stderr
    # The first reply is generate's answer to the same typed prompt (the template applied by default).
    alone = run("generate", *_model(chat_ckpt, stores), "hi", "--max-new-tokens", "4")
    assert json.loads(alone.stdout)["text"] == first
    # The second answers the whole conversation: the first exchange, then the new message.
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first.strip()},
        {"role": "user", "content": "hello world"},
    ]
    tok = job_ckpt.tokenizer
    text = tok.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    whole = run(
        "generate", *_model(chat_ckpt, stores), "-i", "-", "--max-new-tokens", "4", input=json.dumps({"input_ids": ids})
    )
    assert json.loads(whole.stdout)["text"] == second


def test_a_system_message_opens_the_conversation(job_ckpt, chat_ckpt, stores) -> None:
    r = run("chat", *_model(chat_ckpt, stores), "--max-new-tokens", "4", "--system", "be brief", input="hi\n")
    assert r.exit_code == 0, r.output
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    tok = job_ckpt.tokenizer
    text = tok.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    alone = run(
        "generate", *_model(chat_ckpt, stores), "-i", "-", "--max-new-tokens", "4", input=json.dumps({"input_ids": ids})
    )
    assert r.stdout == json.loads(alone.stdout)["text"] + "\n"


def test_a_model_without_a_chat_template_is_refused(job_ckpt, stores) -> None:
    r = run("chat", *_model(job_ckpt.path, stores), input="hi\n")
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [
        f"Error: {job_ckpt.path.name} has no chat template, so it cannot chat; `flexrun generate` completes plain "
        "text with it"
    ]


def test_ctrl_c_ends_a_reply_and_the_session_goes_on(chat_ckpt, stores) -> None:
    class Interrupting(io.StringIO):
        """A terminal whose user presses Ctrl-C as the first reply's first piece of text appears."""

        pressed = False

        def write(self, s: str) -> int:
            if s and not self.pressed:
                self.pressed = True
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(s)

    notes: list[str] = []
    opts = EngineOptions(ModelOptions(str(chat_ckpt), store_dir=str(stores)), PlacementRequest(mode="manual"))
    chat = ChatOptions(SamplingParams(max_new_tokens=12, stop_at_eos=False), max_new_tokens_given=True)
    out = Interrupting()
    result = run_chat(opts, chat, io.StringIO("hi\nhello world\n"), out, notes.append)
    assert result.turns == 2
    assert "(reply interrupted)" in notes
    # The interrupted reply stopped at once; the next one ran to its length.
    assert result.new_tokens < 12 + 12 and result.new_tokens >= 12 + 1


def test_a_terminal_session(chat_ckpt, stores) -> None:
    """stdin and stdout on a pseudo-terminal: a prompt before each message, Ctrl-C at the prompt is not the
    end, a reply, and Ctrl-D ends the session, exit 0."""
    master, slave = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "flexrun", "chat", *_model(chat_ckpt, stores), "--max-new-tokens", "3"],
        cwd=ROOT,
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    shown = b""

    def wait_for(what: bytes, count: int = 1) -> None:
        nonlocal shown
        deadline = time.monotonic() + 120
        while shown.count(what) < count:
            assert time.monotonic() < deadline, shown
            if select.select([master], [], [], 1)[0]:
                shown += os.read(master, 4096)

    wait_for(b">>> ")
    p.send_signal(signal.SIGINT)
    wait_for(b">>> ", 2)  # a fresh prompt
    os.write(master, b"hi\n")
    wait_for(b">>> ", 3)
    os.write(master, b"\x04")  # Ctrl-D
    assert p.wait(timeout=120) == 0
    os.close(master)
    assert p.stderr is not None
    err = p.stderr.read().decode()
    assert "(Ctrl-D ends the session)" in err and "1 replies" in err and "Traceback" not in err, err


def test_a_turn_prefills_only_what_the_cache_does_not_hold(job_ckpt, tmp_path) -> None:
    """Turn by turn, with the cache carried over (weights and cache on disk too), the tokens are those of
    the whole conversation generated afresh; each turn computes only the tokens after what it reused."""
    from flexrun.runtime.engine import Engine
    from flexrun.runtime.session import SessionEngine
    from flexrun.weights.convert import convert_checkpoint
    from flexrun.weights.store import TensorStore
    from tests.helpers import place

    store = TensorStore(convert_checkpoint(job_ckpt.path, tmp_path / "store", progress=False))
    params = SamplingParams(max_new_tokens=5, stop_at_eos=False)
    first = [2, 40, 41, 42, 43]
    for placement in (place(b=1), place("host=50,disk=50", "disk=100", b=1)):
        with SessionEngine(store, placement, max_seq_len=40, offload_dir=tmp_path / "off") as session:
            out1, _, reused1 = session.turn(first, params)
            # The next turn: the conversation so far (as its template would render it), then new tokens.
            second = first + out1 + [7, 8, 9]
            out2, stats, reused2 = session.turn(second, params)
        with Engine(store, placement, max_seq_len=40, offload_dir=tmp_path / "off") as fresh:
            (ref1, ref2), _, _ = fresh.generate([first, second], params)
        assert (out1, out2) == (ref1, ref2)
        assert reused1 == 0
        assert reused2 == len(first) + len(out1) - 1  # the last reply token was sampled, never fed
        assert stats.input_tokens == len(second) - reused2 == 4


def test_the_chat_summary_says_what_the_cache_saved(chat_ckpt, stores) -> None:
    r = run("chat", *_model(chat_ckpt, stores), "--max-new-tokens", "3", input="hi\nhello world\n")
    assert r.exit_code == 0, r.output
    summary = r.stderr.strip().splitlines()[-1]
    computed, total = (int(w) for w in summary.split("; ")[1].split()[:5:4])
    assert computed < total and "reused from the cache" in summary
