"""Completions as text for a person (``generate`` at a terminal, or ``--format text``): in input order, each
streamed as it is generated, labelled with its prompt when there are several.

A block generates its sequences together; the first one not yet printed streams live and the others'
text is held until their turn, so the batching stays the planner's and the text still reads in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flexrun.jobs.prompts import Sequence
from flexrun.jobs.streaming import TextStream

#: Characters of a prompt shown in its label.
LABEL_CHARS = 72


def label(s: Sequence, n: int) -> str:
    """``> the prompt's first line`` (cut to LABEL_CHARS), with ``(2/3)`` for one of several completions."""
    if s.record.prompt is not None:
        first = s.record.prompt.strip().splitlines()[0] if s.record.prompt.strip() else ""
        shown = first if len(first) <= LABEL_CHARS else first[: LABEL_CHARS - 3] + "..."
    else:
        shown = f"{len(s.ids)} token ids (id {s.record.id})"
    return f"> {shown}" + (f"  ({s.seq + 1}/{n})" if n > 1 else "")


class TextPrinter:
    """Prints one block's completions in order as their tokens arrive (``on_step``), then the rest (``end``).

    ``write`` takes the text for stdout; ``notice`` a line for stderr (a completion cut by the length limit
    says so, naming the flag)."""

    def __init__(
        self,
        tokenizer: Any,
        stop: tuple[str, ...],
        eos: frozenset[int],
        stop_at_eos: bool,
        max_new: int,
        write: Callable[[str], None],
        notice: Callable[[str], None],
        labelled: bool,
        returns: int = 1,
    ) -> None:
        self.tokenizer, self.stop, self.eos, self.stop_at_eos = tokenizer, stop, eos, stop_at_eos
        self.max_new, self.write, self.notice = max_new, write, notice
        self.labelled, self.returns = labelled, returns
        self.printed = 0  # completions printed so far, over all blocks
        self._chunk: list[Sequence] = []

    def begin(self, chunk: list[Sequence]) -> None:
        self._chunk = chunk
        self._streams = [TextStream(self.tokenizer, self.stop) for _ in chunk]
        self._held = ["" for _ in chunk]
        self._done = [False for _ in chunk]
        self._eos = [False for _ in chunk]
        self._ending = [False for _ in chunk]
        self._head = 0
        self._started = False

    def on_step(self, members: list[int], last: list[int]) -> None:
        """The engine's per-step callback: ``last[k]`` is member ``members[k]``'s newest token."""
        for r, token in zip(members, last, strict=True):
            if self._done[r]:
                continue
            stream = self._streams[r]
            piece = stream.push(token)
            if self.stop_at_eos and token in self.eos:
                self._done[r] = self._eos[r] = True
            elif stream.stopped or self._ending[r] or len(stream.tokens) >= self.max_new:
                self._done[r] = True
            if r == self._head:
                self._open_head()
                if piece:
                    self.write(piece)
            else:
                self._held[r] += piece
        while self._head < len(self._chunk) and self._done[self._head]:
            self._close_head()

    def ending(self, member: int) -> None:
        """The engine's stop check ended ``member`` at the token it is about to report."""
        self._ending[member] = True

    def end(self) -> None:
        """The block finished: whatever is left, in order."""
        while self._head < len(self._chunk):
            self._done[self._head] = True
            self._close_head()

    def _open_head(self) -> None:
        if self._started:
            return
        self._started = True
        if self.labelled:
            self.write(("\n" if self.printed else "") + label(self._chunk[self._head], self.returns) + "\n")
        if self._held[self._head]:
            self.write(self._held[self._head])

    def _close_head(self) -> None:
        r = self._head
        self._open_head()
        stream = self._streams[r]
        self.write(stream.finish() + "\n")
        if not self._eos[r] and not stream.stopped and not self._ending[r]:
            self.notice(f"(cut at {self.max_new} new tokens; --max-new-tokens N for a longer answer)")
        self.printed += 1
        self._head += 1
        self._started = False
