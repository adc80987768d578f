"""Incremental detokenization for ``generate --stream``, and stop strings applied to decoded text.

Tokens are decoded together (a byte-level token can hold half of a UTF-8 character, and some tokenizers
only place spaces right in context), and the text is released as it becomes final: an incomplete
character at the end, or a tail that could be the start of a stop string, is held back until the next
token settles it.
"""

from __future__ import annotations

from typing import Any


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    cuts = [text.index(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _held_tail(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """Turns one sequence's tokens into text pieces as they are generated."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already released
        self.stopped = False

    def _text(self) -> str:
        if self.tokenizer is None:
            return "".join(f" {t}" for t in self.tokens)
        return str(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def push(self, token: int) -> str:
        """Add a token; returns the text that became final (often empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text, self.stopped = cut_at_stop(self._text(), self.stop)
        if not self.stopped:
            if text.endswith("\ufffd"):  # half a character: wait for the rest of its bytes
                return ""
            text = text[: len(text) - _held_tail(text, self.stop)]
        piece = text[self.sent :] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return piece

    def finish(self) -> str:
        """The text still held back when the sequence ends."""
        text, _ = cut_at_stop(self._text(), self.stop)
        piece = text[self.sent :]
        self.sent = len(text)
        return piece
