"""A run's instruction log and its replay: the one way every host rebuilds a state (no I/O).

A host applies each instruction with its own clock and seed and records what it
applied as a :class:`LogEntry`. Anyone holding the run's initial state and the
entries, in order, rebuilds the host's state byte for byte with :func:`replay`:
the embedded ledger and the server read their log from SQLite, the Solana host
from the run's confirmed transactions (block time as ``now``, a seed from the
block hash). What a host does around a replay (numbering, refusing a log that
does not replay, per-transaction outcomes) stays in the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from psyche.coordinator.errors import CoordinatorError
from psyche.coordinator.instructions import Instruction, decode_instruction
from psyche.coordinator.machine import Coordinator


class LogEntry(NamedTuple):
    """One instruction as its host applied it."""

    body: bytes
    """The instruction's wire form (:func:`~psyche.coordinator.instructions.encode_instruction`)."""
    signer: bytes
    """The 32-byte public key that signed it."""
    now: int
    """The host's clock when it was applied (unix seconds)."""
    seed: bytes
    """The 32-byte seed the host handed the coordinator with it."""


class Replayed(NamedTuple):
    """What one entry did: the instruction decoded from it and the coordinator's refusal (None: applied)."""

    instruction: Instruction
    error: CoordinatorError | None


def apply_entry(coord: Coordinator, entry: LogEntry) -> Replayed:
    """Decode ``entry`` and apply it to ``coord`` with its recorded signer, time and seed.

    Raises ``ValueError``, with ``coord`` untouched, when the body is not an
    instruction. A refusal leaves ``coord`` as it was too, and is returned.
    """
    instruction = decode_instruction(entry.body)
    return Replayed(instruction, coord.apply(instruction, entry.signer, entry.now, entry.seed))


def replay(coord: Coordinator, log: Iterable[LogEntry]) -> list[CoordinatorError | None]:
    """Apply ``log`` to ``coord`` in order (see :func:`apply_entry`); each entry's refusal or None.

    A log its host recorded replays to the host's state with every result None.
    """
    return [apply_entry(coord, entry).error for entry in log]
