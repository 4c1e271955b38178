"""Property tests: random instruction sequences (honest, dishonest, malformed) against the invariants.

Each example draws settings and a sequence of actions: time passing, honest
clients reacting to the state, joins/withdrawals, clients going offline or
silent, and hand-made instructions from members, strangers and the authority
with plausible and implausible fields. After every action the invariants hold:

- a refused instruction leaves the state bytes unchanged;
- instructions other than Tick/Join from a stranger are always refused;
- step, epoch and the next free sample index never go back;
- no sample index is handed to two rounds, and each step has one round;
- every list in the state stays within its bound;
- replaying the log of applied instructions gives the same digest.
"""

from __future__ import annotations

import hashlib
import os

from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import event, given, settings
from hypothesis import strategies as st

from psyche.coordinator import (
    MAX_ACCOUNTS,
    MAX_CLIENTS,
    Authorize,
    BloomFilter,
    Checkpoint,
    ClientState,
    Coordinator,
    CoordinatorSettings,
    Delegate,
    HealthCheck,
    Join,
    Pause,
    Resume,
    Revoke,
    RunState,
    Tick,
    Round,
    WarmupWitness,
    Withdraw,
    Witness,
    assignment_for,
    batch_split,
    current_round,
    decode_instruction,
    quorum,
    round_batches,
    round_closed,
    witnessed_trainers,
)
from psyche.coordinator import access
from psyche.coordinator.shares import MAX_REQUEUED
from psyche.coordinator.log import replay
from psyche.testing.coordinator_swarm import Swarm, client_key, result_commitment
from psyche.coordinator.state import NUM_STORED_CHECKPOINTS, NUM_STORED_ROUNDS, NUM_STORED_STATS

AUTH = b"\xaa" * 32
CLIENTS = range(6)
STRANGERS = [client_key(i) for i in (40, 41)]
EXAMPLES = 600 if os.environ.get("PSYCHE_FULL") and not os.environ.get("CI") else 150


@st.composite
def coordinator_settings(draw) -> CoordinatorSettings:
    init_min = draw(st.integers(1, 4))
    min_clients = draw(st.integers(1, init_min))
    start = draw(st.integers(1, 8))
    return CoordinatorSettings(
        warmup_time=draw(st.integers(1, 8)), cooldown_time=draw(st.integers(1, 5)),
        max_round_train_time=draw(st.integers(1, 8)), round_witness_time=draw(st.integers(1, 4)),
        epoch_time=draw(st.integers(10, 40)), total_steps=draw(st.integers(1, 12)),
        init_min_clients=init_min, min_clients=min_clients, witness_nodes=draw(st.integers(0, min_clients)),
        global_batch_size_start=start, global_batch_size_end=draw(st.integers(start, 12)),
        global_batch_size_warmup_tokens=draw(st.integers(0, 200)),
        waiting_for_members_extra_time=draw(st.integers(0, 3)), cold_start_warmup_steps=draw(st.integers(0, 3)),
        epoch_reward=draw(st.integers(0, 1000)), checkpointers=draw(st.integers(0, min_clients)),
        seq_len=draw(st.integers(1, 4)), access=draw(st.sampled_from(["open", "open", "gated"])))


who = st.integers(0, 5)
delta = st.integers(-2, 1)
play = st.tuples(st.just("play"), st.integers(1, 12))  # honest clients act, a second passes; n times
actions = st.one_of(
    play, play, play, play, play, play,
    st.tuples(st.just("advance"), st.integers(1, 12)),
    st.tuples(st.just("act")),
    st.tuples(st.just("join"), who),
    st.tuples(st.just("withdraw"), who),
    st.tuples(st.just("offline"), who),
    st.tuples(st.just("online"), who),
    st.tuples(st.just("silent"), who),
    st.tuples(st.just("silent"), who),
    st.tuples(st.just("pause"), st.booleans()),
    st.tuples(st.just("resume"), st.booleans()),
    st.tuples(st.just("warmup"), who),
    st.tuples(st.just("witness"), who, delta, st.booleans()),
    st.tuples(st.just("health"), who, who, delta),
    st.tuples(st.just("checkpoint"), who, delta),
    st.tuples(st.just("stranger"), st.integers(0, 10), st.integers(0, 1)),
    st.tuples(st.just("authorize"), who, st.booleans(), st.integers(-1, 20)),
    st.tuples(st.just("delegate"), who, st.integers(-1, 20)),
    st.tuples(st.just("revoke"), who, st.booleans()),
    st.tuples(st.just("tick")),
)


