"""Sans-io blob storage and the checks applied to a blob while it is received.

Blobs are content-addressed by :func:`psyche.p2p.wire.content_hash` (blake3,
32 bytes) and tagged with the step they belong to so old ones can be dropped
(the node keeps the current step and the two before it by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from psyche.p2p.wire import content_hash


@dataclass(slots=True)
class _Entry:
    data: bytes
    step: int | None


class BlobStore:
    """In-memory content-addressed blobs with a step tag each."""

    def __init__(self) -> None:
        self._blobs: dict[bytes, _Entry] = {}

    def put(self, data: bytes, *, step: int | None) -> bytes:
        """Store ``data`` under its content hash and return the hash.

        ``step=None`` pins the blob (never dropped by step). Storing an existing
        blob again keeps the newer step tag.
        """
        h = content_hash(data)
        self._insert(h, bytes(data), step)
        return h

    def put_verified(self, blob_hash: bytes, data: bytes, *, step: int | None) -> None:
        """Store ``data`` the caller has already checked hashes to ``blob_hash``."""
        self._insert(blob_hash, data, step)

    def insert_unchecked(self, blob_hash: bytes, data: bytes, *, step: int | None = None) -> None:
        """Store ``data`` under a hash it may not have: only for playing a lying peer in tests."""
        self._insert(blob_hash, data, step)

    def _insert(self, h: bytes, data: bytes, step: int | None) -> None:
        old = self._blobs.get(h)
        if old is not None and old.step is not None and step is not None:
            step = max(step, old.step)
        self._blobs[h] = _Entry(data, step)

    def get(self, blob_hash: bytes) -> bytes | None:
        """The blob's bytes, or None if not held."""
        e = self._blobs.get(blob_hash)
        return None if e is None else e.data

    def __contains__(self, blob_hash: bytes) -> bool:
        return blob_hash in self._blobs

    def __len__(self) -> int:
        return len(self._blobs)

    def drop_older_than(self, step: int) -> int:
        """Remove blobs tagged with a step < ``step``; returns how many were removed."""
        old = [h for h, e in self._blobs.items() if e.step is not None and e.step < step]
        for h in old:
            del self._blobs[h]
        return len(old)

    def total_bytes(self) -> int:
        """Bytes held."""
        return sum(len(e.data) for e in self._blobs.values())


class BlobCheckError(Exception):
    """A received blob is bad; ``reason`` is ``oversized``, ``truncated`` or ``hash_mismatch``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class BlobReceiver:
    """Accumulates a blob's bytes and checks them against the expected size and hash.

    ``expected_hash=None`` checks the size only (for data verified another way,
    such as a manifest chosen by digest or majority). Feed chunks in arrival order
    with :meth:`feed` (raises ``oversized`` as soon as more than ``size`` bytes
    arrive, so a lying peer cannot make us buffer more than we agreed to), then
    call :meth:`finish` at end of stream.

    ``into``, a writable buffer of exactly ``size`` bytes, makes the chunks land
    there (their final place, e.g. a model tensor's memory) instead of in a buffer
    of the receiver's own; a part that fails its check leaves junk there that a
    retry overwrites. Without it the chunks are kept as they came and joined once
    at the end (a blob that arrives in one read is not copied at all).
    """

    def __init__(self, *, expected_hash: bytes | None, size: int, into: memoryview | bytearray | None = None) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.expected_hash = expected_hash
        self.size = size
        self._into = None if into is None else memoryview(into).cast("B")
        if self._into is not None and (self._into.readonly or self._into.nbytes != size):
            raise ValueError(f"into must be a writable buffer of exactly {size} bytes")
        self._chunks: list[bytes] = []
        self._received = 0

    @property
    def received(self) -> int:
        """Bytes received so far."""
        return self._received

    @property
    def remaining(self) -> int:
        """Bytes still expected."""
        return self.size - self._received

    def check_announced(self, announced: int) -> None:
        """Reject a header announcing a size other than the expected one."""
        if announced > self.size:
            raise BlobCheckError("oversized", f"peer announced {announced} bytes, expected {self.size}")
        if announced < self.size:
            raise BlobCheckError("truncated", f"peer announced {announced} bytes, expected {self.size}")

    def feed(self, chunk: bytes) -> None:
        """Take a chunk; raises ``oversized`` if the total would exceed ``size``."""
        n = len(chunk)
        if self._received + n > self.size:
            raise BlobCheckError("oversized", f"received more than the expected {self.size} bytes")
        if self._into is not None:
            self._into[self._received : self._received + n] = chunk
        elif n:
            self._chunks.append(chunk)
        self._received += n

    def finish(self) -> bytes | memoryview:
        """Check length and hash at end of stream; returns the verified bytes (the ``into``
        buffer when one was given)."""
        if self._received < self.size:
            raise BlobCheckError("truncated", f"stream ended after {self._received} of {self.size} bytes")
        if self._into is not None:
            data: bytes | memoryview = self._into
        else:
            data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            data = bytes(data) if not isinstance(data, bytes) else data
        self._chunks = []
        if self.expected_hash is None:
            return data
        got = content_hash(data)
        if got != self.expected_hash:
            raise BlobCheckError("hash_mismatch", f"content hashes to {got.hex()[:16]}, expected {self.expected_hash.hex()[:16]}")
        return data
