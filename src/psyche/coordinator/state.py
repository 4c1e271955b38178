"""The whole coordinator state: one msgspec Struct, bounded, with a canonical encoding.

Everything a client, host or dashboard needs to agree on lives here; nothing
else is kept between instructions. Lists (never dicts) keep the msgpack bytes
canonical, and every list is capped (rings of rounds, stats and checkpoints;
at most ``MAX_CLIENTS`` clients per epoch and ``MAX_ACCOUNTS`` accounts), because
the server and Solana hosts store it.

Structs repeated per client, round and report leave out fields at their defaults, so the
state the server pushes on every change stays small (a node on a slow link gets every
push). Client indices (``Round.trainers``, ``WitnessReport.client``, ...) index
``CoordinatorState.clients``, which is fixed for the whole epoch: a client that
leaves stays listed with a non-Healthy state until the next epoch starts.
"""

from __future__ import annotations

import enum

import msgspec

from psyche.coordinator.settings import CoordinatorSettings
from psyche.coordinator.shares import Piece, Taken

STATE_VERSION = 1
NUM_STORED_ROUNDS = 4
"""Rounds kept in the ring (consensus and health checks look this far back)."""
NUM_STORED_STATS = 64
"""Rounds of witness metadata kept for the dashboard."""
NUM_STORED_CHECKPOINTS = 16


class RunState(str, enum.Enum):
    """Phase of the run (see :mod:`psyche.coordinator.machine` for the transitions)."""

    Uninitialized = "Uninitialized"
    WaitingForMembers = "WaitingForMembers"
    Warmup = "Warmup"
    RoundTrain = "RoundTrain"
    RoundWitness = "RoundWitness"
    Cooldown = "Cooldown"
    Finished = "Finished"
    Paused = "Paused"


class ClientState(str, enum.Enum):
    """Health of a client within the current epoch."""

    Healthy = "Healthy"
    Dropped = "Dropped"
    """Accused successfully or an idle witness: leaves at the end of the round, no points."""
    Withdrawn = "Withdrawn"
    """Left on its own (or everyone, at a pause): leaves at the end of the round, no points."""
    Ejected = "Ejected"
    """Its join right was revoked (gated runs): leaves at the end of the round, no points."""


