"""Honest clients around one coordinator, played in a deterministic loop (no I/O, no torch).

:class:`Swarm` plays a whole run with a fake clock: each call to :meth:`Swarm.act`
sends what every online honest client would send given the state (warmup
witness, witness reports with Bloom filters of the results it "received",
health checks, checkpoints), then :meth:`Swarm.advance` lets time pass and
ticks. Used by the tests and the benchmark, and handy for exercising ledger
hosts. Results are simulated: a trainer's result commitment is a hash of its
step and batch; ``silent`` trainers produce none, ``offline`` clients send nothing.
Each client trains at a simulated speed (``speeds``, tokens per second; 1000 unless
set), and witnesses report when each result "arrived": ``overhead_ms`` (0 unless set) plus the
batch's tokens at that speed, as a real witness would measure it. Witnesses also send the
verification scores of the results they check: ``scores`` (client -> the wire score its results
get, :data:`HONEST_SCORE` unless set) stands for how its results compare with its data, and a
``liars`` witness reports the lowest score for every result it checks.

Every applied instruction is logged as a :class:`~psyche.coordinator.log.LogEntry`,
so :func:`psyche.coordinator.log.replay` rebuilds the same state elsewhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

from psyche.coordinator.bloom import BloomFilter
from psyche.coordinator.errors import CoordinatorError
from psyche.coordinator.instructions import (
    Checkpoint,
    HealthCheck,
    Instruction,
    Join,
    Tick,
    WarmupWitness,
    Witness,
    encode_instruction,
)
from psyche.coordinator.machine import Coordinator
from psyche.coordinator.queries import (
    accusable_trainers,
    verification_checks,
    current_round,
    is_checkpointer,
    is_warmup_witness,
    member,
    member_index,
    round_batches,
    round_witnesses,
)
from psyche.coordinator.log import LogEntry
from psyche.coordinator.state import ClientState, RunState
from psyche.coordinator.verification import NO_SCORE, Check

HONEST_SCORE = 500
"""The wire score an honest result gets from an honest verifier in the swarm (a z-score of 5)."""


def client_key(i: int) -> bytes:
    """A deterministic 32-byte stand-in for client ``i``'s public key."""
    return hashlib.sha256(b"psyche-sim-client" + i.to_bytes(4, "little")).digest()


def result_commitment(step: int, client: bytes, start: int, end: int) -> bytes:
    """The simulated result hash of a trainer's batch (what an honest peer would broadcast)."""
    return hashlib.sha256(b"result" + step.to_bytes(8, "little") + client + start.to_bytes(8, "little")
                          + end.to_bytes(8, "little")).digest()


