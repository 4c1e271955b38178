"""What our on-chain program reads and writes, mirrored in Python (pure, no I/O).

The program (``psyche/ledger/program/psyche_run.c``) accepts two instructions,
each an *envelope* around opaque bytes::

    "PSY" 0x01 | kind (0 create run, 1 submit) | run address (32) | body
    create run body: len(run_id) (1) | run_id | bump (1) | lamports (u64 LE) | genesis
    submit body:     the coordinator instruction's compact encoding

and keeps, in the run account at the address derived from the run id, an entry
counter and a hash chain over every entry it accepted::

    chain_n = sha256(chain_{n-1} | n (u64 LE) | signer | payload)

returned as ``n | chain_n`` in each transaction's return data. This module builds
those instructions, derives addresses, and recomputes the chain so a replay can
check it saw every entry, in order, unaltered.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import msgspec
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.system_program import ID as SYSTEM_PROGRAM_ID

from psyche.coordinator.settings import CoordinatorSettings

MAGIC = b"PSY\x01"
KIND_CREATE_RUN = 0
KIND_SUBMIT = 1
ENVELOPE = 37
MAX_RUN_ID = 64
RUN_ACCOUNT_SIZE = 112
RUN_MAGIC = b"PYRUNS01"
GENESIS_VERSION = 1

# The localnet's program id: a fixed, well-known address (its key is public; it is
# only ever used as an id). On a real cluster pass the id the program was deployed at.
DEFAULT_PROGRAM_ID: Pubkey = Keypair.from_seed(hashlib.sha256(b"psyche-run-program-v1").digest()).pubkey()

PROGRAM_ERRORS: dict[int, str] = {
    1: "AccountsMissing",
    2: "NotSigned",
    3: "EnvelopeTooShort",
    4: "BadMagic",
    5: "UnknownKind",
    6: "RunMismatch",
    7: "NotARunAccount",
    8: "NotTheRunAddress",
    9: "NotTheSystemProgram",
    10: "CreateFailed",
    11: "BadRunId",
    12: "NestedCall",
}
"""The program's custom error codes (``InstructionError::Custom(code)``) by name."""


class RunGenesis(msgspec.Struct, frozen=True, array_like=True):
    """What a create-run transaction carries besides the run id: what ``Coordinator.new`` needs.

    ``config_digest`` is the run config's digest (hex), so clients can check they
    hold the same run config as its creator.
    """

    version: int
    settings: CoordinatorSettings
    config_digest: str


def encode_genesis(settings: CoordinatorSettings, config_digest: str) -> bytes:
    """The create-run payload for ``settings``."""
    return msgspec.msgpack.encode(RunGenesis(GENESIS_VERSION, settings, config_digest))


def decode_genesis(data: bytes) -> RunGenesis:
    """Parse a create-run payload; ``ValueError`` says what is malformed."""
    try:
        g = msgspec.msgpack.decode(data, type=RunGenesis)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed run genesis: {exc}") from None
    if g.version != GENESIS_VERSION:
        raise ValueError(f"unknown run genesis version {g.version} (this build reads {GENESIS_VERSION})")
    return g


def run_address(run_id: str, program_id: Pubkey = DEFAULT_PROGRAM_ID) -> tuple[Pubkey, int]:
    """The run account's address for ``run_id`` under ``program_id``, and its bump seed."""
    rid = _run_id_bytes(run_id)
    return Pubkey.find_program_address([b"run", hashlib.sha256(rid).digest()], program_id)


def _run_id_bytes(run_id: str) -> bytes:
    rid = run_id.encode()
    if not 1 <= len(rid) <= MAX_RUN_ID:
        raise ValueError(f"run id must be 1..{MAX_RUN_ID} bytes of UTF-8 (got {len(rid)})")
    return rid


def create_run_data(run_id: str, genesis: bytes, *, lamports: int, program_id: Pubkey = DEFAULT_PROGRAM_ID) -> bytes:
    """Instruction data that creates ``run_id``'s account (funded with ``lamports``) and records ``genesis``."""
    address, bump = run_address(run_id, program_id)
    rid = _run_id_bytes(run_id)
    body = bytes([len(rid)]) + rid + bytes([bump]) + struct.pack("<Q", lamports) + genesis
    return MAGIC + bytes([KIND_CREATE_RUN]) + bytes(address) + body


