"""The instructions a coordinator accepts, and their versioned wire form.

Each instruction is a frozen msgspec Struct; the signer, the time and the seed
are not part of it (the host supplies them to ``Coordinator.apply``). On the
wire an instruction is one version byte followed by a msgpack array
``[tag, field, ...]`` (compact enough for a Solana transaction)::

    >>> decode_instruction(encode_instruction(Join(p2p_address="ticket")))
    Join(p2p_address='ticket')

The field limits below are enforced when decoding; ``apply`` checks them again
because hosts may build instructions directly.
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec

WIRE_VERSION = 1
MAX_ADDRESS_LEN = 1024
MAX_LOCATION_LEN = 1024
MAX_ACCUSED = 256
MAX_BLOOM_WIRE = 4096 + 5
MAX_ARRIVAL_MS = 2**32 - 1
MAX_TRAINERS = 256
MIN_SCORE, MAX_SCORE = -(2**15), 2**15 - 1

Address = Annotated[str, msgspec.Meta(max_length=MAX_ADDRESS_LEN)]
Hash32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
BloomBytes = Annotated[bytes, msgspec.Meta(max_length=MAX_BLOOM_WIRE)]
Step = Annotated[int, msgspec.Meta(ge=0, le=2**32)]


class _Instr(msgspec.Struct, frozen=True, array_like=True, tag_field="op"):
    """The wire form every instruction shares: a tagged msgpack array.

    Each subclass repeats ``frozen=True``: msgspec inherits it anyway, but type
    checkers read each class's own keywords.
    """


class Join(_Instr, frozen=True, tag="join"):
    """The signer joins the run (for the next epoch), or updates its P2P address if already in.

    ``p2p_address``: the P2P ticket other clients use to reach the signer.
    """

    p2p_address: Address


class Tick(_Instr, frozen=True, tag="tick"):
    """Time passes: timeouts fire (anyone may send it; ``now``/``seed`` come from the host)."""


class WarmupWitness(_Instr, frozen=True, tag="warmup_witness"):
    """A selected warmup witness has the model and is ready to train."""


class Witness(_Instr, frozen=True, tag="witness"):
    """A selected witness's report on the round of ``step``.

    ``participant_bloom``: a :class:`BloomFilter` of the 32-byte ids of trainers
    whose results the witness downloaded and verified. ``broadcast_bloom``: a
    filter of the 32-byte result commitment hashes it received.
    ``broadcast_merkle``: a 32-byte Merkle root over those commitments (kept for
    audit). ``loss``, ``tokens_per_sec``, ``bandwidth_bytes``: the witness's own
    view of the step, shown on the dashboard. ``arrivals_ms``: per trainer of the
    round in shuffle order, milliseconds from when the witness saw the round start
    until it held that trainer's verified result (0: never); the run learns each
    trainer's speed from these (empty: the witness measured nothing).
    ``scores``: the witness's verification score of each result it was assigned to check
    (:func:`~psyche.coordinator.verification.assignments`, in that order; see
    :mod:`psyche.coordinator.verification`), empty when it checked none.
    """

    step: Step
    participant_bloom: BloomBytes
    broadcast_bloom: BloomBytes
    broadcast_merkle: Hash32
    loss: float
    tokens_per_sec: float
    bandwidth_bytes: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    arrivals_ms: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=MAX_ARRIVAL_MS)]],
                           msgspec.Meta(max_length=MAX_TRAINERS)] = []
    scores: Annotated[list[Annotated[int, msgspec.Meta(ge=MIN_SCORE, le=MAX_SCORE)]],
                      msgspec.Meta(max_length=MAX_TRAINERS)] = []


class HealthCheck(_Instr, frozen=True, tag="health_check"):
    """Accuse trainers of the (finished, stored) round of ``step`` of not delivering results."""

    step: Step
    accused: Annotated[list[Hash32], msgspec.Meta(min_length=1, max_length=MAX_ACCUSED)]


class Checkpoint(_Instr, frozen=True, tag="checkpoint"):
    """A selected checkpointer wrote the model after ``step`` to ``location`` (sha256 of its manifest)."""

    step: Step
    location: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_LOCATION_LEN)]
    sha256: Hash32


class Pause(_Instr, frozen=True, tag="pause"):
    """Authority only: stop the run at the end of the current round (via Cooldown)."""


class Resume(_Instr, frozen=True, tag="resume"):
    """Authority only: restart a paused run; members join again, the LR warms up again."""


class Withdraw(_Instr, frozen=True, tag="withdraw"):
    """The signer leaves the run cleanly (at the end of the round, without points this epoch)."""


class Authorize(_Instr, frozen=True, tag="authorize"):
    """Gated runs: grant ``key`` the right to join, until unix second ``expires_at`` (0: no end).

    The run authority may grant any term; a delegated authorizer (:class:`Delegate`) only
    expiring grants that end no later than its own delegation. Granting a key again sets
    its new term.
    """

    key: Hash32
    expires_at: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0


class Delegate(_Instr, frozen=True, tag="delegate"):
    """Gated runs, authority only: let ``key`` sign :class:`Authorize` (and :class:`Revoke` of
    grants) until ``expires_at`` (0: until revoked)."""

    key: Hash32
    expires_at: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0


class Revoke(_Instr, frozen=True, tag="revoke"):
    """Gated runs: take back ``key``'s join right (authority or authorizer) and, authority only,
    its delegation. A revoked key leaves the waiting list, and a member leaves at the end of
    the round (Ejected, without points this epoch)."""

    key: Hash32


Instruction = Union[Join, Tick, WarmupWitness, Witness, HealthCheck, Checkpoint, Pause, Resume, Withdraw,
                    Authorize, Delegate, Revoke]
INSTRUCTION_TYPES: tuple[type, ...] = (Join, Tick, WarmupWitness, Witness, HealthCheck, Checkpoint, Pause, Resume,
                                       Withdraw, Authorize, Delegate, Revoke)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Instruction)


def encode_instruction(instr: Instruction) -> bytes:
    """The canonical wire bytes of ``instr`` (version byte + msgpack array)."""
    if not isinstance(instr, INSTRUCTION_TYPES):
        raise TypeError(f"not a coordinator instruction: {type(instr).__name__}")
    return bytes([WIRE_VERSION]) + _encoder.encode(instr)


def decode_instruction(data: bytes) -> Instruction:
    """Parse wire bytes; raises ``ValueError`` saying what is malformed (never anything else)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"instruction must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ValueError("empty instruction")
    if data[0] != WIRE_VERSION:
        raise ValueError(f"unknown instruction wire version {data[0]} (this build reads {WIRE_VERSION})")
    try:
        return _decoder.decode(data[1:])
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise ValueError(f"malformed instruction: {exc}") from None