def witness_for(coord: Coordinator, step: int, honest: bool) -> Witness:
    s = coord.state
    r = current_round(s)
    batches = round_batches(s) if r is not None else []
    ids = [b.client for b in batches] if honest else []
    commits = [result_commitment(step, b.client, b.start, b.end) for b in batches] if honest else []
    return Witness(step=step, participant_bloom=BloomFilter.for_items(ids).to_bytes(),
                   broadcast_bloom=BloomFilter.for_items(commits).to_bytes(), broadcast_merkle=bytes(32), loss=1.5,
                   tokens_per_sec=10.0, bandwidth_bytes=100)


def stranger_instruction(kind: int, coord: Coordinator):
    s = coord.state
    step = s.step
    return [
        WarmupWitness(), witness_for(coord, step, True), HealthCheck(step=max(0, step - 1), accused=[client_key(0)]),
        Checkpoint(step=max(0, step - 1), location="x", sha256=bytes(32)), Pause(), Resume(), Withdraw(),
        witness_for(coord, step, False), Authorize(key=client_key(0)), Delegate(key=client_key(1)),
        Revoke(key=client_key(0)),
    ][kind]


def term(now: int, offset: int) -> int:
    """A grant's ``expires_at`` ``offset`` seconds from ``now`` (-1: no end)."""
    return 0 if offset < 0 else now + offset


class Tracker:
    """Checks the invariants after every action."""

    def __init__(self, coord: Coordinator):
        self.step = coord.state.step
        self.epoch = coord.state.epoch
        self.next_index = coord.state.next_data_index
        self.rounds: dict[int, tuple[int, int]] = {}
        self.queued: set[tuple[int, int]] = set()
        """Every piece ever seen waiting in the re-queue."""
        self.retrained: set[tuple[int, int]] = set()
        self.settled: set[int] = set()

    def check(self, coord: Coordinator) -> None:
        s = coord.state
        assert s.step >= self.step and s.epoch >= self.epoch and s.next_data_index >= self.next_index
        self.step, self.epoch, self.next_index = s.step, s.epoch, s.next_data_index
        self.queued |= {(p.start, p.end) for p in s.requeued}
        taken_now = {(t.start, t.end) for r in s.rounds for t in r.taken}
        for r in s.rounds:
            if round_closed(s, r.step) and r.step not in self.settled:
                # No sample skipped: a closed round's batch that no witness quorum accepted waits
                # in the re-queue (or a later round already took it).
                self.settled.add(r.step)
                accepted = set(witnessed_trainers(s, r.step)) if len(r.reports) >= quorum(max(1, r.witnesses)) \
                    else set()
                waiting = {(p.start, p.end) for p in s.requeued} | taken_now | self.retrained
                for b in round_batches(s, r.step):
                    if b.client not in accepted and len(s.requeued) < MAX_REQUEUED:
                        assert (b.start, b.end) in waiting, f"step {r.step}: batch of a missed trainer was lost"
                        self.queued.add((b.start, b.end))
                        self.retrained.discard((b.start, b.end))  # missed again: it may be taken again
        for r in s.rounds:
            pieces = [(t.start, t.end) for t in r.taken]
            fresh = (r.data_index, r.data_index + r.batch_size - sum(e - b for b, e in pieces))
            if r.step in self.rounds:
                assert self.rounds[r.step] == fresh, f"step {r.step} got a second round"
            else:
                # A new round takes fresh indices no earlier round had, and re-trains only pieces
                # that were waiting in the re-queue, each once per miss.
                assert all(fresh[0] >= end for _, end in self.rounds.values())
                assert all(p in self.queued and p not in self.retrained for p in pieces)
                assert not {(p.start, p.end) for p in s.requeued} & set(pieces)
                self.retrained |= set(pieces)
                self.rounds[r.step] = fresh
            assert fresh[1] <= s.next_data_index
            # Shares cover the round's batch exactly: the fresh samples and the pieces, no overlap.
            covered = sorted((start, end) for _, start, end in batch_split(r))
            assert sum(e - b for b, e in covered) == r.batch_size
            assert all(a[1] <= b[0] for a, b in zip(covered, covered[1:]))
            assert sum(e - b for b, e in covered if fresh[0] <= b and e <= fresh[1]) == fresh[1] - fresh[0]
        for r in s.rounds:
            # Every assignment the state gives out is the batch-split rule's output for the round.
            rule = {s.clients[i].id: (start, end) for i, start, end in batch_split(r)}
            assert {b.client: (b.start, b.end) for b in round_batches(s, r.step)} == rule
            assert all(assignment_for(s, s.clients[i].id, step=r.step) == rule.get(s.clients[i].id)
                       for i in r.trainers)
        assert len(s.rounds) <= NUM_STORED_ROUNDS and len(s.stats) <= NUM_STORED_STATS
        assert len(s.checkpoints) <= NUM_STORED_CHECKPOINTS and len(s.clients) <= MAX_CLIENTS
        assert len(s.pending) <= access.MAX_PENDING and len(s.accounts) <= MAX_ACCOUNTS
        assert len(s.grants) <= access.MAX_GRANTS and len(s.authorizers) <= access.MAX_AUTHORIZERS
        if s.settings.access == "open":
            assert s.grants == [] and s.authorizers == []
        ids = [c.id for c in s.clients]
        assert len(ids) == len(set(ids)) and len(s.pending) == len(set(s.pending))
        healthy = {c.id for c in s.clients if c.state is ClientState.Healthy}
        assert not healthy & set(s.pending)
        if s.run_state is RunState.Finished:
            assert s.step > s.settings.total_steps
        assert s.step <= s.settings.total_steps + 1


