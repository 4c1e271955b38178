"""Pure questions clients, hosts and the dashboard ask of a coordinator state.

Nothing here changes the state. Rounds are looked up by ``step`` in the ring of
the epoch's last four; every function that takes ``step=None`` means the
current round.

Roles in a round come from one swap-or-not shuffle of the round's members
(seeded by the round's seed): the member at shuffle position ``p`` trains the
``p``-th slice of the global batch, and positions below ``Round.witnesses`` are
the witnesses. :func:`role_proof` gives a client's position; anyone holding the
state checks it with :func:`verify_role_proof` at the cost of one index's shuffle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import msgspec

from psyche.coordinator import verification
from psyche.coordinator.bloom import BloomFilter, count_members
from psyche.coordinator.shares import Taken
from psyche.coordinator.shuffle import shuffled_position, shuffled_positions
from psyche.coordinator.state import (
    CheckpointRecord,
    Client,
    ClientState,
    CoordinatorState,
    Round,
    RoundStats,
    RunState,
)
from psyche.coordinator.verification import Check

_SHUFFLE_DOMAIN = b"psyche/round-shuffle"


# --- quorum and consensus -----------------------------------------------------


def quorum(n: int) -> int:
    """Witness reports needed out of ``n`` selected: ⌊2n/3⌋, with 1→1, 2→2, 3→2.

    >>> [quorum(n) for n in (1, 2, 3, 4, 6, 32)]
    [1, 2, 2, 2, 4, 21]
    """
    if n <= 0:
        raise ValueError(f"quorum of {n} witnesses is undefined")
    if n == 2:
        return 2
    return max(1, (2 * n) // 3)


def _bloom(data: bytes) -> BloomFilter | None:
    try:
        return BloomFilter.from_bytes(data)
    except ValueError:
        return None  # reports are checked on arrival; a stored one is always parseable


def participant_votes(round_: Round, ids: Iterable[bytes]) -> dict[bytes, int]:
    """For each client id, how many of the round's witness reports have it in their participant
    bloom (each report's filter parsed once: this is asked of every trainer at a round's close)."""
    blooms = [b for b in (_bloom(r.participant_bloom) for r in round_.reports) if b is not None]
    return count_members(blooms, ids)


def consensus(state: CoordinatorState, step: int,
              candidates: Mapping[tuple[int, int], Iterable[bytes]]) -> dict[tuple[int, int], bytes | None]:
    """For each batch interval ``(start, end)``, the commitment hash peers apply, or None.

    ``candidates`` maps each interval to the commitment hashes a peer received for
    it. The winner is the candidate the most witness broadcast blooms contain, if
    that count reaches the quorum of the round's selected witnesses; ties go to
    the smallest hash so every peer picks the same one.
    """
    round_ = round_for_step(state, step)
    if round_ is None:
        raise ValueError(f"no stored round for step {step}")
    need = quorum(max(1, round_.witnesses))
    blooms = [b for b in (_bloom(r.broadcast_bloom) for r in round_.reports) if b is not None]
    out: dict[tuple[int, int], bytes | None] = {}
    for interval, hashes in candidates.items():
        best: tuple[int, bytes] | None = None
        for h in sorted(set(hashes)):
            votes = sum(1 for f in blooms if h in f)
            if votes >= need and (best is None or votes > best[0]):
                best = (votes, h)
        out[interval] = best[1] if best else None
    return out


def witnessed_trainers(state: CoordinatorState, step: int) -> list[bytes]:
    """Ids of the round's trainers (with a batch) that a quorum of participant blooms contain."""
    round_ = _require_round(state, step)
    need = quorum(max(1, round_.witnesses))
    batches = _batches(state, round_)
    votes = participant_votes(round_, [c.id for c, _, _ in batches])
    return [c.id for c, _, _ in batches if votes[c.id] >= need]


def condemned_trainers(state: CoordinatorState, step: int) -> list[bytes]:
    """Ids of the round's trainers whose results verification condemned when it closed (nobody applies them)."""
    round_ = _require_round(state, step)
    return [state.clients[round_.trainers[p]].id for p in round_.condemned]


def applied_trainers(state: CoordinatorState, step: int) -> list[bytes]:
    """Ids of the trainers whose results every node applies for the closed round of ``step``:
    those a witness quorum saw (:func:`witnessed_trainers`), less those verification condemned."""
    condemned = set(condemned_trainers(state, step))
    return [t for t in witnessed_trainers(state, step) if t not in condemned]


