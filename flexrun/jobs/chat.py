"""``flexrun chat``: an interactive session with a model through its chat template.

The engine is built once, for the model's context, and each turn generates over the whole conversation so
far (the oldest turns dropped when it no longer fits); the KV cache of earlier turns is kept, so a turn
prefills only what is new (``runtime.session``). The reply is streamed as it is generated; Ctrl-C
ends the reply (the part already shown is kept in the history), Ctrl-D or end of input ends the session.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any, cast

from flexrun.errors import InputError
from flexrun.jobs.autoplace import build_engine, plan_job
from flexrun.jobs.options import EngineOptions
from flexrun.jobs.prompts import has_chat_template, load_tokenizer
from flexrun.jobs.streaming import TextStream, cut_at_stop
from flexrun.runtime.sampling import SamplingParams
from flexrun.runtime.session import SessionEngine
from flexrun.runtime.tiers import compute_device

#: The longest reply by default: a share of the context, so the history keeps room.
DEFAULT_REPLY = 512


@dataclass(frozen=True)
class ChatOptions:
    """What ``flexrun chat`` was asked for, apart from the model and placement."""

    params: SamplingParams
    system: str | None = None  # a system message opening the conversation
    max_new_tokens_given: bool = False  # else a reply may take DEFAULT_REPLY tokens, or a quarter of the context
    prompt: str = ">>> "  # shown before each message when stdin is a terminal
    verbose: bool = False


@dataclass
class ChatResult:
    """A session's totals, for its summary line."""

    turns: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0  # the turns' prompts: the whole conversation each time
    prefilled: int = 0  # of those, computed (the rest came from the cache)
    seconds: float = 0.0
    model: str = ""


class _Interrupt:
    """SIGINT during a reply asks the reply to end at its next token (the engine is never cut mid-step)."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    @contextmanager
    def installed(self) -> Iterator[_Interrupt]:
        self.requested = False
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class _Conversation:
    """The messages so far, turned into token ids that fit ``room`` (oldest turns dropped first)."""

    def __init__(self, tokenizer: Any, system: str | None, room: int) -> None:
        self.tokenizer, self.room = tokenizer, room
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict[str, str]] = []

    def ids(self, message: str) -> list[int] | None:
        """The token ids of the conversation with ``message`` added, or None when ``message`` alone does
        not fit; older turns that no longer fit are forgotten."""
        turns = [*self.turns, {"role": "user", "content": message}]
        while True:
            text = self.tokenizer.apply_chat_template(self.system + turns, add_generation_prompt=True, tokenize=False)
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(ids) <= self.room:
                self.turns = turns
                return ids
            if len(turns) <= 1:
                return None
            turns = turns[2:]  # the oldest exchange

    def reply(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})


def run_chat(
    opts: EngineOptions,
    chat: ChatOptions,
    stdin: IO[str],
    stdout: IO[str],
    notify: Callable[[str], None],
) -> ChatResult:
    """The session: messages read a line at a time from ``stdin``, replies streamed to ``stdout``."""
    model = opts.model.source("generate")
    tokenizer = load_tokenizer(model)
    name = model.config.name
    if tokenizer is None or not has_chat_template(tokenizer):
        raise InputError(
            f"{name} has no chat template, so it cannot chat; `flexrun generate` completes plain text with it"
        )
    context = model.config.max_seq_len
    reply = chat.params.max_new_tokens if chat.max_new_tokens_given else min(DEFAULT_REPLY, context // 4)
    if reply >= context:
        raise InputError(f"--max-new-tokens {reply} leaves no room for a message in {name}'s {context} positions")
    params = dataclasses.replace(chat.params, max_new_tokens=reply)
    settled = plan_job(opts, model, context - reply, reply, 1)
    store = settled.opts.model.open_store("generate", progress=True)
    cfg = settled.opts.model.run_config(store, compute_device())
    built, plan_line = build_engine(
        store, cfg, settled.opts, context - reply, reply, 1, settled.planned, runner=SessionEngine
    )
    engine = cast(SessionEngine, built)
    if plan_line and chat.verbose:
        notify(plan_line)
    conversation = _Conversation(tokenizer, chat.system, context - reply)
    result = ChatResult(model=name)
    eos = store.config.stop_token_ids
    terminal = stdin.isatty()
    with engine:
        while True:
            try:  # the prompt inside: Ctrl-C the moment it shows must not end the session
                if terminal:
                    stdout.write(chat.prompt)
                    stdout.flush()
                line = stdin.readline()
            except KeyboardInterrupt:
                stdout.write("\n")
                notify("(Ctrl-D ends the session)")
                continue
            if not line:  # Ctrl-D, or the end of piped input
                if terminal:
                    stdout.write("\n")
                break
            message = line.rstrip("\n")
            if not message.strip():
                continue
            ids = conversation.ids(message)
            if ids is None:
                notify(f"(that message does not fit the {context - reply} positions left for the conversation)")
                continue
            started = time.perf_counter()
            text, count, reused = _reply(engine, ids, params, tokenizer, eos, result.turns, stdout, notify)
            result.seconds += time.perf_counter() - started
            result.turns += 1
            result.new_tokens += count
            result.prompt_tokens += len(ids)
            result.prefilled += len(ids) - reused
            conversation.reply(text)
    return result


def _reply(
    engine: SessionEngine,
    ids: list[int],
    params: SamplingParams,
    tokenizer: Any,
    eos: frozenset[int],
    turn: int,
    stdout: IO[str],
    notify: Callable[[str], None],
) -> tuple[str, int, int]:
    """Generate one reply, streamed to ``stdout``; its text, its token count and how many of ``ids`` the
    cache held."""
    stream = TextStream(tokenizer, params.stop)
    done = False

    def on_step(members: list[int], last: list[int]) -> None:
        nonlocal done
        if done:
            return
        stdout.write(stream.push(last[0]))
        stdout.flush()
        done = last[0] in eos or stream.stopped

    interrupt = _Interrupt()
    with interrupt.installed():
        new, _, reused = engine.turn(
            ids, params, seed=turn, on_step=on_step, stop_check=lambda member, toks: interrupt.requested
        )
    stdout.write(stream.finish() + "\n")
    stdout.flush()
    text, _ = cut_at_stop(tokenizer.decode(stream.tokens, skip_special_tokens=True), params.stop)
    if interrupt.requested:
        notify("(reply interrupted)")
    elif len(new) >= params.max_new_tokens and new[-1] not in eos:
        notify(f"(cut at {params.max_new_tokens} tokens; --max-new-tokens N for longer replies)")
    return text.strip(), len(new), reused
