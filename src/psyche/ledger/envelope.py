"""Signed requests from participants to a coordinator host (sans-io).

A client proves who sends an instruction by signing it with its ed25519 key
(the same key that is its client id and its P2P endpoint id). The signature
covers a domain tag, the run id, the request kind, a nonce and the body, so a
request cannot be replayed into another run, re-used as another kind, or
replayed at all (the host accepts only nonces above the signer's last one).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal, Protocol

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

DOMAIN = b"psyche-request-v1"
RequestKind = Literal["instruction", "report"]


class Signer(Protocol):
    """Anything holding an ed25519 key: ``public_key`` (32 bytes) and ``sign``."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


MAX_NONCE = 2**63 - 1
"""The largest nonce a host takes: hosts store the last one per signer as a signed 64-bit integer
(SQLite), and a request whose nonce they could not store must be refused before it is applied."""


class SignedRequest(msgspec.Struct, frozen=True):
    """What travels to the host: ``body`` is an encoded instruction or report."""

    run_id: str
    kind: str
    signer: bytes
    nonce: Annotated[int, msgspec.Meta(ge=0, le=MAX_NONCE)]
    body: bytes
    signature: bytes


def _signed_bytes(run_id: str, kind: str, nonce: int, body: bytes) -> bytes:
    return msgspec.msgpack.encode([DOMAIN, run_id, kind, nonce, body])


def new_nonce() -> int:
    """A nonce that grows over time (microseconds), so restarts of a client stay above old ones."""
    return time.time_ns() // 1000


def sign_request(signer: Signer, run_id: str, kind: RequestKind, body: bytes, nonce: int | None = None) -> bytes:
    """Encode and sign one request; the result is what the client sends."""
    nonce = new_nonce() if nonce is None else nonce
    sig = signer.sign(_signed_bytes(run_id, kind, nonce, body))
    return msgspec.msgpack.encode(SignedRequest(run_id, kind, signer.public_key, nonce, body, sig))


def open_request(data: bytes, *, run_id: str, kind: RequestKind) -> SignedRequest:
    """Decode and verify a request for ``run_id`` of ``kind``.

    Raises ``ValueError`` naming the problem: malformed bytes (a nonce outside
    ``0..MAX_NONCE`` among them), wrong run, wrong kind, bad key, or bad signature.
    Nonce freshness is the host's check (it needs the stored last nonce).
    """
    try:
        req = msgspec.msgpack.decode(data, type=SignedRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"malformed request: {exc}") from None
    if req.run_id != run_id:
        raise ValueError(f"request is for run {req.run_id!r}, not {run_id!r}")
    if req.kind != kind:
        raise ValueError(f"request kind is {req.kind!r}, expected {kind!r}")
    if len(req.signer) != 32 or len(req.signature) != 64:
        raise ValueError("signer must be 32 bytes and signature 64 bytes")
    try:
        Ed25519PublicKey.from_public_bytes(req.signer).verify(
            req.signature, _signed_bytes(req.run_id, req.kind, req.nonce, req.body)
        )
    except InvalidSignature:
        raise ValueError("bad signature") from None
    return req
