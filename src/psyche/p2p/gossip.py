"""Sans-io broadcast state: admission, de-duplication, forwarding and re-sends.

Design (documented choice): **full mesh with forwarding**. The origin pushes a
signed message to every member; every member that accepts a message for the
first time forwards it to every member that is neither the origin nor the peer
it came from. Every push is re-sent, with exponential backoff, until that peer
acknowledges it or the message's step leaves the window. So a message reaches
every member as long as the "can reach" graph among members is connected, even
when some pairs cannot talk directly.

Cost: O(N²) small frames per message (an envelope is ~200 bytes). For the tens
of trainers of a Psyche run that is a few percent of the result traffic; the
``fanout`` option caps forwarding at k random peers for larger runs, trading
the connectivity guarantee for a probabilistic one.

Nothing here does I/O or reads a clock: the asyncio node passes ``now`` in,
asks :meth:`Gossip.due` what to send, and reports acks with :meth:`Gossip.acked`.

Admission order for a received envelope (first failing check wins, and is the
counter it is dropped under): ``non_member`` (forwarding peer) → ``malformed``
(envelope) → ``unsupported_version`` → ``non_member`` (origin) → ``duplicate``
(already seen: normal in a flood, not an attack) → ``bad_signature`` →
``malformed`` (body) → ``wrong_run`` → ``replay`` (step outside the window).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import msgspec

from psyche.p2p.wire import WIRE_VERSION, Message, SignedMessage, decode_envelope

DROP_REASONS = (
    "non_member",
    "malformed",
    "unsupported_version",
    "bad_signature",
    "wrong_run",
    "replay",
    "duplicate",
)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A verified, new message to hand to the caller."""

    sender: bytes
    """Origin's public key (the signer), not the forwarding peer."""
    message: Message
    envelope: SignedMessage


@dataclass(frozen=True, slots=True)
class Verdict:
    """What became of one received envelope."""

    delivery: Delivery | None
    """Set when the message was accepted and is new."""
    dropped: str | None
    """The counter it was dropped under (one of :data:`DROP_REASONS`), or None."""


@dataclass(slots=True)
class _Outgoing:
    envelope: bytes
    step: int | None
    pending: set[bytes]
    next_try: dict[bytes, float] = field(default_factory=dict)
    tries: Counter = field(default_factory=Counter)


