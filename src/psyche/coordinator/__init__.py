"""The coordinator: a pure, deterministic state machine every participant can replay.

No I/O, no clock, no randomness of its own, no torch: hosts pass ``now`` (unix
seconds) and a 32-byte ``seed`` to :meth:`Coordinator.apply`, the single entry
point. Modules, one idea each:

- :mod:`~psyche.coordinator.machine` — :class:`Coordinator`: guard clauses, transitions, ticks.
- :mod:`~psyche.coordinator.state` — :class:`CoordinatorState`, the whole state (msgspec).
- :mod:`~psyche.coordinator.instructions` — instruction structs and their wire form.
- :mod:`~psyche.coordinator.queries` — pure questions: roles, batches, consensus, deadlines.
- :mod:`~psyche.coordinator.shares` — speed-aware shares: the cut of each batch, learning speeds, re-queues.
- :mod:`~psyche.coordinator.access` — who may join (open or gated runs), and who gets in under a flood of keys.
- :mod:`~psyche.coordinator.verification` — verified results: who checks whom, verdicts by majority, condemning.
- :mod:`~psyche.coordinator.log` — :class:`LogEntry` and :func:`replay`, how every host rebuilds a state.
- :mod:`~psyche.coordinator.settings` — :class:`CoordinatorSettings` and their rules.
- :mod:`~psyche.coordinator.shuffle` — the swap-or-not shuffle behind committees.
- :mod:`~psyche.coordinator.bloom` — deterministic Bloom filters witnesses send.
- :mod:`~psyche.coordinator.errors` — the named refusals.
"""

from psyche.coordinator.bloom import BloomFilter
from psyche.coordinator.errors import (
    ERRORS,
    CoordinatorError,
    DuplicateCheckpoint,
    DuplicateWitness,
    FalseAccusation,
    Halted,
    InvalidInstruction,
    InvalidRunState,
    NotACheckpointer,
    NotAMember,
    NotAWitness,
    RunFull,
    StaleStep,
    Unauthorized,
)
from psyche.coordinator.instructions import (
    Authorize,
    Checkpoint,
    Delegate,
    HealthCheck,
    Instruction,
    Join,
    Pause,
    Resume,
    Revoke,
    Tick,
    WarmupWitness,
    Withdraw,
    Witness,
    decode_instruction,
    encode_instruction,
)
from psyche.coordinator.log import LogEntry, Replayed, apply_entry, replay
from psyche.coordinator.machine import Coordinator
from psyche.coordinator.queries import (
    Batch,
    RoleProof,
    Share,
    accusable_trainers,
    address_of,
    assignment_for,
    batch_split,
    consensus,
    current_round,
    epoch_deadline,
    healthy_clients,
    is_checkpointer,
    is_warmup_witness,
    is_witness,
    latest_checkpoint,
    lr_warmup_window,
    member,
    model_source,
    phase_deadline,
    points,
    quorum,
    role_proof,
    round_batches,
    round_closed,
    round_for_step,
    round_shares,
    round_stats,
    round_trainers,
    round_witnesses,
    time_left,
    verify_role_proof,
    witnessed_trainers,
)
from psyche.coordinator.settings import MAX_ACCOUNTS, MAX_CLIENTS, MAX_WITNESSES, CoordinatorSettings, settings_problems
from psyche.coordinator.state import (
    Account,
    CheckpointRecord,
    Client,
    ClientState,
    CoordinatorState,
    Grant,
    Round,
    RoundStats,
    RunState,
    WitnessReport,
)

__all__ = [
    "ERRORS", "MAX_ACCOUNTS", "MAX_CLIENTS", "MAX_WITNESSES",
    "Account", "Authorize", "Batch", "BloomFilter", "Checkpoint", "CheckpointRecord", "Client", "ClientState", "Coordinator",
    "CoordinatorError", "CoordinatorSettings", "CoordinatorState", "Delegate", "DuplicateCheckpoint", "DuplicateWitness",
    "FalseAccusation", "Grant", "Halted", "HealthCheck", "Instruction", "InvalidInstruction", "InvalidRunState", "Join",
    "LogEntry", "NotACheckpointer", "NotAMember", "NotAWitness", "Pause", "Replayed", "Resume", "Revoke", "RoleProof",
    "Round", "RoundStats", "RunFull", "RunState", "Share", "StaleStep", "Tick", "Unauthorized", "WarmupWitness", "Withdraw",
    "Witness", "WitnessReport",
    "accusable_trainers", "address_of", "apply_entry", "assignment_for", "batch_split", "consensus",
    "current_round", "decode_instruction", "encode_instruction", "epoch_deadline", "healthy_clients",
    "is_checkpointer", "is_warmup_witness", "is_witness", "latest_checkpoint", "lr_warmup_window", "member",
    "model_source", "phase_deadline", "points", "quorum", "replay", "role_proof", "round_batches", "round_closed",
    "round_for_step", "round_shares", "round_stats", "round_trainers", "round_witnesses", "settings_problems", "time_left",
    "verify_role_proof", "witnessed_trainers",
]
