"""One peer's results for one step as a single blob: what the P2P layer ships.

Layout, version 1::

    b"PDP" | u8 version (=1) | uvarint count | (uvarint length | SparseResult bytes) × count

Canonical: equal result lists give equal bytes, so a blob's hash names its content.
"""

from __future__ import annotations

from collections.abc import Sequence

from psyche.distro.codec import SparseResult, _get_uvarint, _put_uvarint, read_header

MAGIC = b"PDP"
PAYLOAD_VERSION = 1


def encode_payload(results: Sequence[SparseResult]) -> bytes:
    """Pack a peer's results (one per parameter, in parameter order) into one blob."""
    out = bytearray(MAGIC)
    out.append(PAYLOAD_VERSION)
    _put_uvarint(out, len(results))
    for r in results:
        blob = r.to_bytes()
        _put_uvarint(out, len(blob))
        out += blob
    return bytes(out)


def decode_payload(
    data: bytes | bytearray | memoryview,
    expected_shapes: Sequence[Sequence[int]],
    *,
    expected_codecs: Sequence[tuple[int, int]] | None = None,
) -> list[SparseResult]:
    """Parse :func:`encode_payload` output and check it against the model's parameter shapes.

    ``expected_codecs``: the ``(chunk, topk)`` each result must use
    (:meth:`psyche.distro.DisTrO.result_codecs`), if the caller knows them. Each
    result's header is checked against its shape (and codec) before its body is
    decoded: a hostile header could otherwise make the receiver tile a huge shape or
    build a large index table for a ``(chunk, topk)`` the model never uses.

    Raises ``ValueError`` naming the problem: bad magic or version, truncation,
    a count, a shape or a codec that does not match the expected ones, trailing
    bytes, or any malformed result (with its index).
    """
    if expected_codecs is not None and len(expected_codecs) != len(expected_shapes):
        raise ValueError(f"{len(expected_codecs)} expected codecs for {len(expected_shapes)} shapes")
    view = memoryview(bytes(data))
    if len(view) < 4 or bytes(view[:3]) != MAGIC:
        raise ValueError("not a DisTrO payload (bad magic)")
    if view[3] != PAYLOAD_VERSION:
        raise ValueError(f"unsupported payload version {view[3]} (this build reads {PAYLOAD_VERSION})")
    count, pos = _get_uvarint(view, 4, "result count")
    if count != len(expected_shapes):
        raise ValueError(f"payload holds {count} results, expected {len(expected_shapes)}")
    results = []
    for i, shape in enumerate(expected_shapes):
        length, pos = _get_uvarint(view, pos, f"length of result {i}")
        if pos + length > len(view):
            raise ValueError(f"result {i} runs past the end of the payload")
        blob = view[pos : pos + length]
        try:
            header = read_header(blob)
        except ValueError as exc:
            raise ValueError(f"result {i}: {exc}") from exc
        if header.shape != tuple(int(d) for d in shape):
            raise ValueError(f"result {i} has shape {header.shape}, expected {tuple(shape)}")
        if expected_codecs is not None and (header.chunk, header.topk) != tuple(expected_codecs[i]):
            chunk, topk = expected_codecs[i]
            raise ValueError(f"result {i} has chunk {header.chunk} and topk {header.topk}, "
                             f"expected chunk {chunk} and topk {topk}")
        try:
            r = SparseResult.from_bytes(blob)
        except ValueError as exc:
            raise ValueError(f"result {i}: {exc}") from exc
        results.append(r)
        pos += length
    if pos != len(view):
        raise ValueError(f"{len(view) - pos} trailing bytes after the last result")
    return results
