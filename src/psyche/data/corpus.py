"""Plain text → documents: pure string functions, no I/O.

The default corpus is Debian's ``fortunes``: files of fortune cookies separated by
lines holding only ``%``. Some cookies use teletype overstriking (``_\\b`` underlines,
``X\\bX`` bold) and bells; :func:`clean_text` renders those to what a terminal shows.
"""

from __future__ import annotations

import hashlib
import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _render_overstrike(line: str) -> str:
    # A backspace moves the cursor left; a later character overprints the cell. An
    # underscore or space never hides a visible character (that is what underlining is).
    cells: list[str] = []
    cursor = 0
    for ch in line:
        if ch == "\b":
            cursor = max(0, cursor - 1)
            continue
        if cursor < len(cells):
            if ch not in "_ " or cells[cursor] in "_ ":
                cells[cursor] = ch
        else:
            cells.append(ch)
        cursor += 1
    return "".join(cells)


def clean_text(text: str) -> str:
    """Resolve backspace overstriking, drop other control characters except tab/newline,
    normalise line ends to ``\\n`` and strip trailing spaces on each line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = []
    for line in text.split("\n"):
        if "\b" in line:
            line = _render_overstrike(line)
        lines.append(_CONTROL.sub("", line).rstrip())
    return "\n".join(lines)


def split_documents(text: str) -> list[str]:
    """Split a text into documents.

    If some line is exactly ``%`` (the fortune format), those lines separate documents;
    otherwise blank lines do (paragraphs). Documents are cleaned with :func:`clean_text`,
    stripped of surrounding blank lines, and empty ones are dropped.
    """
    text = clean_text(text)
    lines = text.split("\n")
    if "%" in lines:
        parts: list[str] = []
        cur: list[str] = []
        for line in lines:
            if line == "%":
                parts.append("\n".join(cur))
                cur = []
            else:
                cur.append(line)
        parts.append("\n".join(cur))
    else:
        parts = re.split(r"\n\s*\n", text)
    return [p.strip("\n") for p in parts if p.strip()]


def document_hash(doc: str) -> float:
    """A number in ``[0, 1)`` determined by the document's text alone."""
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "big") / 2**64


def split_validation(docs: list[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Indices of the training and the validation documents.

    A document is held out when its text hash is below ``val_fraction``, so the split
    depends on each document alone (identical documents always share a side; adding
    files does not move old documents). With two or more documents and
    ``0 < val_fraction < 1``, each side gets at least one.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1) (got {val_fraction})")
    hashes = [document_hash(d) for d in docs]
    val = {i for i, h in enumerate(hashes) if h < val_fraction}
    if val_fraction > 0 and len(docs) >= 2:
        if not val:
            val = {min(range(len(docs)), key=lambda i: hashes[i])}
        if len(val) == len(docs):
            val.discard(max(range(len(docs)), key=lambda i: hashes[i]))
    train = [i for i in range(len(docs)) if i not in val]
    return train, sorted(val)