def accusable_trainers(state: CoordinatorState, step: int) -> list[bytes]:
    """Ids a ``HealthCheck(step, ...)`` may accuse now: trainers with a batch in that finished
    round that no witness quorum saw and that are still Healthy. Empty if the round is
    still open or had no witness quorum (then nobody can be judged)."""
    round_ = round_for_step(state, step)
    if round_ is None or not round_closed(state, step) or len(round_.reports) < quorum(max(1, round_.witnesses)):
        return []
    need = quorum(max(1, round_.witnesses))
    batches = _batches(state, round_)
    votes = participant_votes(round_, [c.id for c, _, _ in batches])
    return [c.id for c, _, _ in batches if c.state is ClientState.Healthy and votes[c.id] < need]


# --- rounds, members, roles ---------------------------------------------------


def current_round(state: CoordinatorState) -> Round | None:
    """The round being trained or witnessed (or the epoch's last, in Cooldown); None otherwise."""
    if state.run_state in (RunState.RoundTrain, RunState.RoundWitness, RunState.Cooldown) and state.rounds:
        return state.rounds[-1]
    return None


def round_for_step(state: CoordinatorState, step: int) -> Round | None:
    """The stored round (of the last four of this epoch) that trains ``step``, if any."""
    for r in state.rounds:
        if r.step == step:
            return r
    return None


def round_closed(state: CoordinatorState, step: int) -> bool:
    """True once the stored round of ``step`` no longer takes witness reports."""
    r = round_for_step(state, step)
    if r is None:
        return False
    return r is not state.rounds[-1] or state.run_state not in (RunState.RoundTrain, RunState.RoundWitness)


def _require_round(state: CoordinatorState, step: int | None) -> Round:
    r = current_round(state) if step is None else round_for_step(state, step)
    if r is None:
        raise ValueError("no current round" if step is None else f"no stored round for step {step}")
    return r


def member_index(state: CoordinatorState, client_id: bytes) -> int | None:
    """Index of ``client_id`` in this epoch's client list, or None."""
    for i, c in enumerate(state.clients):
        if c.id == client_id:
            return i
    return None


def member(state: CoordinatorState, client_id: bytes) -> Client | None:
    """This epoch's entry for ``client_id`` (any health), or None."""
    i = member_index(state, client_id)
    return None if i is None else state.clients[i]


def healthy_clients(state: CoordinatorState) -> list[Client]:
    """This epoch's clients that are still Healthy (peers to talk to)."""
    return [c for c in state.clients if c.state is ClientState.Healthy]


def round_members(state: CoordinatorState, height: int) -> list[int]:
    """Client indices taking part in the round of ``height`` (ascending)."""
    return [i for i, c in enumerate(state.clients) if c.until_height is None or height < c.until_height]


def shuffle_seed(random_seed: bytes) -> bytes:
    """The swap-or-not seed derived from a round's (or warmup's, cooldown's) random seed."""
    return hashlib.sha256(_SHUFFLE_DOMAIN + random_seed).digest()


def shuffle_order(members: Sequence[int], random_seed: bytes) -> list[int]:
    """``members`` (ascending client indices) ordered by their shuffle position."""
    positions = shuffled_positions(len(members), shuffle_seed(random_seed))
    order = [0] * len(members)
    for rank, pos in enumerate(positions):
        order[pos] = members[rank]
    return order


class Batch(NamedTuple):
    """One trainer's slice of a round's global batch: sample indices [start, end)."""

    client: bytes
    start: int
    end: int


def batch_split(round_: Round) -> list[tuple[int, int, int]]:
    """The rule that cuts a round's global batch among its trainers: ``(client index, start, end)``
    per trainer, in shuffle order. The only place this rule is written.

    Position ``p`` trains ``round_.sizes[p]`` samples: a re-queued piece whole if
    ``round_.taken`` gives it one, else the next ``sizes[p]`` fresh samples from
    ``data_index`` on (the sizes come from :func:`psyche.coordinator.shares.plan_round`).
    A round without sizes is shared as evenly as possible: the first
    ``batch_size % n`` trainers in shuffle order take one sample more. The intervals
    cover the round's batch exactly once; a trainer whose share is zero samples (more
    trainers than samples) is left out.

    >>> r = Round(height=0, step=1, data_index=100, batch_size=5, random_seed=bytes(32), started_at=0,
    ...           trainers=[4, 2, 7], witnesses=1)
    >>> batch_split(r)
    [(4, 100, 102), (2, 102, 104), (7, 104, 105)]
    >>> batch_split(msgspec.structs.replace(r, batch_size=2))
    [(4, 100, 101), (2, 101, 102)]
    >>> batch_split(msgspec.structs.replace(r, sizes=[1, 3, 1], taken=[Taken(position=1, start=40, end=43)]))
    [(4, 100, 101), (2, 40, 43), (7, 101, 102)]
    """
    n = len(round_.trainers)
    sizes = round_.sizes
    if len(sizes) != n:
        base, extra = divmod(round_.batch_size, n) if n else (0, 0)
        sizes = [base + (1 if pos < extra else 0) for pos in range(n)]
    pieces = {t.position: t for t in round_.taken}
    out, start = [], round_.data_index
    for pos, idx in enumerate(round_.trainers):
        if (t := pieces.get(pos)) is not None:
            out.append((idx, t.start, t.end))
            continue
        size = sizes[pos]
        if size:
            out.append((idx, start, start + size))
        start += size
    return out