class CheckedSwarm(Swarm):
    """A swarm whose every submission (honest or not) checks that a refusal changed nothing."""

    def submit(self, instr, signer):
        before = self.coord.to_bytes()
        err = super().submit(instr, signer)
        if err is not None:
            assert self.coord.to_bytes() == before, f"{type(err).__name__} changed the state"
        return err


@given(cfg=coordinator_settings(), initial=st.sampled_from([6, 6, 6, 3, 1, 0]), script=st.lists(actions, min_size=5, max_size=70))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HypothesisHealthCheck.too_slow])
def test_random_instruction_sequences_keep_the_invariants(cfg, initial, script):
    coord = Coordinator.new("prop", cfg, authority=AUTH, now=1000)
    swarm = CheckedSwarm(coord, now=1000)
    if cfg.access == "gated":
        for i in range(initial):
            swarm.submit(Authorize(key=client_key(i)), AUTH)
    swarm.join(range(initial))
    tracker = Tracker(coord)
    for action in script:
        kind, *args = action
        s = coord.state
        match kind:
            case "advance":
                swarm.advance(args[0])
            case "tick":
                swarm.submit(Tick(), client_key(args[0]) if args else bytes(32))
            case "act":
                swarm.act()
            case "play":
                for _ in range(args[0]):
                    swarm.act()
                    swarm.advance(1)
                    tracker.check(coord)
            case "join":
                swarm.joined.add(args[0])
                swarm.submit(Join(p2p_address=f"t{args[0]}"), client_key(args[0]))
            case "withdraw":
                swarm.submit(Withdraw(), client_key(args[0]))
            case "offline":
                swarm.offline.add(args[0])
            case "online":
                swarm.offline.discard(args[0])
            case "silent":
                swarm.silent.add(args[0])
            case "pause":
                swarm.submit(Pause(), AUTH if args[0] else client_key(0))
            case "resume":
                swarm.submit(Resume(), AUTH if args[0] else client_key(1))
            case "warmup":
                swarm.submit(WarmupWitness(), client_key(args[0]))
            case "witness":
                i, d, honest = args
                swarm.submit(witness_for(coord, max(0, s.step + d), honest), client_key(i))
            case "health":
                i, j, d = args
                swarm.submit(HealthCheck(step=max(0, s.step - 1 + d), accused=[client_key(j)]), client_key(i))
            case "checkpoint":
                i, d = args
                swarm.submit(Checkpoint(step=max(0, s.step - 1 + d), location="loc",
                                                 sha256=hashlib.sha256(b"c").digest()), client_key(i))
            case "authorize":
                i, by_authority, offset = args
                swarm.submit(Authorize(key=client_key(i), expires_at=term(swarm.now, offset)),
                             AUTH if by_authority else client_key((i + 1) % 6))
            case "delegate":
                i, offset = args
                swarm.submit(Delegate(key=client_key(i), expires_at=term(swarm.now, offset)), AUTH)
            case "revoke":
                i, by_authority = args
                swarm.submit(Revoke(key=client_key(i)), AUTH if by_authority else client_key((i + 1) % 6))
            case "stranger":
                k, who_ = args
                before = coord.to_bytes()
                err = swarm.submit(stranger_instruction(k, coord), STRANGERS[who_])
                assert err is not None, "a stranger changed the state"
                assert coord.to_bytes() == before
        tracker.check(coord)
    for name in sorted({type(decode_instruction(body)).__name__ for body, *_ in swarm.log}):
        event(f"applied {name}")
    event(f"reached step {min(coord.state.step, 4)}+ / epoch {min(coord.state.epoch, 2)}+")
    event(f"ended {coord.state.run_state.value}")
    # Every refusal in the whole run was a named error with a message.
    assert all(err.message for _, _, err in swarm.refused)
    # Replay determinism: the log alone rebuilds the same state, and bytes round-trip.
    other = Coordinator.new("prop", cfg, authority=AUTH, now=1000)
    assert all(e is None for e in replay(other, swarm.log))
    assert other.digest() == coord.digest()
    assert Coordinator.from_bytes(coord.to_bytes()).digest() == coord.digest()


