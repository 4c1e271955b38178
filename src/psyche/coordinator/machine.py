"""The coordinator state machine: one entry point, ``Coordinator.apply``.

Transitions (``now`` and ``seed`` always come from the host)::

    Uninitialized ──Resume──► WaitingForMembers
    WaitingForMembers ──Tick: ≥ init_min_clients (carried + joined) for the extra wait──► Warmup
    Warmup ──every selected warmup witness ready, or Tick after warmup_time──► RoundTrain
           └─Tick: fewer than min_clients healthy──► WaitingForMembers
    RoundTrain ──quorum of witness reports, or Tick after max_round_train_time──► RoundWitness
    RoundWitness ──Tick once every selected witness reported, or after round_witness_time──► RoundTrain (next step)
                 └─► Cooldown if the epoch time ran out, healthy < min_clients,
                     reports < quorum, total_steps done, or a pause is pending
    Cooldown ──Tick after cooldown_time──► WaitingForMembers (next epoch) | Finished | Paused
    Pause (authority): pending in RoundTrain/RoundWitness/Cooldown, at once otherwise
    Paused ──Resume──► WaitingForMembers (cold start: the LR warms up again)

Membership: ``Join`` puts a client on the pending list; the pending clients and
the previous epoch's still-Healthy clients form the next epoch when Warmup
starts (joins take effect at epoch boundaries; a member re-joining only updates
its address). A client that withdraws, is accused successfully, or is a
selected witness that did not report, leaves at the end of the round and earns
no points for the epoch; it may Join again for the next one. At a pause every
client is withdrawn, so all join again after the resume. Who may join (open or
gated runs: ``Authorize``, ``Delegate``, ``Revoke``) and who gets in when many keys
ask at once are :mod:`~psyche.coordinator.access`'s rules: the waiting list is
bounded, a join is good for the next epoch only, fresh keys enter in bounded
numbers, and a member already training is never displaced.

Work: each round's batch is cut among its trainers by :func:`~psyche.coordinator.shares.plan_round`
(in proportion to their measured throughput, or equally); when a round closes it is
settled: accepted trainers are credited their tokens and their estimates updated from
the witnesses' arrival times, and the batch of every trainer no quorum saw is re-queued.
At the end of an epoch the healthy members share ``epoch_reward`` by accepted tokens.

Verification: each round's witnesses score the results assigned to them
(:mod:`~psyche.coordinator.verification`); at the round's close a trainer whose
accumulated suspicion reaches the limit has that round's result condemned: nobody
applies it (:func:`~psyche.coordinator.queries.applied_trainers`), its batch is
re-queued, and the trainer is dropped without points.

Every handler starts with guard clauses that raise a named
:class:`~psyche.coordinator.errors.CoordinatorError` before changing anything;
``apply`` returns that error, so a refused instruction leaves the state as it was.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

from psyche.coordinator import access, verification
from psyche.coordinator.bloom import BloomFilter
from psyche.coordinator.errors import (
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
    MAX_ACCUSED,
    MAX_ADDRESS_LEN,
    MAX_ARRIVAL_MS,
    MAX_LOCATION_LEN,
    MAX_SCORE,
    MIN_SCORE,
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
)
from psyche.coordinator.queries import (
    batch_split,
    member_index,
    participant_votes,
    quorum,
    round_closed,
    round_for_step,
    round_members,
    shuffle_order,
)
from psyche.coordinator.shares import MAX_REQUEUED, Piece, delivery_ms, measured, missed, plan_round
from psyche.coordinator.settings import MAX_ACCOUNTS, CoordinatorSettings, settings_problems
from psyche.coordinator.state import (
    NUM_STORED_CHECKPOINTS,
    NUM_STORED_ROUNDS,
    NUM_STORED_STATS,
    Account,
    CheckpointRecord,
    Client,
    ClientState,
    CoordinatorState,
    Round,
    RoundStats,
    RunState,
    WitnessReport,
    decode_state,
    encode_state,
)

HALTED = (RunState.Uninitialized, RunState.Paused, RunState.Finished)
IN_ROUND = (RunState.RoundTrain, RunState.RoundWitness)


def _hex(b: bytes) -> str:
    return b.hex()[:16]


def _int_in(x: object, lo: int, hi: int) -> bool:
    """Whether ``x`` is an integer (not a bool) in ``lo..hi``: instructions built in-process skip msgspec's checks."""
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _check_step(step: object) -> None:
    if not _int_in(step, 0, 2**32):
        raise InvalidInstruction(f"step must be an integer in 0..2**32 (got {step!r})")