class Swarm:
    """Honest clients ``0..n-1`` (keys from :meth:`key`) acting on one coordinator."""

    def __init__(self, coord: Coordinator, *, now: int = 0, seed: bytes = b"sim", host_key: bytes = bytes(32)):
        self.coord = coord
        self.now = now
        self.host_key = host_key
        self._seed = seed
        self._counter = 0
        self.offline: set[int] = set()
        """Clients that send nothing at all."""
        self.silent: set[int] = set()
        """Clients that act, but whose training results never reach anyone."""
        self.speeds: dict[int, float] = {}
        """Client -> simulated training speed in tokens per second (default 1000)."""
        self.overhead_ms = 0
        """Simulated per-round time every result takes besides training (apply, network)."""
        self.scores: dict[int, int] = {}
        """Client -> the verification score honest verifiers give its results (default HONEST_SCORE)."""
        self.liars: set[int] = set()
        """Witnesses that score every result they check as low as the wire allows."""
        self.scorer: Callable[[int, Check], int] | None = None
        """When set: the wire score witness ``i`` reports for a check (a harness that really verifies)."""
        self.log: list[LogEntry] = []
        self.refused: list[tuple[Instruction, bytes, CoordinatorError]] = []
        self.joined: set[int] = set()

    def key(self, i: int) -> bytes:
        """Client ``i``'s public key (:func:`client_key`; a host with real keys overrides this)."""
        return client_key(i)

    def next_seed(self) -> bytes:
        """The host's seed for the next instruction (deterministic here)."""
        self._counter += 1
        return hashlib.sha256(self._seed + self._counter.to_bytes(8, "little")).digest()

    def submit(self, instr: Instruction, signer: bytes) -> CoordinatorError | None:
        """Apply one instruction at the current time; log it if applied, remember it if refused."""
        seed = self.next_seed()
        err = self.coord.apply(instr, signer, self.now, seed)
        if err is None:
            self.log.append(LogEntry(encode_instruction(instr), signer, self.now, seed))
        else:
            self.refused.append((instr, signer, err))
        return err

    def join(self, clients: Iterable[int]) -> None:
        """Clients join (with a fake P2P address)."""
        for i in clients:
            self.joined.add(i)
            self.submit(Join(p2p_address=f"sim-ticket-{i}"), self.key(i))

    def tick(self) -> CoordinatorError | None:
        """The host ticks."""
        return self.submit(Tick(), self.host_key)

    def advance(self, seconds: int = 1) -> None:
        """Let ``seconds`` pass, then the host ticks."""
        self.now += seconds
        self.tick()

    def _online(self) -> list[int]:
        return sorted(i for i in self.joined if i not in self.offline)

    def act(self) -> None:
        """Every online client reacts once to the state as it is now (one phase per call)."""
        s = self.coord.state
        ids = {self.key(i): i for i in self._online()}
        phase = s.run_state
        if phase is RunState.Warmup:
            for cid in ids:
                if self.coord.state.run_state is RunState.Warmup and is_warmup_witness(self.coord.state, cid):
                    if member_index(s, cid) not in s.warmup_reports:
                        self.submit(WarmupWitness(), cid)
            return
        if phase in (RunState.RoundTrain, RunState.RoundWitness):
            self._witness(ids)
        if phase in (RunState.RoundTrain, RunState.RoundWitness, RunState.Cooldown):
            self._health_checks(ids)
        if phase is RunState.Cooldown:
            self._checkpoint(ids)

    def _witness(self, ids: dict[bytes, int]) -> None:
        s = self.coord.state
        r = current_round(s)
        if r is None:
            return
        reported = {s.clients[rep.client].id for rep in r.reports}
        witnesses = [w for w in round_witnesses(s) if w in ids and w not in reported]
        if not witnesses:
            return
        batches = {b.client: b for b in round_batches(s)}
        received = {c: result_commitment(r.step, c, b.start, b.end)
                    for c, b in batches.items() if c in ids and ids[c] not in self.silent}
        part = BloomFilter.for_items(received).to_bytes()
        bcast = BloomFilter.for_items(received.values()).to_bytes()
        merkle = hashlib.sha256(b"".join(sorted(received.values()))).digest()
        arrivals = []
        for i in r.trainers:
            b = batches.get(s.clients[i].id)
            arrivals.append(self.arrival_ms(ids[b.client], b.end - b.start) if b is not None and b.client in received
                            else 0)
        for w in witnesses:
            scores = [NO_SCORE if c.trainer not in received
                      else NO_SCORE + 1 if ids[w] in self.liars
                      else self.scorer(ids[w], c) if self.scorer is not None
                      else self.scores.get(ids[c.trainer], HONEST_SCORE)
                      for c in verification_checks(s, w)]
            self.submit(Witness(step=r.step, participant_bloom=part, broadcast_bloom=bcast, broadcast_merkle=merkle,
                                loss=2.0 + 1.0 / r.step, tokens_per_sec=1000.0, bandwidth_bytes=4096,
                                arrivals_ms=arrivals, scores=scores), w)

    def arrival_ms(self, i: int, samples: int) -> int:
        """When a witness holds client ``i``'s result for ``samples`` samples, in ms after the round began."""
        tokens = samples * self.coord.state.settings.seq_len
        return max(1, self.overhead_ms + round(tokens * 1000 / self.speeds.get(i, 1000.0)))

    def _health_checks(self, ids: dict[bytes, int]) -> None:
        s = self.coord.state
        accuser = next((cid for cid in ids if (m := member(s, cid)) is not None and m.state is ClientState.Healthy),
                       None)
        if accuser is None:
            return
        for step in [r.step for r in s.rounds]:
            accused = accusable_trainers(self.coord.state, step)
            if accused:
                self.submit(HealthCheck(step=step, accused=accused), accuser)

    def _checkpoint(self, ids: dict[bytes, int]) -> None:
        s = self.coord.state
        last = s.step - 1
        for cid in ids:
            if is_checkpointer(s, cid) and member_index(s, cid) not in s.checkpointed:
                digest = hashlib.sha256(b"ckpt" + last.to_bytes(8, "little")).digest()
                self.submit(Checkpoint(step=last, location=f"sim://ckpt/{last}", sha256=digest), cid)

    def run_until(self, done: Callable[[Coordinator], bool], *, max_seconds: int = 100_000, step_seconds: int = 1) -> None:
        """Alternate :meth:`act` and :meth:`advance` until ``done(coord)``; raises if time runs out."""
        end = self.now + max_seconds
        while not done(self.coord):
            if self.now >= end:
                raise TimeoutError(f"run did not reach the goal within {max_seconds}s "
                                   f"(run is {self.coord.state.run_state.value} at step {self.coord.state.step})")
            self.act()
            if done(self.coord):
                break
            self.advance(step_seconds)

