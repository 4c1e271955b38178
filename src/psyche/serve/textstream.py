"""What of a completion's growing text may be sent yet: stop sequences and unfinished characters.

A completion is decoded again from all its tokens after each new one (byte-level BPE
tokens can split a character, so decoding tokens one at a time would garble it). The
:class:`TextStream` takes that whole text each time and hands out only the part that is
final:

1. a trailing U+FFFD (the replacement a decoder gives for a character still missing bytes)
   waits for the next token, which may complete it;
2. a tail that could be the start of a stop sequence waits until it either becomes one or
   cannot any more;
3. at the first stop sequence the text ends, and the stop sequence itself is never sent
   (as OpenAI's API does).

Pure: no torch, no tokenizer; the text comes in, the pieces go out. The pieces joined are
always the final text cut at its first stop sequence (``tests/test_serve_textstream.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop sequence (earliest start; empty sequences are ignored),
    and whether one was found.

    >>> cut_at_stop("a cat. a dog.", [".", "dog"])
    ('a cat', True)
    >>> cut_at_stop("a cat", ["dog"])
    ('a cat', False)
    """
    found = [i for s in stop if s and (i := text.find(s)) >= 0]
    return (text[: min(found)], True) if found else (text, False)


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop sequence."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class TextStream:
    """One completion's text, handed out piece by piece as it becomes final (module docstring).

    >>> ts = TextStream(stop=["\\n\\n"])
    >>> ts.feed("Hello"), ts.feed("Hello\\n"), ts.feed("Hello\\nBye")
    ('Hello', '', '\\nBye')
    >>> ts.feed("Hello\\nBye\\n\\nAnd more"), ts.stopped
    ('', True)
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.sent = ""
        """The text handed out so far."""
        self.stopped = False
        """Whether a stop sequence ended the text (nothing more is handed out)."""
        self.ended = False
        """Whether :meth:`finish` was called (nothing more is handed out)."""

    def feed(self, text: str) -> str:
        """Take the whole text decoded so far; return the new piece that may be sent now."""
        if self.stopped or self.ended:
            return ""
        text, self.stopped = cut_at_stop(text, self.stop)
        if not self.stopped:
            text = text.rstrip(REPLACEMENT)
            text = text[: len(text) - _held_back(text, self.stop)]
        return self._advance(text)

    def finish(self, text: str) -> str:
        """Take the final text (no token will follow); return what is left to send."""
        if self.stopped or self.ended:
            return ""
        self.ended = True
        text, self.stopped = cut_at_stop(text, self.stop)
        return self._advance(text)

    def _advance(self, text: str) -> str:
        # A decoder may revise what it decoded before (a character completed by a later
        # token); what was sent stays sent, and only text past it goes out.
        if len(text) <= len(self.sent):
            return ""
        piece = text[len(self.sent):]
        self.sent = text
        return piece
