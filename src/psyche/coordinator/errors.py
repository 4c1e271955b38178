"""The coordinator's refusals: one named error per reason, returned (never raised) by ``apply``.

Grouped by what the caller can do about it::

    CoordinatorError                 base class; ``code`` is stable for hosts (HTTP, Solana)
    ├── the run is not taking this now (retry later, or never)
    │   ├── Halted                   run is Uninitialized, Paused or Finished
    │   ├── InvalidRunState          instruction not allowed in the current phase
    │   └── StaleStep                names a round that is over (an expected late message)
    ├── the signer may not do this (do not retry)
    │   ├── Unauthorized             only the run authority may pause/resume
    │   ├── NotAMember               signer is not a member (of the epoch / pending list)
    │   ├── NotAWitness              signer was not selected as witness for this round
    │   ├── NotACheckpointer         signer was not selected to checkpoint this cooldown
    │   ├── DuplicateWitness         signer already reported for this round
    │   ├── DuplicateCheckpoint      signer already reported its checkpoint
    │   ├── FalseAccusation          a quorum of witnesses saw the accused (or it had no batch)
    │   └── RunFull                  no room for another client account
    └── InvalidInstruction           malformed field (size, range, encoding) — a bug in the sender

A refused instruction leaves the state exactly as it was.
"""

from __future__ import annotations

from typing import ClassVar


class CoordinatorError(Exception):
    """Base of every coordinator refusal; ``str(err)`` says what was wrong."""

    code: ClassVar[int] = 0

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def name(self) -> str:
        """The error's stable name, e.g. ``"NotAMember"`` (hosts map it one for one)."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.name}({self.message!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.message == self.message

    def __hash__(self) -> int:
        return hash((self.name, self.message))


class Halted(CoordinatorError):
    """The run is Uninitialized, Paused or Finished: nothing but Join/Resume applies."""

    code = 1


class InvalidRunState(CoordinatorError):
    """The instruction is not allowed in the current run state."""

    code = 2


class StaleStep(CoordinatorError):
    """The instruction names a round that is already over (or no longer stored)."""

    code = 3


class Unauthorized(CoordinatorError):
    """Only the run's authority key may do this."""

    code = 4


class NotAMember(CoordinatorError):
    """The signer is not a member of the run in the required way."""

    code = 5


class NotAWitness(CoordinatorError):
    """The signer was not selected as a witness."""

    code = 6


class NotACheckpointer(CoordinatorError):
    """The signer was not selected to write this cooldown's checkpoint."""

    code = 7


class DuplicateWitness(CoordinatorError):
    """The signer already sent its witness report for this round (or warmup)."""

    code = 8


class DuplicateCheckpoint(CoordinatorError):
    """The signer already reported its checkpoint for this cooldown."""

    code = 9


class FalseAccusation(CoordinatorError):
    """A health check accused a client that a witness quorum saw, or that had no batch."""

    code = 10


class RunFull(CoordinatorError):
    """The run holds the maximum number of client accounts."""

    code = 11


class InvalidInstruction(CoordinatorError):
    """A field of the instruction (or the host's arguments) is malformed."""

    code = 12


ERRORS: dict[str, type[CoordinatorError]] = {
    cls.__name__: cls
    for cls in (Halted, InvalidRunState, StaleStep, Unauthorized, NotAMember, NotAWitness, NotACheckpointer,
                DuplicateWitness, DuplicateCheckpoint, FalseAccusation, RunFull, InvalidInstruction)
}
"""Every named error by name, so hosts can rebuild one from a wire name."""
