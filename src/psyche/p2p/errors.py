"""Errors raised by :mod:`psyche.p2p` to its caller.

Bad input from a peer is never raised: it is dropped and counted in
``P2PNode.counters``. What reaches the caller is grouped by what the caller can
do about it (a key file that cannot be used raises :class:`psyche.identity.IdentityError`,
before any of this package is involved)::

    P2PError
    ├── TransportError       the transport failed to bind/connect/stream (wraps iroh's error): retry later
    ├── NotAMember           the caller asked to reach a peer that is not in the member set: update members
    ├── BlobUnavailable      every provider failed to deliver a verified blob before the timeout
    ├── ModelUnavailable     no trusted manifest, or some parts could not be fetched from any provider
    └── ModelMismatch        the model peers serve does not fit the destination (also a ValueError)
"""

from __future__ import annotations


class P2PError(Exception):
    """Base class of every error this package raises to its caller."""


class TransportError(P2PError):
    """The transport could not bind, connect or move bytes."""


class NotAMember(P2PError):
    """A peer id the caller named is not in the current member set."""

    def __init__(self, peer: bytes) -> None:
        super().__init__(f"peer {peer.hex()[:16]} is not a member of the run")
        self.peer = peer


class BlobUnavailable(P2PError):
    """No provider delivered the blob ``blob_hash`` with the right size and hash in time.

    ``attempts`` lists ``(provider_id, reason)`` for every try, in order, so the
    caller can tell "nobody has it" (``missing``) from "peers lied"
    (``bad_blob:...``) from "peers unreachable" (``connect:...``, ``stalled``).
    """

    def __init__(self, blob_hash: bytes, size: int, attempts: list[tuple[bytes, str]]) -> None:
        tried = ", ".join(f"{p.hex()[:8]}={r}" for p, r in attempts[-8:]) or "no providers"
        super().__init__(f"blob {blob_hash.hex()[:16]} ({size} bytes) unavailable after {len(attempts)} attempt(s): {tried}")
        self.blob_hash = blob_hash
        self.size = size
        self.attempts = attempts


class ModelUnavailable(P2PError):
    """The model could not be fetched: no trusted manifest, or parts missing from every provider."""


class ModelMismatch(P2PError, ValueError):
    """The model peers serve does not fit the destination (names, dtypes, shapes or sizes).

    Also a ``ValueError``: it says the data, not the network, is wrong.
    """