class Gossip:
    """Broadcast state of one node. Not thread-safe; one asyncio loop owns it.

    ``step_window=(back, ahead)``: a message for step ``s`` is accepted while the
    node's step ``t`` satisfies ``t - back <= s <= t + ahead``; until
    :meth:`set_step` is first called, any step is accepted.
    """

    def __init__(
        self,
        *,
        local_id: bytes,
        run_id: str,
        step_window: tuple[int, int] = (2, 2),
        resend_interval: float = 0.5,
        max_resend_interval: float = 5.0,
        fanout: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.local_id = local_id
        self.run_id = run_id
        self.step: int | None = None
        self.step_window = step_window
        self.resend_interval = resend_interval
        self.max_resend_interval = max_resend_interval
        self.fanout = fanout
        self.members: set[bytes] = set()
        self.counters: Counter[str] = Counter()
        self._rng = rng or random.Random()
        self._seen: dict[bytes, int | None] = {}  # message id -> step (for pruning)
        self._out: dict[bytes, _Outgoing] = {}

    # --- caller state -----------------------------------------------------

    def set_members(self, members: set[bytes], *, now: float) -> None:
        """Replace the member set. Pending pushes to departed peers are dropped; new members
        are owed every message still in the window (they are sent on the next :meth:`due`)."""
        added = members - self.members - {self.local_id}
        self.members = set(members)
        for out in self._out.values():
            out.pending &= self.members
            for peer in added:
                out.pending.add(peer)
                out.next_try[peer] = now

    def set_step(self, step: int) -> None:
        """Move the step window; forget ids and stop re-sending messages that fell out of it."""
        self.step = step
        for mid in [m for m, s in self._seen.items() if s is not None and not self._in_window(s)]:
            del self._seen[mid]
        for mid in [m for m, o in self._out.items() if o.step is not None and not self._in_window(o.step)]:
            del self._out[mid]

    def _in_window(self, step: int) -> bool:
        if self.step is None:
            return True
        back, ahead = self.step_window
        return self.step - back <= step <= self.step + ahead

    # --- sending ----------------------------------------------------------

    def originate(self, envelope: SignedMessage, *, step: int, now: float) -> bytes:
        """Queue our own signed message for every other member; returns its message id."""
        mid = envelope.message_id
        self._seen[mid] = step
        self._queue(mid, envelope.encode(), step, self.members - {self.local_id}, now)
        return mid

    def _queue(self, mid: bytes, raw: bytes, step: int | None, targets: set[bytes], now: float) -> None:
        if self.fanout is not None and len(targets) > self.fanout:
            targets = set(self._rng.sample(sorted(targets), self.fanout))
        out = self._out.setdefault(mid, _Outgoing(raw, step, set()))
        for peer in targets:
            if peer not in out.pending:
                out.pending.add(peer)
                out.next_try[peer] = now

    def due(self, now: float) -> dict[bytes, list[tuple[bytes, bytes]]]:
        """Pushes to make now: ``{peer: [(message_id, envelope_bytes), ...]}``.

        Each returned item is scheduled for a re-send after a backoff; a later
        :meth:`acked` cancels it.
        """
        result: dict[bytes, list[tuple[bytes, bytes]]] = {}
        for mid, out in self._out.items():
            for peer in out.pending:
                if out.next_try.get(peer, now) <= now:
                    out.tries[peer] += 1
                    delay = min(self.resend_interval * 2 ** (out.tries[peer] - 1), self.max_resend_interval)
                    out.next_try[peer] = now + delay
                    result.setdefault(peer, []).append((mid, out.envelope))
        return result

    def next_deadline(self) -> float | None:
        """Earliest time at which :meth:`due` will return something, or None if nothing is pending."""
        times = [out.next_try.get(p, 0.0) for out in self._out.values() for p in out.pending]
        return min(times) if times else None

    def acked(self, peer: bytes, message_ids: list[bytes]) -> None:
        """``peer`` confirmed it processed these messages: stop re-sending them to it."""
        for mid in message_ids:
            out = self._out.get(mid)
            if out is not None:
                out.pending.discard(peer)
                if not out.pending:
                    # keep the entry (so new members are still owed it) but drop bookkeeping
                    out.next_try.clear()

    def pending_count(self) -> int:
        """Number of (message, peer) pushes not yet acknowledged."""
        return sum(len(o.pending) for o in self._out.values())

    # --- receiving ----------------------------------------------------------

    def receive(self, raw: bytes, *, from_peer: bytes, now: float) -> Verdict:
        """Admit or drop one envelope pushed by ``from_peer``; counts every drop.

        An accepted new message is queued for forwarding and returned as a
        :class:`Delivery`. Never raises on bad input.
        """
        if from_peer not in self.members:
            return self._drop("non_member")
        try:
            env = decode_envelope(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return self._drop("malformed")
        if env.v != WIRE_VERSION:
            return self._drop("unsupported_version")
        if env.sender not in self.members and env.sender != self.local_id:
            return self._drop("non_member")
        mid = env.message_id
        if mid in self._seen:
            # the forwarder evidently has it: no need to push it back there
            out = self._out.get(mid)
            if out is not None:
                out.pending.discard(from_peer)
            return self._drop("duplicate")
        if not env.verify():
            return self._drop("bad_signature")
        try:
            msg = env.message()
        except (msgspec.DecodeError, msgspec.ValidationError):
            return self._drop("malformed")
        if msg.run_id != self.run_id:
            return self._drop("wrong_run")
        if not self._in_window(msg.step):
            return self._drop("replay")
        self._seen[mid] = msg.step
        self._queue(mid, raw, msg.step, self.members - {self.local_id, env.sender, from_peer}, now)
        self.counters["accepted"] += 1
        return Verdict(Delivery(env.sender, msg, env), None)

    def _drop(self, reason: str) -> Verdict:
        self.counters[reason] += 1
        return Verdict(None, reason)