def _batches(state: CoordinatorState, round_: Round) -> list[tuple[Client, int, int]]:
    return [(state.clients[idx], start, end) for idx, start, end in batch_split(round_)]


def round_batches(state: CoordinatorState, step: int | None = None) -> list[Batch]:
    """Every trainer's contiguous interval in the round, in shuffle order (trainers whose
    share rounds to zero samples are left out)."""
    return [Batch(c.id, s, e) for c, s, e in _batches(state, _require_round(state, step))]


def assignment_for(state: CoordinatorState, client_id: bytes, *, step: int | None = None) -> tuple[int, int] | None:
    """The sample interval ``[start, end)`` ``client_id`` trains in the round (None: no batch)."""
    r = current_round(state) if step is None else round_for_step(state, step)
    if r is None:
        return None
    for c, s, e in _batches(state, r):
        if c.id == client_id:
            return (s, e)
    return None


class Share(NamedTuple):
    """A trainer's part of a round: its samples, their fraction of the round's batch, and the
    throughput estimate (tokens/s of round time, 0 = not measured yet) the cut was made from."""

    client: bytes
    samples: int
    fraction: float
    throughput: int


def round_shares(state: CoordinatorState, step: int | None = None) -> list[Share]:
    """Every member's share of the round (shuffle order; 0 samples for one left out)."""
    r = _require_round(state, step)
    got = {idx: end - start for idx, start, end in batch_split(r)}
    total = max(1, r.batch_size)
    return [Share(state.clients[idx].id, got.get(idx, 0), got.get(idx, 0) / total, state.clients[idx].throughput)
            for idx in r.trainers]


def verification_checks(state: CoordinatorState, client_id: bytes, *, step: int | None = None) -> list[Check]:
    """The results ``client_id`` checks in the round, in the order its witness report lists their
    scores (empty when it is not a witness or the round checks nothing). A trainer left without
    samples is listed with an empty interval: its score is :data:`~psyche.coordinator.verification.NO_SCORE`."""
    r = current_round(state) if step is None else round_for_step(state, step)
    if r is None or r.verifiers <= 0:
        return []
    mine = [p for p, idx in enumerate(r.trainers[: r.witnesses]) if state.clients[idx].id == client_id]
    if not mine:
        return []
    intervals = {idx: (start, end) for idx, start, end in batch_split(r)}
    checks = verification.assignments(len(r.trainers), r.witnesses, r.verifiers)[mine[0]]
    return [Check(p, state.clients[r.trainers[p]].id, *intervals.get(r.trainers[p], (0, 0))) for p in checks]


def round_trainers(state: CoordinatorState, step: int | None = None) -> list[bytes]:
    """Ids of the round's members in shuffle order (the order batches are cut in)."""
    return [state.clients[i].id for i in _require_round(state, step).trainers]


def round_witnesses(state: CoordinatorState, step: int | None = None) -> list[bytes]:
    """Ids of the round's selected witnesses."""
    r = _require_round(state, step)
    return [state.clients[i].id for i in r.trainers[: r.witnesses]]


def is_witness(state: CoordinatorState, client_id: bytes, *, step: int | None = None) -> bool:
    """Whether ``client_id`` is a selected witness of the round (False if no such round)."""
    r = current_round(state) if step is None else round_for_step(state, step)
    return r is not None and any(state.clients[i].id == client_id for i in r.trainers[: r.witnesses])


def is_warmup_witness(state: CoordinatorState, client_id: bytes) -> bool:
    """Whether ``client_id`` must send ``WarmupWitness`` in the current Warmup."""
    return state.run_state is RunState.Warmup and any(state.clients[i].id == client_id for i in state.warmup_witnesses)


def is_checkpointer(state: CoordinatorState, client_id: bytes) -> bool:
    """Whether ``client_id`` must write a checkpoint in the current Cooldown."""
    return state.run_state is RunState.Cooldown and any(state.clients[i].id == client_id for i in state.checkpointers)


