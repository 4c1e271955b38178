"""Wire formats: signed broadcast messages and the request/response frames of our streams.

Everything here is pure (no I/O). Two layers:

* **Messages** (what the caller broadcasts): :class:`ResultCommitment`,
  :class:`Finished`, :class:`Heartbeat`. Each carries ``run_id`` and ``step``
  and travels inside a :class:`SignedMessage` whose ed25519 signature covers a
  domain tag, the wire version and the encoded body, so it cannot be replayed
  into another run (``run_id`` differs) or another step (outside the receiver's
  step window), and cannot be altered by a forwarding peer.
* **Frames** (what one stream carries): a 4-byte big-endian length, then a
  msgpack-encoded tagged struct. A request frame opens every stream; blob and
  model-part replies are a header frame followed by raw bytes.

Version: :data:`WIRE_VERSION` is in every envelope and in the ALPN; a receiver
counts an unknown version as ``unsupported_version`` and drops it.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal, Union

import blake3
import msgspec

from psyche.identity import Identity

WIRE_VERSION = 1
ALPN = b"psyche/p2p/1"
# Signatures cover this tag so a signature made for another purpose (e.g. a
# coordinator instruction signed with the same key) never verifies as a message.
SIGN_DOMAIN = b"psyche/p2p/message/v1\x00"
MAX_FRAME = 16 << 20  # a frame header/request/manifest; raw blob bytes are not frames
MAX_PUSH_BATCH = 256  # envelopes per Push frame

Buffer = bytes | bytearray | memoryview
"""Bytes to send or serve: ``bytes``, or a view of memory someone else owns (a tensor's, a sink's)."""

Phase = Literal["warmup", "round", "witness"]


class ResultCommitment(msgspec.Struct, tag="commit", frozen=True, kw_only=True):
    """"I trained ``[batch_start, batch_end)`` at ``step``; my result is blob ``blob_hash`` of ``size`` bytes."""

    run_id: str
    step: int
    batch_start: int
    batch_end: int
    blob_hash: bytes
    size: int


class Finished(msgspec.Struct, tag="finished", frozen=True, kw_only=True):
    """"I finished ``phase`` of ``step``" (warmup: model loaded; round: results in; witness: witnessed)."""

    run_id: str
    step: int
    phase: Phase


class Heartbeat(msgspec.Struct, tag="heartbeat", frozen=True, kw_only=True):
    """Liveness notice at ``step``."""

    run_id: str
    step: int


Message = Union[ResultCommitment, Finished, Heartbeat]
_message_encoder = msgspec.msgpack.Encoder()
_message_decoder = msgspec.msgpack.Decoder(Message)


def encode_message(msg: Message) -> bytes:
    """Canonical bytes of a message (deterministic for equal messages)."""
    return _message_encoder.encode(msg)


def decode_message(body: bytes) -> Message:
    """Decode a message body; raises ``msgspec.DecodeError``/``ValidationError`` on bad input."""
    return _message_decoder.decode(body)


class SignedMessage(msgspec.Struct, array_like=True, frozen=True):
    """Envelope: the origin's public key, the encoded message and its signature.

    The origin, not the forwarding peer, signs; forwarders pass the envelope on
    byte for byte.
    """

    v: Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
    """Wire version (two bytes in what is signed); a decoded envelope outside that range is refused."""
    sender: bytes
    body: bytes
    sig: bytes

    @classmethod
    def create(cls, identity: Identity, msg: Message) -> SignedMessage:
        """Sign ``msg`` as ``identity``."""
        body = encode_message(msg)
        return cls(WIRE_VERSION, identity.public_key, body, identity.sign(signing_bytes(WIRE_VERSION, body)))

    def encode(self) -> bytes:
        """Envelope bytes as they travel."""
        return _envelope_encoder.encode(self)

    @property
    def message_id(self) -> bytes:
        """16-byte id used for de-duplication: a hash of origin and body (not of the signature)."""
        return message_id(self.sender, self.body)

    def verify(self) -> bool:
        """True iff the signature is the sender's over this version and body."""
        return Identity.verify(self.sender, signing_bytes(self.v, self.body), self.sig)

    def message(self) -> Message:
        """The decoded message (raises on a malformed body; call :meth:`verify` first)."""
        return decode_message(self.body)


_envelope_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(SignedMessage)


def decode_envelope(data: bytes) -> SignedMessage:
    """Decode envelope bytes; raises ``msgspec`` errors on bad input."""
    env = _envelope_decoder.decode(data)
    if len(env.sender) != 32 or len(env.sig) != 64:
        raise msgspec.ValidationError("sender must be 32 bytes and sig 64 bytes")
    return env


def signing_bytes(version: int, body: bytes) -> bytes:
    """The exact bytes an origin signs for a message body."""
    return SIGN_DOMAIN + version.to_bytes(2, "big") + body


def message_id(sender: bytes, body: bytes) -> bytes:
    """De-duplication id of a message: blake3(sender || body), 16 bytes."""
    return blake3.blake3(sender + body).digest(16)


def content_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte content hash used for blobs and model parts (blake3)."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO if len(data) >= (4 << 20) else 1).digest()


def manifest_digest(manifest_bytes: bytes) -> bytes:
    """sha256 of a manifest's canonical bytes: what a coordinator checkpoint record can carry."""
    return hashlib.sha256(manifest_bytes).digest()


# --- stream frames --------------------------------------------------------


class Push(msgspec.Struct, tag="push", frozen=True):
    """Request: here are envelopes (each one :class:`SignedMessage` bytes) for you."""

    envelopes: list[bytes]


class PushAck(msgspec.Struct, tag="push_ack", frozen=True):
    """Reply: I processed ``count`` envelopes (accepted, duplicate or rejected alike)."""

    count: int


class GetBlob(msgspec.Struct, tag="get_blob", frozen=True):
    """Request: send me blob ``hash``; I will not accept more than ``max_size`` bytes."""

    hash: bytes
    max_size: int


class GetManifest(msgspec.Struct, tag="get_manifest", frozen=True):
    """Request: send me the manifest of the model you serve."""


class GetPart(msgspec.Struct, tag="get_part", frozen=True):
    """Request: send part ``index`` of entry ``name`` (``kind`` tensor/file) of manifest ``digest``."""

    digest: bytes
    kind: Literal["tensor", "file"]
    name: str
    index: int


class DataHeader(msgspec.Struct, tag="data", frozen=True):
    """Reply to a blob/part/manifest request: ``status`` then, if ok, exactly ``size`` raw bytes follow."""

    status: Literal["ok", "missing", "refused"]
    size: int = 0


Frame = Union[Push, PushAck, GetBlob, GetManifest, GetPart, DataHeader]
_frame_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(Frame)


def encode_frame(frame: Frame) -> bytes:
    """Length-prefixed frame bytes."""
    payload = _frame_encoder.encode(frame)
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes exceeds MAX_FRAME={MAX_FRAME}")
    return len(payload).to_bytes(4, "big") + payload


def frame_length(prefix: bytes, *, max_frame: int = MAX_FRAME) -> int:
    """Length announced by a 4-byte prefix; raises ``ValueError`` if it exceeds ``max_frame``."""
    if len(prefix) != 4:
        raise ValueError(f"frame prefix must be 4 bytes, got {len(prefix)}")
    n = int.from_bytes(prefix, "big")
    if n > max_frame:
        raise ValueError(f"frame of {n} bytes exceeds the limit of {max_frame}")
    return n


def decode_frame(payload: bytes) -> Frame:
    """Decode a frame payload (without its prefix); raises ``msgspec`` errors on bad input."""
    return _frame_decoder.decode(payload)