def submit_data(address: Pubkey, payload: bytes) -> bytes:
    """Instruction data that records ``payload`` (an encoded coordinator instruction) in run ``address``."""
    return MAGIC + bytes([KIND_SUBMIT]) + bytes(address) + payload


def create_run_instruction(
    creator: Pubkey, run_id: str, genesis: bytes, *, lamports: int, program_id: Pubkey = DEFAULT_PROGRAM_ID
) -> Instruction:
    """The create-run instruction; ``creator`` signs, pays, and becomes the run authority."""
    address, _ = run_address(run_id, program_id)
    return Instruction(
        program_id,
        create_run_data(run_id, genesis, lamports=lamports, program_id=program_id),
        [AccountMeta(creator, True, True), AccountMeta(address, False, True), AccountMeta(SYSTEM_PROGRAM_ID, False, False)],
    )


def submit_instruction(signer: Pubkey, address: Pubkey, payload: bytes, *, program_id: Pubkey = DEFAULT_PROGRAM_ID) -> Instruction:
    """The instruction that records ``payload`` signed by ``signer`` in run ``address``."""
    return Instruction(program_id, submit_data(address, payload), [AccountMeta(signer, True, False), AccountMeta(address, False, True)])


@dataclass(frozen=True)
class Envelope:
    """A parsed instruction: ``run`` is the run address it names; ``run_id`` only for create-run."""

    kind: int
    run: bytes
    payload: bytes
    run_id: str | None = None


def parse_envelope(data: bytes) -> Envelope:
    """Parse instruction data as the program does; ``ValueError`` names the first problem.

    Data the program accepted always parses; this is for reading transactions back.
    """
    if len(data) < ENVELOPE:
        raise ValueError(f"instruction data is {len(data)} bytes, shorter than the {ENVELOPE}-byte envelope")
    if data[:4] != MAGIC:
        raise ValueError(f"bad magic {data[:4]!r}")
    kind, run = data[4], bytes(data[5:ENVELOPE])
    if kind == KIND_SUBMIT:
        return Envelope(kind, run, bytes(data[ENVELOPE:]))
    if kind != KIND_CREATE_RUN:
        raise ValueError(f"unknown kind {kind}")
    if len(data) == ENVELOPE:
        raise ValueError("create-run instruction data ends before its run id")
    n = data[ENVELOPE]
    if not 1 <= n <= MAX_RUN_ID or len(data) < ENVELOPE + 1 + n + 9:
        raise ValueError("bad run id in create-run")
    rid = bytes(data[ENVELOPE + 1 : ENVELOPE + 1 + n])
    try:
        run_id = rid.decode()
    except UnicodeDecodeError:
        raise ValueError("run id is not UTF-8") from None
    return Envelope(kind, run, bytes(data[ENVELOPE + 1 + n + 9 :]), run_id)


def chain_step(prev: bytes, count: int, signer: bytes, payload: bytes) -> bytes:
    """The run's hash chain after entry number ``count`` (1-based), as the program computes it."""
    return hashlib.sha256(prev + struct.pack("<Q", count) + signer + payload).digest()


def parse_return_data(data: bytes) -> tuple[int, bytes]:
    """``(count, chain)`` from a transaction's return data; ``ValueError`` if it is not ours."""
    if len(data) != 40:
        raise ValueError(f"return data is {len(data)} bytes, expected 40")
    return struct.unpack_from("<Q", data)[0], bytes(data[8:])


@dataclass(frozen=True)
class RunAccount:
    """The run account's contents: who created it, and how many entries it recorded."""

    run_hash: bytes
    authority: bytes
    count: int
    chain: bytes

    @classmethod
    def parse(cls, data: bytes) -> RunAccount:
        """Parse the account data; ``ValueError`` if it is not an initialised run account."""
        if len(data) < RUN_ACCOUNT_SIZE or data[:8] != RUN_MAGIC:
            raise ValueError("not a psyche run account")
        return cls(bytes(data[8:40]), bytes(data[40:72]), struct.unpack_from("<Q", data, 72)[0], bytes(data[80:112]))