class Coordinator:
    """One run's coordinator: ``state`` plus the rules that change it.

    >>> c = Coordinator.new("demo", CoordinatorSettings(), authority=bytes(32), now=0)
    >>> c.apply(Join(p2p_address="ticket-1"), signer=b"\\x01" * 32, now=1, seed=bytes(32)) is None
    True
    """

    def __init__(self, state: CoordinatorState):
        self.state = state

    # --- construction and encoding ------------------------------------------

    @classmethod
    def new(cls, run_id: str, settings: CoordinatorSettings | Any, authority: bytes, now: int, *,
            seq_len: int | None = None, start_paused: bool = False) -> Coordinator:
        """A fresh run, WaitingForMembers (or Paused, for the authority to Resume).

        ``settings``: :class:`CoordinatorSettings`, a ``CoordinatorConfig`` or a whole
        ``RunConfig`` (which supplies ``seq_len``). Raises ``ValueError`` listing every
        broken rule if the settings are unusable.
        """
        if not isinstance(settings, CoordinatorSettings):
            settings = CoordinatorSettings.from_config(settings, seq_len=seq_len)
        problems = settings_problems(settings)
        if problems:
            raise ValueError("coordinator settings: " + "; ".join(problems))
        if not isinstance(run_id, str) or not 1 <= len(run_id) <= 64:
            raise ValueError(f"run_id must be 1..64 characters (got {run_id!r})")
        if not isinstance(authority, bytes) or len(authority) != 32:
            raise ValueError("authority must be a 32-byte public key")
        state = CoordinatorState(run_id=run_id, authority=authority, settings=settings,
                                 run_state=RunState.Paused if start_paused else RunState.WaitingForMembers,
                                 state_started_at=now)
        return cls(state)

    def to_bytes(self) -> bytes:
        """The canonical encoding of the whole state."""
        return encode_state(self.state)

    @classmethod
    def from_bytes(cls, data: bytes) -> Coordinator:
        """Rebuild from :meth:`to_bytes`; raises ``ValueError`` if malformed."""
        return cls(decode_state(data))

    def digest(self) -> str:
        """Hex sha256 of :meth:`to_bytes`: equal digests mean equal states."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def copy(self) -> Coordinator:
        """An independent copy."""
        return Coordinator.from_bytes(self.to_bytes())

    def is_member(self, client_id: bytes) -> bool:
        """Whether ``client_id`` is in this epoch (any health) or waiting to join the next."""
        return member_index(self.state, client_id) is not None or client_id in self.state.pending

    # --- the entry point ----------------------------------------------------

    def apply(self, instr: Instruction, signer: bytes, now: int, seed: bytes) -> CoordinatorError | None:
        """Validate and apply one instruction; return the refusal (state untouched) or None.

        ``signer``: the 32-byte key the host authenticated. ``now``: unix seconds
        from the host clock. ``seed``: 32 unpredictable bytes from the host, used
        if this instruction starts a round, an epoch or a cooldown.
        """
        handler = self._handlers.get(type(instr))
        try:
            if handler is None:
                raise InvalidInstruction(f"not a coordinator instruction: {type(instr).__name__}")
            if not isinstance(signer, bytes) or len(signer) != 32:
                raise InvalidInstruction("signer must be a 32-byte public key")
            if not _int_in(now, 0, 2**63 - 1):
                raise InvalidInstruction(f"now must be non-negative integer seconds (got {now!r})")
            if not isinstance(seed, bytes) or len(seed) != 32:
                raise InvalidInstruction("seed must be 32 bytes")
            handler(self, instr, signer, now, seed)
        except CoordinatorError as err:
            return err
        return None

    # --- instructions -------------------------------------------------------

    def _join(self, instr: Join, signer: bytes, now: int, seed: bytes) -> None:
        s = self.state
        if s.run_state is RunState.Finished:
            raise Halted("the run is Finished")
        addr = instr.p2p_address
        if not isinstance(addr, str) or not 1 <= len(addr) <= MAX_ADDRESS_LEN:
            raise InvalidInstruction(f"p2p_address must be 1..{MAX_ADDRESS_LEN} characters")
        if not access.may_join(s, signer, now):
            raise Unauthorized(f"run {s.run_id} is gated and {_hex(signer)} holds no grant to join: ask the run's "
                               "authority for one (psyche authorize)")
        account = self._account(signer)
        recycle = None
        if account is None and len(s.accounts) >= MAX_ACCOUNTS:
            recycle = access.account_to_recycle(s)
            if recycle is None:
                raise RunFull(f"the run already has {MAX_ACCOUNTS} client accounts, all members, waiting or "
                              "holding points")
        i = member_index(s, signer)
        rejoin = i is not None and s.clients[i].state is ClientState.Healthy
        evict = None
        if not rejoin and signer not in s.pending and len(s.pending) >= access.MAX_PENDING:
            evict = access.pending_to_evict(s)
            if evict is None:
                raise RunFull(f"{access.MAX_PENDING} keys that earned points already wait for the next epoch")
        # --- valid: apply
        if recycle is not None:
            del s.accounts[recycle]
        if account is None:
            s.accounts.append(Account(id=signer, p2p_address=addr, joined_at=now))
        else:
            account.p2p_address = addr
            account.joined_at = now
        if rejoin and i is not None:
            s.clients[i].p2p_address = addr  # a member re-joining only updates its address
        elif signer not in s.pending:
            if evict is not None:
                del s.pending[evict]
            s.pending.append(signer)
        self._refresh_ready(now)

    def _withdraw(self, instr: Withdraw, signer: bytes, now: int, seed: bytes) -> None:
        s = self.state
        if s.run_state is RunState.Finished:
            raise Halted("the run is Finished")
        i = member_index(s, signer)
        healthy_index = i if i is not None and s.clients[i].state is ClientState.Healthy else None
        if healthy_index is None and signer not in s.pending:
            raise NotAMember(f"{_hex(signer)} is neither a healthy member nor pending")
        # --- valid: apply
        if healthy_index is not None:
            self._leave(healthy_index, ClientState.Withdrawn)
        if signer in s.pending:
            s.pending.remove(signer)
        self._refresh_ready(now)

    def _authorize(self, instr: Authorize, signer: bytes, now: int, seed: bytes) -> None:
        s = self.state
        self._check_granting(instr.key, instr.expires_at, now, "grant")
        if signer != s.authority:
            term = access.live(s.authorizers, signer, now)
            if term is None:
                raise Unauthorized(f"{_hex(signer)} is neither the run authority nor a live authorizer")
            if instr.expires_at == 0 or (term.expires_at and instr.expires_at > term.expires_at):
                raise Unauthorized("an authorizer's grant must expire, no later than its delegation "
                                   f"({'no end' if term.expires_at == 0 else term.expires_at})")
        # --- valid: apply (or refused for room, state untouched)
        if not access.grant(s.grants, instr.key, instr.expires_at, now, access.MAX_GRANTS):
            raise RunFull(f"the run holds {access.MAX_GRANTS} live grants; revoke some first")

    def _delegate(self, instr: Delegate, signer: bytes, now: int, seed: bytes) -> None:
        s = self.state
        self._check_granting(instr.key, instr.expires_at, now, "delegation")
        if signer != s.authority:
            raise Unauthorized("only the run authority may delegate granting")
        if instr.key == s.authority:
            raise InvalidInstruction("the authority grants already; delegate to another key")
        # --- valid: apply (or refused for room, state untouched)
        if not access.grant(s.authorizers, instr.key, instr.expires_at, now, access.MAX_AUTHORIZERS):
            raise RunFull(f"the run holds {access.MAX_AUTHORIZERS} live authorizers; revoke one first")

    def _revoke(self, instr: Revoke, signer: bytes, now: int, seed: bytes) -> None:
        s = self.state
        self._check_granting(instr.key, 0, now, "revocation")
        is_authority = signer == s.authority
        if not is_authority and access.live(s.authorizers, signer, now) is None:
            raise Unauthorized(f"{_hex(signer)} is neither the run authority nor a live authorizer")
        key = instr.key
        i = member_index(s, key)
        member = i is not None and s.clients[i].state is ClientState.Healthy
        delegated = is_authority and any(g.key == key for g in s.authorizers)
        if not (any(g.key == key for g in s.grants) or delegated or member or key in s.pending):
            raise NotAMember(f"{_hex(key)} holds no grant{' or delegation' if is_authority else ''}, "
                             "and is neither a member nor waiting")
        # --- valid: apply
        access.remove(s.grants, key)
        if is_authority:
            access.remove(s.authorizers, key)
        if key in s.pending:
            s.pending.remove(key)
        if member and i is not None:
            self._leave(i, ClientState.Ejected)
        self._refresh_ready(now)

    def _check_granting(self, key: object, expires_at: object, now: int, what: str) -> None:
        """Guards every grant, delegation and revocation shares."""
        s = self.state
        if s.run_state is RunState.Finished:
            raise Halted("the run is Finished")
        if not access.gated(s):
            raise InvalidRunState(f"run {s.run_id} is open (anyone may join): a {what} applies to gated runs only")
        if not isinstance(key, bytes) or len(key) != 32:
            raise InvalidInstruction("key must be a 32-byte public key")
        if not isinstance(expires_at, int) or not _int_in(expires_at, 0, 2**63 - 1) or 0 < expires_at <= now:
            raise InvalidInstruction(f"expires_at must be 0 (no end) or a unix second after now ({now}), "
                                     f"got {expires_at!r}")

    def _pause(self, instr: Pause, signer: bytes, now: int, seed: bytes) -> None:
        s = self.state
        if signer != s.authority:
            raise Unauthorized("only the run authority may pause")
        if s.run_state in HALTED:
            raise Halted(f"the run is already {s.run_state.value}")
        if s.pause_pending:
            raise InvalidRunState("a pause is already pending")
        # --- valid: apply
        if s.run_state in (RunState.RoundTrain, RunState.RoundWitness, RunState.Cooldown):
            s.pause_pending = True  # takes effect at the end of the round, through Cooldown
        else:
            self._pause_now(now)

    def _resume(self, instr: Resume, signer: bytes, now: int, seed: bytes) -> None:
        s = self.state
        if signer != s.authority:
            raise Unauthorized("only the run authority may resume")
        if s.run_state not in (RunState.Paused, RunState.Uninitialized):
            raise InvalidRunState(f"only a Paused run can resume (run is {s.run_state.value})")
        problems = settings_problems(s.settings)
        if problems:
            raise InvalidInstruction("settings are unusable: " + "; ".join(problems))
        # --- valid: apply
        if s.run_state is RunState.Paused:
            s.cold_start_step = s.step
        self._wait_for_members(now)

    def _tick(self, instr: Tick, signer: bytes, now: int, seed: bytes) -> None:
        s = self.state
        if s.run_state in HALTED:
            raise Halted(f"the run is {s.run_state.value}")
        match s.run_state:
            case RunState.WaitingForMembers:
                self._tick_waiting_for_members(now, seed)
            case RunState.Warmup:
                self._tick_warmup(now, seed)
            case RunState.RoundTrain:
                self._tick_round_train(now, seed)
            case RunState.RoundWitness:
                self._tick_round_witness(now, seed)
            case RunState.Cooldown:
                self._tick_cooldown(now, seed)

    def _warmup_witness(self, instr: WarmupWitness, signer: bytes, now: int, seed: bytes) -> None:
        s = self.state
        if s.run_state in HALTED:
            raise Halted(f"the run is {s.run_state.value}")
        i = member_index(s, signer)
        if i is None:
            raise NotAMember(f"{_hex(signer)} is not a member of epoch {s.epoch}")
        if s.run_state in IN_ROUND and i in s.warmup_witnesses:
            return  # expected: a late report after warmup already ended; nothing to do
        if s.run_state is not RunState.Warmup:
            raise InvalidRunState(f"warmup witness outside Warmup (run is {s.run_state.value})")
        if i not in s.warmup_witnesses:
            raise NotAWitness(f"{_hex(signer)} is not a warmup witness of epoch {s.epoch}")
        if i in s.warmup_reports:
            raise DuplicateWitness(f"{_hex(signer)} already sent its warmup witness")
        if s.clients[i].state is not ClientState.Healthy:
            raise NotAMember(f"{_hex(signer)} left epoch {s.epoch}")
        # --- valid: apply
        s.warmup_reports.append(i)
        waiting = [w for w in s.warmup_witnesses
                   if s.clients[w].state is ClientState.Healthy and w not in s.warmup_reports]
        if not waiting and self._healthy_count() >= s.settings.min_clients:
            self._start_round(now, seed)

    def _witness(self, instr: Witness, signer: bytes, now: int, seed: bytes) -> None:
        s = self.state
        if s.run_state in HALTED:
            raise Halted(f"the run is {s.run_state.value}")
        _check_step(instr.step)
        if instr.step < s.step:
            # expected when a witness is slow: the round closed without it
            raise StaleStep(f"the round of step {instr.step} is over (run is {s.run_state.value} at step {s.step})")
        if s.run_state not in IN_ROUND:
            raise InvalidRunState(f"witness reports are taken in RoundTrain/RoundWitness (run is {s.run_state.value})")
        i = member_index(s, signer)
        if i is None:
            raise NotAMember(f"{_hex(signer)} is not a member of epoch {s.epoch}")
        r = s.rounds[-1]
        if instr.step > r.step:
            raise InvalidInstruction(f"step {instr.step} has not started (current step {r.step})")
        if i not in r.trainers[: r.witnesses]:
            raise NotAWitness(f"{_hex(signer)} is not a witness of step {r.step}")
        if any(rep.client == i for rep in r.reports):
            raise DuplicateWitness(f"{_hex(signer)} already reported for step {r.step}")
        for name in ("participant_bloom", "broadcast_bloom"):
            data = getattr(instr, name)
            try:
                BloomFilter.from_bytes(data if isinstance(data, bytes) else b"")
            except ValueError as exc:
                raise InvalidInstruction(f"{name}: {exc}") from None
        if not isinstance(instr.broadcast_merkle, bytes) or len(instr.broadcast_merkle) != 32:
            raise InvalidInstruction("broadcast_merkle must be 32 bytes")
        for name in ("loss", "tokens_per_sec"):
            v = getattr(instr, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise InvalidInstruction(f"{name} must be a finite number (got {v!r})")
        if instr.tokens_per_sec < 0:
            raise InvalidInstruction("tokens_per_sec must be >= 0")
        bw = instr.bandwidth_bytes
        if not _int_in(bw, 0, 2**63 - 1):
            raise InvalidInstruction(f"bandwidth_bytes must be a non-negative integer (got {bw!r})")
        arrivals = instr.arrivals_ms
        if not isinstance(arrivals, list) or len(arrivals) not in (0, len(r.trainers)):
            raise InvalidInstruction(f"arrivals_ms must list one delay per trainer of step {r.step} "
                                     f"({len(r.trainers)}) or none")
        if not all(_int_in(a, 0, MAX_ARRIVAL_MS) for a in arrivals):
            raise InvalidInstruction(f"every arrivals_ms entry must be an integer in 0..{MAX_ARRIVAL_MS}")
        scores = instr.scores
        checks = len(verification.assignments(len(r.trainers), r.witnesses, r.verifiers)[r.trainers.index(i)])
        if not isinstance(scores, list) or len(scores) not in (0, checks):
            raise InvalidInstruction(f"scores must list one score per result this witness checks in step {r.step} "
                                     f"({checks}) or none")
        if not all(_int_in(x, MIN_SCORE, MAX_SCORE) for x in scores):
            raise InvalidInstruction(f"every score must be an integer in {MIN_SCORE}..{MAX_SCORE}")
        # --- valid: apply
        r.reports.append(WitnessReport(
            client=i, participant_bloom=instr.participant_bloom, broadcast_bloom=instr.broadcast_bloom,
            broadcast_merkle=instr.broadcast_merkle, loss=float(instr.loss),
            tokens_per_sec=float(instr.tokens_per_sec), bandwidth_bytes=bw, arrivals_ms=list(arrivals),
            scores=list(scores)))
        if s.run_state is RunState.RoundTrain and len(r.reports) >= quorum(r.witnesses):
            self._change_state(now, RunState.RoundWitness)

    def _health_check(self, instr: HealthCheck, signer: bytes, now: int, seed: bytes) -> None:
        s = self.state
        if s.run_state in HALTED:
            raise Halted(f"the run is {s.run_state.value}")
        i = member_index(s, signer)
        if i is None or s.clients[i].state is not ClientState.Healthy:
            raise NotAMember(f"{_hex(signer)} is not a healthy member of epoch {s.epoch}")
        if s.run_state not in (RunState.RoundTrain, RunState.RoundWitness, RunState.Cooldown):
            raise InvalidRunState(f"health checks are taken during rounds and Cooldown (run is {s.run_state.value})")
        _check_step(instr.step)
        accused = instr.accused
        if not isinstance(accused, list) or not 1 <= len(accused) <= MAX_ACCUSED:
            raise InvalidInstruction(f"accused must list 1..{MAX_ACCUSED} client ids")
        if any(not isinstance(a, bytes) or len(a) != 32 for a in accused):
            raise InvalidInstruction("every accused id must be 32 bytes")
        if len(set(accused)) != len(accused):
            raise InvalidInstruction("accused ids must be distinct")
        r = round_for_step(s, instr.step)
        if r is None:
            if instr.step < s.step:
                raise StaleStep(f"the round of step {instr.step} is no longer stored")
            raise InvalidInstruction(f"step {instr.step} has not been trained yet")
        if not round_closed(s, instr.step):
            raise InvalidRunState(f"the round of step {instr.step} still takes witness reports")
        need = quorum(r.witnesses)
        if len(r.reports) < need:
            raise FalseAccusation(f"the round of step {instr.step} had no witness quorum; nobody can be judged")
        # Validate the whole batch before applying any of it.
        with_batch = self._trainers_with_batch(r)
        seen = participant_votes(r, accused)
        targets = []
        for a in accused:
            j = member_index(s, a)
            if j is None or j not in with_batch:
                raise FalseAccusation(f"{_hex(a)} had no batch in the round of step {instr.step}")
            votes = seen[a]
            if votes >= need:
                raise FalseAccusation(f"{votes} of {r.witnesses} witnesses saw {_hex(a)} in step {instr.step}")
            targets.append(j)
        # --- valid: apply
        for j in targets:
            if s.clients[j].state is ClientState.Healthy:
                self._leave(j, ClientState.Dropped)

    def _checkpoint(self, instr: Checkpoint, signer: bytes, now: int, seed: bytes) -> None:
        s = self.state
        if s.run_state in HALTED:
            raise Halted(f"the run is {s.run_state.value}")
        if s.run_state is not RunState.Cooldown:
            raise InvalidRunState(f"checkpoints are reported in Cooldown (run is {s.run_state.value})")
        i = member_index(s, signer)
        if i is None:
            raise NotAMember(f"{_hex(signer)} is not a member of epoch {s.epoch}")
        if i not in s.checkpointers:
            raise NotACheckpointer(f"{_hex(signer)} is not a checkpointer of epoch {s.epoch}")
        if i in s.checkpointed:
            raise DuplicateCheckpoint(f"{_hex(signer)} already reported its checkpoint")
        _check_step(instr.step)
        last = s.step - 1
        if instr.step != last:
            if instr.step < last:
                raise StaleStep(f"checkpoint of step {instr.step}; this cooldown follows step {last}")
            raise InvalidInstruction(f"checkpoint of step {instr.step}; this cooldown follows step {last}")
        if not isinstance(instr.location, str) or not 1 <= len(instr.location) <= MAX_LOCATION_LEN:
            raise InvalidInstruction(f"location must be 1..{MAX_LOCATION_LEN} characters")
        if not isinstance(instr.sha256, bytes) or len(instr.sha256) != 32:
            raise InvalidInstruction("sha256 must be 32 bytes")
        # --- valid: apply
        s.checkpointed.append(i)
        s.checkpoints.append(CheckpointRecord(epoch=s.epoch, step=instr.step, location=instr.location,
                                              sha256=instr.sha256, client=signer))
        del s.checkpoints[:-NUM_STORED_CHECKPOINTS]

    _handlers: dict[type, Callable[..., None]] = {
        Join: _join, Withdraw: _withdraw, Pause: _pause, Resume: _resume, Tick: _tick,
        WarmupWitness: _warmup_witness, Witness: _witness, HealthCheck: _health_check, Checkpoint: _checkpoint,
        Authorize: _authorize, Delegate: _delegate, Revoke: _revoke,
    }

    # --- ticks, one per run state -------------------------------------------

    def _tick_waiting_for_members(self, now: int, seed: bytes) -> None:
        s = self.state
        self._refresh_ready(now)
        if s.ready_since is not None and now >= s.ready_since + s.settings.waiting_for_members_extra_time:
            self._start_epoch(now, seed)

    def _tick_warmup(self, now: int, seed: bytes) -> None:
        s = self.state
        if now >= s.state_started_at + s.settings.warmup_time:
            # A warmup witness that is not ready by now cannot train round 0: drop it.
            for w in s.warmup_witnesses:
                if w not in s.warmup_reports and s.clients[w].state is ClientState.Healthy:
                    self._leave(w, ClientState.Dropped)
            if self._healthy_count() >= s.settings.min_clients:
                self._start_round(now, seed)
                return
        if self._healthy_count() < s.settings.min_clients:
            self._wait_for_members(now)  # the epoch never started training: no rewards, same epoch number

    def _tick_round_train(self, now: int, seed: bytes) -> None:
        s = self.state
        if now >= s.state_started_at + s.settings.max_round_train_time:
            self._change_state(now, RunState.RoundWitness)

    def _tick_round_witness(self, now: int, seed: bytes) -> None:
        s = self.state
        cfg = s.settings
        r = s.rounds[-1]
        reported = {rep.client for rep in r.reports}
        # The window is there for late witnesses; once all have reported there is nothing
        # left to wait for, and waiting would idle every trainer.
        if now < s.state_started_at + cfg.round_witness_time and len(reported) < r.witnesses:
            return
        # A selected witness that never reported is treated as gone (else it would stall every round).
        for w in r.trainers[: r.witnesses]:
            if w not in reported and s.clients[w].state is ClientState.Healthy:
                self._leave(w, ClientState.Dropped)
        self._settle(r)
        self._record_stats(r, now)
        s.step += 1
        if not r.reports:
            # No report at all: we cannot tell who is alive, so everyone must join again.
            for i, c in enumerate(s.clients):
                if c.state is ClientState.Healthy:
                    self._leave(i, ClientState.Withdrawn)
            self._start_cooldown(now, seed)
            return
        if (len(r.reports) < quorum(r.witnesses)
                or self._healthy_count() < cfg.min_clients
                or s.step > cfg.total_steps
                or s.pause_pending
                or now >= s.epoch_started_at + cfg.epoch_time):
            self._start_cooldown(now, seed)
        else:
            self._start_round(now, seed)

    def _tick_cooldown(self, now: int, seed: bytes) -> None:
        s = self.state
        if now < s.state_started_at + s.settings.cooldown_time:
            return
        healthy = [c for c in s.clients if c.state is ClientState.Healthy]
        work = sum(c.tokens for c in healthy)
        for c in healthy:
            # Points follow accepted work; an epoch that trained nothing pays its healthy members equally.
            share = s.settings.epoch_reward * c.tokens // work if work else s.settings.epoch_reward // len(healthy)
            account = self._account(c.id)
            if account is not None:
                account.points += share
        s.epoch += 1
        if s.pause_pending:
            self._pause_now(now)
        else:
            self._wait_for_members(now)

    # --- transitions --------------------------------------------------------

    def _change_state(self, now: int, new: RunState) -> None:
        s = self.state
        assert s.run_state is not new, f"no-op transition to {new.value}"
        s.run_state = new
        s.state_started_at = now

    def _wait_for_members(self, now: int) -> None:
        """Enter WaitingForMembers (or Finished) keeping only the Healthy clients."""
        s = self.state
        s.clients = [Client(id=c.id, p2p_address=c.p2p_address, throughput=c.throughput, suspicion=c.suspicion)
                     for c in s.clients if c.state is ClientState.Healthy]
        self._clear_epoch()
        self._change_state(now, RunState.WaitingForMembers if s.step <= s.settings.total_steps else RunState.Finished)
        self._refresh_ready(now)

    def _pause_now(self, now: int) -> None:
        s = self.state
        for i, c in enumerate(s.clients):
            if c.state is ClientState.Healthy:
                self._leave(i, ClientState.Withdrawn)
        self._clear_epoch()
        s.pause_pending = False
        self._change_state(now, RunState.Paused)

    def _clear_epoch(self) -> None:
        s = self.state
        s.rounds = []
        s.warmup_seed = b""
        s.warmup_witnesses = []
        s.warmup_reports = []
        s.checkpointers = []
        s.checkpointed = []
        s.ready_since = None

    def _start_epoch(self, now: int, seed: bytes) -> None:
        s = self.state
        carried = [c for c in s.clients if c.state is ClientState.Healthy]
        newcomers = access.admitted(s, carried, now)
        s.pending = []  # a join is good for one epoch: who was not admitted joins again
        s.clients = [Client(id=c.id, p2p_address=c.p2p_address, throughput=c.throughput, suspicion=c.suspicion)
                     for c in carried]
        for cid in newcomers:
            account = self._account(cid)
            s.clients.append(Client(id=cid, p2p_address=account.p2p_address if account else ""))
        s.carried = len(carried)
        self._clear_epoch()
        s.epoch_started_at = now
        s.warmup_seed = seed
        order = shuffle_order(list(range(len(s.clients))), seed)
        s.warmup_witnesses = sorted(order[: s.settings.witness_count(len(s.clients))])
        self._change_state(now, RunState.Warmup)

    def _start_round(self, now: int, seed: bytes) -> None:
        s = self.state
        height = s.rounds[-1].height + 1 if s.rounds else 0
        members = round_members(s, height)
        batch = s.settings.batch_size_at(s.next_data_index * s.settings.seq_len)
        trainers = shuffle_order(members, seed)
        plan = plan_round(batch, [s.clients[i].throughput for i in trainers], s.requeued,
                          speed_aware=s.settings.shares == "speed")
        r = Round(height=height, step=s.step, data_index=s.next_data_index, batch_size=sum(plan.sizes),
                  random_seed=seed, started_at=now, trainers=trainers,
                  witnesses=s.settings.witness_count(len(members)), sizes=plan.sizes, taken=plan.taken,
                  verifiers=s.settings.verifiers)
        del s.requeued[: len(plan.taken)]
        s.next_data_index += plan.fresh  # every sample index is handed out once in the whole run
        s.rounds.append(r)
        del s.rounds[:-NUM_STORED_ROUNDS]
        self._change_state(now, RunState.RoundTrain)

    def _start_cooldown(self, now: int, seed: bytes) -> None:
        s = self.state
        healthy = [i for i, c in enumerate(s.clients) if c.state is ClientState.Healthy]
        s.checkpointers = sorted(shuffle_order(healthy, seed)[: s.settings.checkpointers])
        s.checkpointed = []
        self._change_state(now, RunState.Cooldown)

    # --- helpers ------------------------------------------------------------

    def _account(self, client_id: bytes) -> Account | None:
        for a in self.state.accounts:
            if a.id == client_id:
                return a
        return None

    def _healthy_count(self) -> int:
        return sum(1 for c in self.state.clients if c.state is ClientState.Healthy)

    def _leave(self, i: int, why: ClientState) -> None:
        """Mark client ``i`` unhealthy; it takes part in no round after the current one."""
        s = self.state
        c = s.clients[i]
        c.state = why
        in_epoch = s.run_state in (*IN_ROUND, RunState.Cooldown) and s.rounds
        c.until_height = s.rounds[-1].height + 1 if in_epoch else 0

    def _refresh_ready(self, now: int) -> None:
        """WaitingForMembers: note when enough clients are in (the extra wait counts from then)."""
        s = self.state
        if s.run_state is not RunState.WaitingForMembers:
            return
        count = self._healthy_count() + len(s.pending)
        if count < s.settings.init_min_clients:
            s.ready_since = None
        elif s.ready_since is None:
            s.ready_since = now

    def _trainers_with_batch(self, r: Round) -> set[int]:
        return {idx for idx, _, _ in batch_split(r)}

    def _settle(self, r: Round) -> None:
        """At the close of round ``r``: condemn the results verification found wrong, credit accepted
        work, learn each trainer's speed from when the witnesses held its result, and re-queue every
        batch no witness quorum saw or that was condemned."""
        s = self.state
        need = quorum(max(1, r.witnesses))
        judged = len(r.reports) >= need  # without a quorum nobody can be told slow from unlucky
        delays = delivery_ms([rep.arrivals_ms for rep in r.reports], len(r.trainers))
        position = {idx: p for p, idx in enumerate(r.trainers)}
        batches = batch_split(r)
        votes = participant_votes(r, [s.clients[idx].id for idx, _, _ in batches]) if judged else {}
        if judged:
            self._verify(r)
        for idx, start, end in batches:
            c = s.clients[idx]
            if position[idx] in r.condemned:
                if len(s.requeued) < MAX_REQUEUED:
                    s.requeued.append(Piece(start, end))
                continue
            if judged and votes[c.id] >= need:
                tokens = (end - start) * s.settings.seq_len
                c.tokens += tokens
                delay = delays[position[idx]]
                if delay is not None:
                    c.throughput = measured(c.throughput, tokens, delay)
                continue
            if judged:
                c.throughput = missed(c.throughput)
            if len(s.requeued) < MAX_REQUEUED:
                s.requeued.append(Piece(start, end))

    def _verify(self, r: Round) -> None:
        """Score every checked result of round ``r`` from its verifiers' reports, move each trainer's
        suspicion, and condemn (drop) the trainers whose suspicion reached the limit."""
        s = self.state
        if r.verifiers <= 0:
            return
        n = len(r.trainers)
        checks = verification.assignments(n, r.witnesses, r.verifiers)
        verifiers = [0] * n
        for positions in checks.values():
            for p in positions:
                verifiers[p] += 1
        given: dict[int, list[int]] = {p: [] for p in range(n)}
        for rep in r.reports:
            for p, given_score in zip(checks[r.trainers.index(rep.client)], rep.scores):
                given[p].append(given_score)
        for p, idx in enumerate(r.trainers):
            score = verification.round_score(given[p], verifiers[p])
            if score is None:
                continue
            c = s.clients[idx]
            c.suspicion = verification.suspicion_after(c.suspicion, score)
            if verification.condemned(c.suspicion):
                r.condemned.append(p)
                c.condemned_step = r.step
                c.tokens = 0
                if c.state is ClientState.Healthy:
                    self._leave(idx, ClientState.Dropped)

    def _record_stats(self, r: Round, now: int) -> None:
        s = self.state
        reps = r.reports
        n = len(reps)
        s.stats.append(RoundStats(
            epoch=s.epoch, step=r.step, ended_at=now, trainers=len(r.trainers), witnesses=r.witnesses, reports=n,
            loss=sum(x.loss for x in reps) / n if n else None,
            tokens_per_sec=sum(x.tokens_per_sec for x in reps) / n if n else None,
            bandwidth_bytes=sum(x.bandwidth_bytes for x in reps) // n if n else None, condemned=len(r.condemned)))
        del s.stats[:-NUM_STORED_STATS]