class RoleProof(msgspec.Struct, frozen=True, kw_only=True):
    """Evidence of a client's role in a round: its rank among the round's members and
    the shuffle position that rank maps to. Position < witnesses means witness; the
    position also fixes the batch interval."""

    step: int
    rank: int
    position: int


def role_proof(state: CoordinatorState, client_id: bytes, *, step: int | None = None) -> RoleProof | None:
    """The proof of ``client_id``'s role in the round, or None if it is not a member of it."""
    r = current_round(state) if step is None else round_for_step(state, step)
    if r is None:
        return None
    for pos, idx in enumerate(r.trainers):
        if state.clients[idx].id == client_id:
            members = sorted(r.trainers)
            return RoleProof(step=r.step, rank=members.index(idx), position=pos)
    return None


def verify_role_proof(state: CoordinatorState, client_id: bytes, proof: RoleProof) -> bool:
    """Check a :class:`RoleProof` from the round's seed and member list alone (one index's
    shuffle, about 180 sha256 calls), without trusting ``Round.trainers``."""
    r = round_for_step(state, proof.step)
    if r is None:
        return False
    members = sorted(round_members(state, r.height))
    if not 0 <= proof.rank < len(members) or state.clients[members[proof.rank]].id != client_id:
        return False
    return shuffled_position(proof.rank, len(members), shuffle_seed(r.random_seed)) == proof.position


# --- time, rewards, history ---------------------------------------------------


def phase_deadline(state: CoordinatorState) -> int | None:
    """Unix second at which the current phase times out (None: no timeout pending).

    WaitingForMembers has one only once enough clients joined; RoundTrain may end
    earlier (witness quorum), Warmup earlier too (all warmup witnesses ready).
    """
    s = state.settings
    match state.run_state:
        case RunState.WaitingForMembers:
            return None if state.ready_since is None else state.ready_since + s.waiting_for_members_extra_time
        case RunState.Warmup:
            return state.state_started_at + s.warmup_time
        case RunState.RoundTrain:
            return state.state_started_at + s.max_round_train_time
        case RunState.RoundWitness:
            return state.state_started_at + s.round_witness_time
        case RunState.Cooldown:
            return state.state_started_at + s.cooldown_time
        case _:
            return None


def time_left(state: CoordinatorState, now: int) -> int | None:
    """Seconds until :func:`phase_deadline` (0 if already due), or None."""
    d = phase_deadline(state)
    return None if d is None else max(0, d - now)


def epoch_deadline(state: CoordinatorState) -> int | None:
    """When the epoch's time runs out (it then ends at the next round boundary)."""
    if state.run_state in (RunState.Warmup, RunState.RoundTrain, RunState.RoundWitness):
        return state.epoch_started_at + state.settings.epoch_time
    return None


def lr_warmup_window(state: CoordinatorState) -> tuple[int, int] | None:
    """Steps ``[start, end)`` over which the LR warms up again after a resume (cold start)."""
    n = state.settings.cold_start_warmup_steps
    if state.cold_start_step == 0 or n == 0:
        return None
    return (state.cold_start_step, state.cold_start_step + n)


def points(state: CoordinatorState) -> dict[bytes, int]:
    """Reward points earned so far, per client id (everyone who ever joined)."""
    return {a.id: a.points for a in state.accounts}


def address_of(state: CoordinatorState, client_id: bytes) -> str | None:
    """The latest P2P address ``client_id`` joined with, or None if it never joined."""
    for a in state.accounts:
        if a.id == client_id:
            return a.p2p_address
    return None


def steps_completed(state: CoordinatorState) -> int:
    """Optimizer steps the run has completed: 0 before any training, ``total_steps`` once
    Finished. This is "the step a run is at" wherever a person reads one; ``state.step``
    is the step of the current (or next) round, one more.

    A round's step counts as completed once its witness round closed (the step moved on):
    while step ``k`` trains or is witnessed, ``k - 1`` are completed.
    """
    return state.step - 1


def round_stats(state: CoordinatorState) -> list[RoundStats]:
    """Witness metadata of the last finished rounds, oldest first (bounded ring)."""
    return list(state.stats)


def latest_checkpoint(state: CoordinatorState) -> CheckpointRecord | None:
    """The most recent reported checkpoint record, or None."""
    return state.checkpoints[-1] if state.checkpoints else None


def model_source(state: CoordinatorState) -> str:
    """Where a client of the current epoch gets the model during warmup.

    ``"init"``: nothing trained yet, build it from the run config. ``"p2p"``: some
    member kept the model from the previous epoch, download it from peers.
    ``"checkpoint"``: nobody kept it, load :func:`latest_checkpoint`.
    """
    if state.step == 1:
        return "init"
    if state.carried > 0:
        return "p2p"
    return "checkpoint"