class Client(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A member of the current epoch."""

    id: bytes
    """32-byte ed25519 public key."""
    p2p_address: str
    """P2P ticket peers dial to reach this client."""
    state: ClientState = ClientState.Healthy
    until_height: int | None = None
    """None while Healthy; else it takes part only in rounds with height < until_height."""
    throughput: int = 0
    """Estimated tokens per second of round time, from witnessed deliveries (0 = never measured);
    its share of each round's batch follows it (see :mod:`psyche.coordinator.shares`)."""
    tokens: int = 0
    """Tokens it trained this epoch whose results a witness quorum accepted (its points follow)."""
    suspicion: int = 0
    """Accumulated shortfall of its verification scores (<= 0; see :mod:`psyche.coordinator.verification`)."""
    condemned_step: int = 0
    """The step whose result verification condemned (its state is then Dropped); 0: none."""


class Account(msgspec.Struct, kw_only=True):
    """Anyone who joined the run: its address and reward points.

    An account that never earned points and is neither a member nor waiting may be recycled
    for a newcomer when the run holds ``MAX_ACCOUNTS`` (see :mod:`psyche.coordinator.access`).
    """

    id: bytes
    p2p_address: str
    points: int = 0
    joined_at: int = 0
    """Unix second of its latest Join (the oldest idle account is recycled first)."""


class Grant(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Gated runs: a key's right to join (or, among ``authorizers``, to grant it), for a term."""

    key: bytes
    expires_at: int = 0
    """Unix second from which it no longer holds (0: until revoked)."""


class WitnessReport(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One selected witness's report on a round."""

    client: int
    participant_bloom: bytes
    broadcast_bloom: bytes
    broadcast_merkle: bytes
    loss: float
    tokens_per_sec: float
    bandwidth_bytes: int
    arrivals_ms: list[int] = msgspec.field(default_factory=list)
    """Per trainer in the round's shuffle order: ms from the witness seeing the round start to it
    holding that trainer's verified result (0: not received)."""
    scores: list[int] = msgspec.field(default_factory=list)
    """Verification scores of the results this witness was assigned to check (empty: none)."""


class Round(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One training step of the current epoch."""

    height: int
    """0 for the first round of each epoch."""
    step: int
    """The optimizer step this round trains (global, from 1)."""
    data_index: int
    """First sample index of the round's fresh samples."""
    batch_size: int
    """Samples in the round's global batch: the re-queued pieces in ``taken``, then fresh samples
    from ``data_index`` on for the rest (all of it fresh when nothing was re-queued)."""
    random_seed: bytes
    """32-byte seed from the host; the shuffle that orders trainers and picks witnesses uses it."""
    started_at: int
    trainers: list[int]
    """Client indices in shuffle order: trainers[p] holds shuffle position p (and batch interval p)."""
    witnesses: int
    """Number of witnesses: the trainers at shuffle positions < witnesses."""
    reports: list[WitnessReport] = msgspec.field(default_factory=list)
    sizes: list[int] = msgspec.field(default_factory=list)
    """Samples per shuffle position (empty: an equal split, as rounds were cut before shares)."""
    taken: list[Taken] = msgspec.field(default_factory=list)
    """Re-queued pieces trained whole in this round, and by which position; the other positions
    share the fresh samples from ``data_index`` on."""
    verifiers: int = 0
    """Verifiers per result this round (the setting when the round began; 0: no verification)."""
    condemned: list[int] = msgspec.field(default_factory=list)
    """Shuffle positions whose results verification condemned when the round closed: nobody applies them."""


class RoundStats(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Witness metadata of one finished round, for the dashboard."""

    epoch: int
    step: int
    ended_at: int
    trainers: int
    witnesses: int
    reports: int
    loss: float | None
    """Mean over the reports (None when no witness reported)."""
    tokens_per_sec: float | None
    bandwidth_bytes: int | None
    condemned: int = 0
    """Results verification condemned in this round."""


class CheckpointRecord(msgspec.Struct, kw_only=True):
    """A checkpoint a selected checkpointer reported at a cooldown."""

    epoch: int
    step: int
    """The last step the checkpoint includes."""
    location: str
    sha256: bytes
    client: bytes


class CoordinatorState(msgspec.Struct, kw_only=True):
    """The whole state of one run."""

    version: int = STATE_VERSION
    run_id: str
    authority: bytes
    """32-byte key allowed to Pause/Resume."""
    settings: CoordinatorSettings
    run_state: RunState = RunState.Uninitialized
    state_started_at: int = 0
    """``now`` of the last run-state change (phase timeouts count from here)."""
    pause_pending: bool = False

    epoch: int = 0
    step: int = 1
    """The step of the current round, or of the next round to start. Finished once > total_steps."""
    next_data_index: int = 0
    """First sample index no round has been given yet (indices are never reused)."""
    requeued: list[Piece] = msgspec.field(default_factory=list)
    """Batches whose trainer missed its round, oldest first, waiting to be trained whole by a later one."""
    cold_start_step: int = 0
    """Step from which the LR warms up again after a resume (0 = never resumed)."""

    clients: list[Client] = msgspec.field(default_factory=list)
    """This epoch's members (fixed for the epoch). While WaitingForMembers: those carried over."""
    pending: list[bytes] = msgspec.field(default_factory=list)
    """Ids that joined for the next epoch, in join order (at most ``MAX_PENDING``). A join is good
    for the next epoch only: who is not admitted then joins again (see :mod:`psyche.coordinator.access`)."""
    accounts: list[Account] = msgspec.field(default_factory=list)
    grants: list[Grant] = msgspec.field(default_factory=list)
    """Gated runs: the keys that may join, with their terms (at most ``MAX_GRANTS``)."""
    authorizers: list[Grant] = msgspec.field(default_factory=list)
    """Gated runs: the keys the authority delegated granting to (at most ``MAX_AUTHORIZERS``)."""

    epoch_started_at: int = 0
    carried: int = 0
    """How many of this epoch's clients were members of the previous epoch (model from peers)."""
    ready_since: int | None = None
    """WaitingForMembers: when enough clients had joined (the extra wait counts from here)."""
    warmup_seed: bytes = b""
    warmup_witnesses: list[int] = msgspec.field(default_factory=list)
    warmup_reports: list[int] = msgspec.field(default_factory=list)
    rounds: list[Round] = msgspec.field(default_factory=list)
    """Ring of this epoch's last NUM_STORED_ROUNDS rounds, oldest first; rounds[-1] is current."""
    checkpointers: list[int] = msgspec.field(default_factory=list)
    checkpointed: list[int] = msgspec.field(default_factory=list)

    checkpoints: list[CheckpointRecord] = msgspec.field(default_factory=list)
    stats: list[RoundStats] = msgspec.field(default_factory=list)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CoordinatorState)


def encode_state(state: CoordinatorState) -> bytes:
    """Canonical msgpack bytes of the state (same state, same bytes, on any machine)."""
    return _encoder.encode(state)


def decode_state(data: bytes) -> CoordinatorState:
    """Parse :func:`encode_state` output; raises ``ValueError`` if malformed or of another version."""
    try:
        state = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed coordinator state: {exc}") from None
    if state.version != STATE_VERSION:
        raise ValueError(f"coordinator state version {state.version} (this build reads {STATE_VERSION})")
    return state


def _field(f: msgspec.structs.FieldInfo) -> tuple:
    if f.default is not msgspec.NODEFAULT:
        return (f.name, f.type, f.default)
    if f.default_factory is not msgspec.NODEFAULT:
        return (f.name, f.type, msgspec.field(default_factory=f.default_factory))
    return (f.name, f.type)


# CoordinatorState's fields but the rounds: msgspec skips a field its target type lacks without
# building it, and the rounds (witness reports, Bloom filters) are most of a big state's bytes.
_Unrounded = msgspec.defstruct("_Unrounded", [_field(f) for f in msgspec.structs.fields(CoordinatorState)
                                              if f.name != "rounds"], kw_only=True)
_unrounded_decoder = msgspec.msgpack.Decoder(_Unrounded)


def decode_state_without_rounds(data: bytes) -> CoordinatorState:
    """:func:`decode_state` with ``rounds`` left empty: for an observer of membership and progress
    (a server's log of events), in about a third of the time at 256 members. Raises ``ValueError``
    if malformed."""
    try:
        view = _unrounded_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed coordinator state: {exc}") from None
    return CoordinatorState(**msgspec.structs.asdict(view), rounds=[])

