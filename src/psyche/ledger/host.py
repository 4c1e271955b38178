"""Hosting one run's coordinator: the clock, the seed, persistence and change notices.

The coordinator itself is pure; a host supplies what it lacks. :class:`RunHost`
is shared by the embedded ledger (in-process, no database) and the coordinator
server (SQLite): it applies an instruction with the host's ``now`` and a fresh
seed, writes the applied instruction and the new state in one transaction when
a store is attached, and wakes everyone waiting for a change.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import zlib
from collections.abc import Callable

from psyche.coordinator import (
    Coordinator,
    CoordinatorError,
    Instruction,
    LogEntry,
    Tick,
    apply_entry,
    encode_instruction,
)
from psyche.coordinator.state import RunState
from psyche.ledger.store import Store


STATE_COMPRESSION = 1
"""zlib level of :meth:`RunHost.compressed_state`: level 1 already takes a state of 256 members
from 206 KB to 17 KB in half a millisecond; higher levels gain 2 % for several times the time."""


def derive_seed(secret: bytes, run_id: str, seq: int) -> bytes:
    """The seed handed to the coordinator for log entry ``seq``.

    Derived from a host secret so participants cannot predict committees in
    advance; recorded in the log so a replay needs no secret.
    """
    return hashlib.sha256(b"psyche-seed" + secret + run_id.encode() + seq.to_bytes(8, "little")).digest()


def replay(genesis: bytes, log: list[tuple[int, bytes, bytes, int, bytes]]) -> Coordinator:
    """Rebuild a run's state from its initial state and its stored log of (seq, signer, body, now, seed).

    Anyone holding the log computes the same state (and digest) as the host did;
    an entry the coordinator refuses means the log is not this host's, and raises ``ValueError``.
    """
    coord = Coordinator.from_bytes(genesis)
    for seq, signer, body, now, seed in log:
        err = apply_entry(coord, LogEntry(body, signer, now, seed)).error
        if err is not None:
            raise ValueError(f"log entry {seq} was refused on replay: {err.name}: {err}")
    return coord


class RunHost:
    """One run's coordinator and its log, as held by a host process.

    Not thread-safe: call from one event loop. ``listeners`` are called with the
    coordinator after every change (the server pushes to WebSockets from there).
    """

    def __init__(
        self,
        coordinator: Coordinator,
        *,
        store: Store | None = None,
        seq: int = 0,
        clock: Callable[[], float] = time.time,
        secret: bytes | None = None,
        host_key: bytes = bytes(32),
    ):
        self.coordinator = coordinator
        self.store = store
        self.seq = seq
        self.clock = clock
        self.secret = secret if secret is not None else os.urandom(32)
        self.host_key = host_key
        self.listeners: list[Callable[[Coordinator], None]] = []
        self._changed = asyncio.Event()
        self.refused: dict[str, int] = {}
        self._encoded: tuple[bytes, str] | None = None
        """The state's bytes and digest as of the last change (None: not computed yet)."""
        self._compressed: tuple[int, bytes] | None = None
        """:meth:`compressed_state` and the seq it is of."""

    @property
    def run_id(self) -> str:
        return self.coordinator.state.run_id

    def now(self) -> int:
        """The host clock in whole seconds, as the coordinator takes it."""
        return int(self.clock())

    def apply(self, instruction: Instruction, signer: bytes, *, nonce: int | None = None) -> CoordinatorError | None:
        """Apply one authenticated instruction; persist and notify if the state changed.

        Returns the coordinator's refusal (state untouched) or ``None``.
        """
        now = self.now()
        seed = derive_seed(self.secret, self.run_id, self.seq + 1)
        before = self._state()[1]
        round_before = self._round_step()
        err = self.coordinator.apply(instruction, signer, now, seed)
        if err is not None:
            name = type(err).__name__
            self.refused[name] = self.refused.get(name, 0) + 1
            if self.store is not None and nonce is not None:
                self.store.record_nonce(self.run_id, signer, nonce)
            return err
        state = self.coordinator.to_bytes()
        digest = hashlib.sha256(state).hexdigest()
        self._encoded = (state, digest)
        if digest == before:
            # A tick that moved nothing (the common case) is not worth a log entry.
            if self.store is not None and nonce is not None:
                self.store.record_nonce(self.run_id, signer, nonce)
            return None
        self.seq += 1
        if self.store is not None:
            round_after = self._round_step()
            changed = round_after != round_before
            self.store.append(
                self.run_id,
                self.seq,
                signer=signer,
                body=encode_instruction(instruction),
                now=now,
                seed=seed,
                state=state,
                digest=digest,
                nonce=nonce,
                # A round's span, for tokens/s: from entering its RoundTrain to leaving its RoundWitness.
                step_started=(round_after, self.clock()) if changed and round_after is not None else None,
                step_ended=(round_before, self.clock()) if changed and round_before is not None else None,
            )
        for listener in list(self.listeners):
            listener(self.coordinator)
        self._changed.set()
        self._changed = asyncio.Event()
        return None

    def _state(self) -> tuple[bytes, str]:
        """The state's canonical bytes and digest, encoded once per change.

        The coordinator's state changes only through :meth:`apply`: a change made to it
        directly is not seen here until the next applied instruction."""
        if self._encoded is None:
            data = self.coordinator.to_bytes()
            self._encoded = (data, hashlib.sha256(data).hexdigest())
        return self._encoded

    def state_bytes(self) -> bytes:
        """The coordinator state's canonical bytes (:meth:`Coordinator.to_bytes`), shared by every reader."""
        return self._state()[0]

    def digest(self) -> str:
        """The state's digest (:meth:`Coordinator.digest`), without encoding it again."""
        return self._state()[1]

    def compressed_state(self) -> bytes:
        """:meth:`state_bytes`, zlib-compressed once per change for every feed that takes it so
        (a state of 256 members shrinks about twelvefold: mostly Bloom filters and round lists)."""
        if self._compressed is None or self._compressed[0] != self.seq:
            self._compressed = (self.seq, zlib.compress(self.state_bytes(), STATE_COMPRESSION))
        return self._compressed[1]

    def _round_step(self) -> int | None:
        """The step whose round (train, then witness) is under way (None outside rounds)."""
        s = self.coordinator.state
        return s.step if s.run_state in (RunState.RoundTrain, RunState.RoundWitness) else None

    def tick(self) -> bool:
        """Let time pass for the coordinator; True if the state changed."""
        if self.coordinator.state.run_state in (RunState.Finished, RunState.Paused):
            return False  # nothing times out there (the coordinator would refuse the tick as Halted)
        seq = self.seq
        self.apply(Tick(), self.host_key)
        return self.seq != seq

    async def wait_changed(self, since: int, timeout: float | None = None) -> bool:
        """Wait until the state moved past ``since`` (the :attr:`seq` the caller last saw): True at
        once if it already has, else at the next change; False after ``timeout`` seconds.

        Taking the seen ``seq`` (not "the next change") matters: a change applied after the
        caller read the state but before this wait began (while it sent that state, or before
        its waiter task started) would otherwise go unseen until a later change.
        """
        if self.seq != since:
            return True
        event = self._changed
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False

    async def run_clock(self, interval: float = 0.25) -> None:
        """Tick forever every ``interval`` seconds (the host owns the clock)."""
        while True:
            self.tick()
            await asyncio.sleep(interval)