@given(cfg=coordinator_settings(), script=st.lists(actions, min_size=5, max_size=40))
@settings(max_examples=max(10, EXAMPLES // 3), deadline=None, suppress_health_check=[HypothesisHealthCheck.too_slow])
def test_refusals_never_change_state_even_mid_run(cfg, script):
    """Drive a run honestly, then fire every hand-made action at each point: refused ones change nothing."""
    coord = Coordinator.new("prop", cfg, authority=AUTH, now=0)
    swarm = Swarm(coord)
    if cfg.access == "gated":
        for i in range(4):
            swarm.submit(Authorize(key=client_key(i)), AUTH)
    swarm.join(range(4))
    for action in script:
        swarm.act()
        swarm.advance(1)
        probe = coord.copy()
        kind, *args = action
        instr, signer = {
            "warmup": lambda: (WarmupWitness(), client_key(args[0])),
            "witness": lambda: (witness_for(probe, max(0, probe.state.step + args[1]), args[2]), client_key(args[0])),
            "health": lambda: (HealthCheck(step=max(0, probe.state.step - 1 + args[2]), accused=[client_key(args[1])]),
                               client_key(args[0])),
            "checkpoint": lambda: (Checkpoint(step=max(0, probe.state.step - 1 + args[1]), location="l",
                                              sha256=bytes(32)), client_key(args[0])),
            "pause": lambda: (Pause(), AUTH if args[0] else client_key(2)),
            "resume": lambda: (Resume(), AUTH if args[0] else client_key(2)),
            "withdraw": lambda: (Withdraw(), client_key(args[0])),
            "authorize": lambda: (Authorize(key=client_key(args[0]), expires_at=term(swarm.now, args[2])),
                                  AUTH if args[1] else client_key(2)),
            "revoke": lambda: (Revoke(key=client_key(args[0])), AUTH if args[1] else client_key(2)),
        }.get(kind, lambda: (Tick(), bytes(32)))()
        before = probe.to_bytes()
        err = probe.apply(instr, signer, swarm.now, bytes(32))
        if err is not None:
            assert probe.to_bytes() == before


@given(data_index=st.integers(0, 10**6), batch_size=st.integers(0, 40),
       trainers=st.lists(st.integers(0, MAX_CLIENTS - 1), max_size=20, unique=True))
def test_batch_split_tiles_the_batch_evenly_in_shuffle_order(data_index, batch_size, trainers):
    r = Round(height=0, step=1, data_index=data_index, batch_size=batch_size, random_seed=bytes(32), started_at=0,
              trainers=trainers, witnesses=0)
    split = batch_split(r)
    # Contiguous from data_index, covering the batch exactly once (nothing when no one trains).
    ends = [data_index] + [end for _, _, end in split]
    assert [start for _, start, _ in split] == ends[:-1]
    assert ends[-1] == data_index + (batch_size if trainers else 0)
    # The first trainers in shuffle order, each with a share no more than one sample above another's.
    assert [i for i, _, _ in split] == trainers[: min(len(trainers), batch_size)]
    sizes = [end - start for _, start, end in split]
    assert all(size > 0 for size in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)
    assert sizes == sorted(sizes, reverse=True)


@given(n=st.integers(2, 9), witness_nodes=st.integers(0, 2), silent=st.sets(st.integers(0, 8), max_size=3),
       batch=st.integers(1, 20))
@settings(max_examples=max(10, EXAMPLES // 3), deadline=None)
def test_health_checks_accept_exactly_the_unseen_trainers(n, witness_nodes, silent, batch):
    cfg = CoordinatorSettings(init_min_clients=n, min_clients=2, witness_nodes=witness_nodes, epoch_time=500,
                              global_batch_size_start=batch, global_batch_size_end=batch, total_steps=10)
    coord = Coordinator.new("hc", cfg, authority=AUTH, now=0)
    swarm = CheckedSwarm(coord)
    swarm.join(range(n))
    swarm.silent |= {i for i in silent if i < n}
    swarm.run_until(lambda c: c.state.run_state is RunState.RoundTrain)
    with_batch = {b.client for b in round_batches(coord.state)}
    # Close round 1 without any client acting on it after the witness reports.
    swarm.act()
    while coord.state.step == 1:
        swarm.advance(1)
    if coord.state.run_state is not RunState.RoundTrain and coord.state.run_state is not RunState.Cooldown:
        return
    accuser = next(c.id for c in coord.state.clients if c.state is ClientState.Healthy)
    for j in range(n):
        probe = coord.copy()
        before = probe.to_bytes()
        err = probe.apply(HealthCheck(step=1, accused=[client_key(j)]), accuser, swarm.now, bytes(32))
        if err is None:
            assert j in silent and client_key(j) in with_batch
            assert probe.state.clients[[c.id for c in probe.state.clients].index(client_key(j))].state \
                is ClientState.Dropped
        else:
            assert probe.to_bytes() == before
            if j not in silent:
                assert type(err).__name__ == "FalseAccusation"
