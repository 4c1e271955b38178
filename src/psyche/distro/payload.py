"""One peer's results for one step as a single blob: what the P2P layer ships.

Layout, version 2::

    b"PDP" | u8 version (=2) | layout tag (4 bytes) | SparseResult.body × count

Every peer of a run derives the same :class:`~psyche.distro.codec.ResultLayout` per
parameter (shape, chunk, topk, one-bit, dtype) from the model and the optimizer
(:meth:`psyche.distro.DisTrO.result_layouts`), so a payload carries none of them: each
body's size follows from its layout. The layout tag (the first 4 bytes of SHA-256
over the results' headers, in order) tells a payload made for other parameters or
other codec settings from a corrupt one. Version 1 sent every result with its header
and length, 7–12 % of the bytes on models under 1M parameters.

Canonical: equal result lists give equal bytes, so a blob's hash names its content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache

from psyche.distro.codec import ResultLayout, SparseResult

MAGIC = b"PDP"
PAYLOAD_VERSION = 2
TAG_SIZE = 4


@lru_cache(maxsize=16)
def layout_tag(layouts: tuple[ResultLayout, ...]) -> bytes:
    """The 4-byte tag naming an ordered list of result layouts (see the module docstring)."""
    h = hashlib.sha256()
    for layout in layouts:
        h.update(layout.header())
    return h.digest()[:TAG_SIZE]


def encode_payload(results: Sequence[SparseResult]) -> bytes:
    """Pack a peer's results (one per parameter, in parameter order) into one blob."""
    out = bytearray(MAGIC)
    out.append(PAYLOAD_VERSION)
    out += layout_tag(tuple(r.layout for r in results))
    for r in results:
        out += r.body()
    return bytes(out)


def decode_payload(data: bytes | bytearray | memoryview, layouts: Sequence[ResultLayout]) -> list[SparseResult]:
    """Parse :func:`encode_payload` output made for ``layouts`` (one per parameter, in order).

    Raises ``ValueError`` naming the problem: bad magic or version, a payload made for
    other layouts (another model, or other codec settings), truncation, trailing bytes,
    or a malformed result (with its index). Nothing is sized by the payload's own claims:
    the layouts are the receiver's.
    """
    view = memoryview(bytes(data))
    if len(view) < 4 or bytes(view[:3]) != MAGIC:
        raise ValueError("not a DisTrO payload (bad magic)")
    if view[3] != PAYLOAD_VERSION:
        raise ValueError(f"unsupported payload version {view[3]} (this build reads {PAYLOAD_VERSION})")
    layouts = tuple(layouts)
    pos = 4 + TAG_SIZE
    if len(view) < pos:
        raise ValueError("truncated payload: no layout tag")
    if bytes(view[4:pos]) != layout_tag(layouts):
        raise ValueError(f"payload made for other parameters or codec settings than these {len(layouts)} "
                         "(its layout tag differs): another model, or another chunk, topk or one_bit")
    results = []
    for i, layout in enumerate(layouts):
        size = layout.body_size
        if pos + size > len(view):
            raise ValueError(f"result {i} runs past the end of the payload")
        try:
            results.append(SparseResult.from_body(view[pos : pos + size], layout))
        except ValueError as exc:
            raise ValueError(f"result {i}: {exc}") from exc
        pos += size
    if pos != len(view):
        raise ValueError(f"{len(view) - pos} trailing bytes after the last result")
    return results
