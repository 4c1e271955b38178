"""The client runtime: follow the coordinator and do what each phase asks.

The runtime keeps no rules of its own: it reads the coordinator state (through
a :class:`~psyche.ledger.base.Ledger`) and asks :mod:`psyche.coordinator.queries`
who trains what, who witnesses, what the witnesses agreed on and whom to accuse.
Per phase:

- WaitingForMembers: make sure we are joined (again, after being dropped).
- Warmup: get the model (fresh init in epoch 0, from peers later, or from the
  last checkpoint), report readiness if selected as a warmup witness.
- RoundTrain: train our assigned samples, publish the compressed result as a
  blob with a signed commitment; meanwhile fetch and verify everyone else's.
  Witnesses report bloom filters of what they verified.
- After a round closes: apply the results a witness quorum agreed on (one step
  late in overlapped mode, so training never waits for the network), and
  accuse trainers no quorum saw.
- Cooldown: apply what is left; selected checkpointers save and report.
- Finished: exit 0. Dropped: say so, rejoin for the next epoch.

:meth:`ClientRuntime.act` reconciles what we have done with the current state,
so it is safe to call on every state change, in any order, any number of times.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psyche.client import timing
from psyche.client.ports import Node, NodeIdentity, Trainer, TrainerFailure
from psyche.coordinator import Checkpoint, Coordinator, HealthCheck, Instruction, Join, WarmupWitness, Withdraw, Witness
from psyche.coordinator import queries as q
from psyche.coordinator import access
from psyche.coordinator.bloom import BloomFilter
from psyche.coordinator.instructions import MAX_ARRIVAL_MS
from psyche.coordinator.verification import Check, draw_sequences, wire_scores
from psyche.coordinator.state import ClientState, CoordinatorState, RunState
from psyche.ledger.base import InstructionRefused, Ledger, LedgerUnavailable, MetricsReport
from psyche.p2p import BlobUnavailable, ModelMismatch, ModelUnavailable, ResultCommitment

if TYPE_CHECKING:
    from psyche.client.trainer import TrainOutput
    from psyche.distro.verify import Reference

log = logging.getLogger("psyche.client")

EPOCH_STATES = (RunState.Warmup, RunState.RoundTrain, RunState.RoundWitness, RunState.Cooldown)
"""Run states inside an epoch (its members fixed)."""

OUTBOX_LIMIT = 256
"""Metrics reports kept while the coordinator is unreachable; the oldest go first beyond this."""

MODEL_RETRY_SECONDS = 1.0
"""Wait before trying again to get the model when no source delivered it."""

BLOB_TIMEOUT = 60.0
"""Seconds a peer's result is sought (from every provider in turn) before it counts as unavailable."""


def merkle_root(leaves: list[bytes]) -> bytes:
    """SHA-256 Merkle root of ``leaves`` in sorted order (32 zero bytes for none)."""
    level = [hashlib.sha256(b"\x00" + x).digest() for x in sorted(leaves)]
    if not level:
        return bytes(32)
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0]


@dataclass
class StepBook:
    """What this node knows about one step's results."""

    commitments: dict[bytes, ResultCommitment] = field(default_factory=dict)
    """trainer id -> the commitment it broadcast."""
    verified: dict[bytes, bytes] = field(default_factory=dict)
    """trainer id -> blob hash, for results downloaded and checked."""
    bad: set[bytes] = field(default_factory=set)
    fetching: set[bytes] = field(default_factory=set)
    bytes_received: int = 0
    began: float | None = None
    """Monotonic time at which this node first saw the step's round training."""
    arrived: dict[bytes, float] = field(default_factory=dict)
    """trainer id -> monotonic time its result was verified here (our own: when we finished it)."""
    references: dict[bytes, Reference] | None = None
    """trainer id -> this node's reference for checking its result (None: not prepared yet)."""

    def arrivals_ms(self, trainers: list[bytes]) -> list[int]:
        """What a witness reports of ``trainers`` (shuffle order): ms from the round's start to each
        verified result, 0 for none; empty when this node did not see the round start."""
        if self.began is None:
            return []
        began = self.began
        return [0 if (t := self.arrived.get(tid)) is None else min(MAX_ARRIVAL_MS, max(1, round((t - began) * 1000)))
                for tid in trainers]


class KeyInUse(Exception):
    """Another live process uses this node's key: two nodes, one identity.

    ``address`` is where the run reaches that other process. ``taken_over``: it
    registered the key while this process ran (else: this process found it alive
    before joining, and stays out).
    """

    def __init__(self, address: str, *, taken_over: bool) -> None:
        self.address = address
        self.taken_over = taken_over
        super().__init__(self.line("this node's key", address[:40]))

    def line(self, key: str, where: str) -> str:
        """What to tell the user: ``key`` names the key (e.g. its file), ``where`` the other process."""
        if self.taken_over:
            return (f"another process registered {key} at {where} while this one ran; "
                    "two nodes cannot share a key: stop one, or give each node its own --key")
        return (f"{key} is in use by a live node at {where} (another psyche client?); "
                "give each node its own key: --key other.key")


def wait_notice(s: CoordinatorState, me: bytes) -> str | None:
    """What node ``me`` waits for in state ``s``, as a line for its user; None when it is not waiting.

    The same wait gives the same line, so a caller that says each new line once tells
    the user when a wait begins and when its numbers change, and nothing more.
    """
    m = q.member(s, me)
    healthy = m is not None and m.state is ClientState.Healthy
    joined = me in s.pending
    cfg = s.settings
    match s.run_state:
        case RunState.Uninitialized:
            return "the run is not started yet; waiting for its authority to start it (`psyche resume`)"
        case RunState.Paused:
            return (f"the run is paused after step {q.steps_completed(s)}; waiting for its authority to resume it "
                    "(`psyche resume`)")
        case RunState.WaitingForMembers if healthy or joined:
            have, need = len(q.healthy_clients(s)) + len(s.pending), cfg.init_min_clients
            if have < need:
                return f"waiting for members: {have} of {need} needed to start (init_min_clients = {need})"
            return (f"{have} members joined; epoch {s.epoch} starts once no more join for "
                    f"{cfg.waiting_for_members_extra_time}s (waiting_for_members_extra_time)")
        case RunState.Warmup if healthy:
            return (f"epoch {s.epoch} starts with {len(s.clients)} members; warmup: getting the model "
                    f"(up to {cfg.warmup_time}s)")
        case RunState.Warmup | RunState.RoundTrain | RunState.RoundWitness | RunState.Cooldown if joined and not healthy:
            return (f"waiting for epoch {s.epoch} to end ({q.steps_completed(s)} of {cfg.total_steps} steps done): "
                    f"this node joins epoch {s.epoch + 1}")
    return None


class ClientRuntime:
    """One node in one run. ``node`` is a started :class:`psyche.p2p.P2PNode`.

    Errors: what the ledger, the P2P node and the trainer raise for conditions the run
    expects (a host that restarts, a result or model no peer delivers, a peer's result
    that does not decode) is handled where it happens; anything else ends :meth:`run`
    with that error, also when it happened in a download running beside the main loop.
    """

    def __init__(self, ledger: Ledger, node: Node, trainer: Trainer, identity: NodeIdentity, *,
                 checkpoint_dir: Path | None = None, eval_every: int = 5, say: Callable[[str], None] = print,
                 key_probe: Callable[[str], Awaitable[bool]] | None = None,
                 blob_timeout: float = BLOB_TIMEOUT) -> None:
        """``key_probe(address)``: whether a live process holding this node's key answers at
        ``address`` (see :func:`psyche.p2p.node.endpoint_answers`); checked once, before this
        process first registers its own address, so a second process started with a key in use
        stays out instead of taking the key from a healthy node. None: never checked.
        ``blob_timeout``: seconds a peer's result is sought before it counts as unavailable."""
        self.ledger = ledger
        self.node = node
        self.trainer = trainer
        self.me: bytes = identity.public_key
        self.checkpoint_dir = checkpoint_dir
        self.eval_every = eval_every
        self.say = say
        self.blob_timeout = blob_timeout
        self.coord: Coordinator | None = None
        self._wake = asyncio.Event()
        self._stop_requested = False
        self._registered: set[str] = set()
        """P2P addresses this process has registered for its key (its joins)."""
        self.key_probe = key_probe
        self._key_checked = False
        self._notice: str | None = None
        """The last wait this node told its user about."""
        self._epoch_told: int | None = None
        self._told_gated = False
        """Whether the user was told this key waits for a grant to join a gated run."""
        self.books: dict[int, StepBook] = defaultdict(StepBook)
        self.blobs: dict[bytes, bytes] = {}
        self.applied_step = 0
        """Last step whose agreed results are in our weights."""
        self.trained: dict[int, tuple[TrainOutput | None, ResultCommitment | None]] = {}
        """step -> what we trained for it and the commitment we broadcast ((None, None): no batch)."""
        self.witnessed: set[int] = set()
        self.accused: set[int] = set()
        self.joined_epoch: int | None = None
        self.warmup_reported: int | None = None
        self.checkpointed_epoch: int | None = None
        self.dropped_noted: int | None = None
        self.model_epoch: int | None = None
        self._lock = asyncio.Lock()
        self._reported = (0, 0)
        """P2P bytes (sent, received) in total at our previous metrics report."""
        # Metrics reports the host could not take yet (it was restarting): sent, oldest
        # first, once it is back, so a restart loses no step from the run's history.
        self._outbox: deque[MetricsReport] = deque(maxlen=OUTBOX_LIMIT)
        self._flushing = False
        self._training_since: tuple[float, float] | None = None
        """(wall, process CPU) clock readings when this node first trained: its profile's window."""
        self._background: set[asyncio.Task[object]] = set()
        self._failure: BaseException | None = None
        """An unexpected error in a task beside the main loop: :meth:`run` raises it."""
        self._eval_due: tuple[MetricsReport, tuple[int, int]] | None = None
        """The report of a step whose validation loss is still to be measured (after witnessing)."""
        self.steps_trained = 0

    # -- plumbing --------------------------------------------------------------

    async def _watch(self) -> None:
        async for coord in self.ledger.watch():
            self.coord = coord
            s = coord.state
            if s.run_state is RunState.RoundTrain and (rnd := q.current_round(s)) is not None \
                    and self.books[rnd.step].began is None:
                # When this node learnt the round began: the clock its witness report counts from.
                self.books[rnd.step].began = time.monotonic()
            self.node.set_members({c.id: c.p2p_address for c in s.clients if c.id != self.me})
            self.node.set_step(s.step)
            if self._outbox and not self._flushing:
                self._spawn(self._flush_reports())
            self._wake.set()

    async def _messages(self) -> None:
        async for sender, msg in self.node.messages():
            if isinstance(msg, ResultCommitment):
                self._on_commitment(sender, msg)

    def _on_commitment(self, sender: bytes, c: ResultCommitment) -> None:
        book = self.books[c.step]
        if sender in book.commitments:
            return
        if self.coord is not None:
            got = q.assignment_for(self.coord.state, sender, step=c.step) if q.round_for_step(self.coord.state, c.step) else None
            if got is not None and got != (c.batch_start, c.batch_end):
                log.warning("commitment from %s for step %d names batch [%d, %d) but it was assigned %s; ignored",
                            sender.hex()[:8], c.step, c.batch_start, c.batch_end, got)
                return
        book.commitments[sender] = c
        if sender not in book.fetching:
            book.fetching.add(sender)
            self._spawn(self._fetch_result(sender, c))

    async def _fetch_result(self, sender: bytes, c: ResultCommitment, providers: list[bytes] | None = None) -> bytes | None:
        """Download and check ``sender``'s result; None if no provider delivered it or it does not decode."""
        book = self.books[c.step]
        try:
            data = self.blobs.get(c.blob_hash)
            if data is None:
                data = await self.node.fetch_blob(c.blob_hash, c.size, providers or [sender], timeout=self.blob_timeout)
            self.trainer.check_payload(data)
        except ValueError as exc:
            log.warning("result of %s for step %d does not decode: %s", sender.hex()[:8], c.step, exc)
            book.bad.add(sender)
            return None
        except BlobUnavailable as exc:  # not verified (yet): a later commitment or the apply may try again
            known = self.coord is not None and q.member(self.coord.state, sender) is not None
            log.warning("could not fetch result of %s for step %d (member in our state: %s, in p2p set: %s): %r",
                        sender.hex()[:8], c.step, known, sender in self.node.members, exc)
            book.fetching.discard(sender)
            return None
        self.blobs[c.blob_hash] = data
        book.verified[sender] = c.blob_hash
        book.arrived.setdefault(sender, time.monotonic())
        book.bytes_received += len(data)
        self._wake.set()
        s = self.coord.state if self.coord is not None else None
        if s is not None and s.run_state is not RunState.Cooldown and (rnd := q.current_round(s)) is not None \
                and rnd.step == c.step:
            # The last result of a round may be what a witness waits for: say so now rather
            # than when the main loop is next free (it may be applying or evaluating).
            self._spawn(self._witness(s, c.step))
        return data

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> asyncio.Task[object]:
        """Run ``coro`` beside the main loop, holding a reference until it ends; an error it
        raises ends the main loop (see :meth:`_task_done`)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[object]) -> None:
        self._background.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if self._failure is None:
            self._failure = task.exception()
        self._wake.set()

    async def _submit(self, instruction: Instruction, *, quiet: bool = False) -> bool:
        """Submit, retrying while the host is unreachable; False if refused."""
        delay = 0.2
        while True:
            try:
                await self.ledger.submit(instruction)
                return True
            except InstructionRefused as exc:
                if not quiet:
                    log.info("%s refused: %s", type(instruction).__name__, exc)
                return False
            except LedgerUnavailable as exc:
                # Not a warning per retry: the ledger tells the user once when its host stops
                # answering and once when it is back (ServerLedger's ``say``).
                log.info("coordinator unreachable (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- the loop ----------------------------------------------------------------

    async def run(self) -> int:
        """Follow the run until it is Finished (0). Cancel the task to stop (withdraws)."""
        watcher = asyncio.create_task(self._watch())
        messages = asyncio.create_task(self._messages())
        try:
            while self.coord is None:
                await asyncio.sleep(0.05)
            while True:
                if self._failure is not None:
                    raise self._failure
                if self._stop_requested:
                    # The cancel that came with the request can be lost inside a library's
                    # await (e.g. Python 3.11's wait_for when the inner wait had just ended).
                    raise asyncio.CancelledError
                if self.coord.state.run_state is RunState.Finished:
                    await self._finish_pending()
                    await self._flush_reports()
                    self.say(f"run finished at step {self.coord.state.settings.total_steps}; "
                             f"final state digest {self.coord.digest()}")
                    return 0
                # Cleared before acting: news that arrives while we act wakes the next turn at once.
                self._wake.clear()
                self._tell_wait()  # before acting: a wait (or an epoch) begins before we act on it
                await self.act()
                try:
                    async with asyncio.timeout(0.5):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        except asyncio.CancelledError:
            await self.withdraw()
            raise
        finally:
            watcher.cancel()
            messages.cancel()
            for task in list(self._background):
                task.cancel()

    def stop(self) -> None:
        """Ask :meth:`run` to withdraw and stop (Ctrl-C); it then raises ``CancelledError``.

        Also cancel the task running :meth:`run` so that a long await ends at once; this
        flag makes sure the stop happens even if that cancel is swallowed on the way.
        """
        self._stop_requested = True
        self._wake.set()

    def profile(self) -> dict[str, Any] | None:
        """Where this node's time went since it first trained (None if it never did).

        See :func:`psyche.client.timing.profile`; written by ``psyche client --profile``.
        """
        if self._training_since is None:
            return None
        wall0, cpu0 = self._training_since
        prof = timing.profile(self.trainer.timer, wall_seconds=time.perf_counter() - wall0,
                              cpu_seconds=time.process_time() - cpu0, client=self.me.hex(),
                              steps_trained=self.steps_trained)
        # What a test compares across nodes: the last step applied and the weights it left.
        prof["applied_step"] = self.applied_step
        prof["ranks"] = self.trainer.ranks
        prof["weights_sha256"] = self.trainer.weights_digest() if self.trainer.ready else None
        prof["p2p"] = {"upload_limit": self.node.upload_rate, "download_limit": self.node.download_rate,
                       "peers": {k.hex(): v.to_dict() for k, v in self.node.stats().items()}}
        return prof

    async def withdraw(self) -> None:
        """Leave the run cleanly (Ctrl-C)."""
        if self.coord is not None and q.member(self.coord.state, self.me) is not None:
            try:
                async with asyncio.timeout(5):
                    await self.ledger.submit(Withdraw())
                self.say("withdrew from the run")
            except (InstructionRefused, LedgerUnavailable, TimeoutError):
                pass

    async def act(self) -> None:
        """Do what the current state asks of us that we have not done yet."""
        if self.coord is None:
            return  # no state seen yet
        s = self.coord.state
        await self._claim_address(s)
        me = q.member(s, self.me)
        if me is not None and me.state is not ClientState.Healthy and self.dropped_noted != s.epoch:
            self.dropped_noted = s.epoch
            why = (f" (verification condemned its result of step {me.condemned_step}: it does not match "
                   "its assigned data; nobody applied it)") if me.condemned_step else ""
            self.say(f"this client is {me.state.value} in epoch {s.epoch}{why}; it will rejoin for the next epoch")
        match s.run_state:
            case RunState.WaitingForMembers | RunState.Uninitialized:
                await self._ensure_joined(s)
            case RunState.Warmup:
                if me is None:
                    await self._ensure_joined(s)
                elif me.state is ClientState.Healthy:
                    await self._warmup(s)
            case RunState.RoundTrain | RunState.RoundWitness:
                if me is None:
                    await self._ensure_joined(s)
                    return
                if me.state is ClientState.Healthy and self.trainer.ready:
                    await self._round(s)
            case RunState.Cooldown:
                if me is not None and me.state is ClientState.Healthy and self.trainer.ready:
                    # Accuse before the epoch's rewards are paid: a trainer that vanished in the
                    # last round must not earn points for the epoch.
                    await self._health_checks(s)
                    await self._apply_closed(s)
                    await self._cooldown(s)
                elif me is None:
                    await self._ensure_joined(s)
            case RunState.Paused:
                pass

    def _tell_wait(self) -> None:
        """Say what this node waits for, once per wait (see :func:`wait_notice`), and each epoch
        it is a member of as it starts (a short warmup may end before this loop sees it)."""
        if self.coord is None:
            return
        s = self.coord.state
        if q.address_of(s, self.me) not in (None, self.node.address, *self._registered):
            return  # the run's entry for our key is another process's (until we take it over, or stop)
        notice = wait_notice(s, self.me)
        if notice is not None and notice != self._notice:
            self.say(notice)
        self._notice = notice
        me = q.member(s, self.me)
        if me is not None and me.state is ClientState.Healthy and s.run_state in EPOCH_STATES \
                and self._epoch_told != s.epoch:
            self._epoch_told = s.epoch
            if notice is None:
                self.say(f"epoch {s.epoch} started with {len(s.clients)} members")

    async def _claim_address(self, s: CoordinatorState) -> None:
        """Make the run reach this process at its own address; raise :class:`KeyInUse` if another does.

        The run keeps one address per key. If it holds one this process never registered,
        either an earlier process with this key still runs (refuse: it keeps its key),
        or it died (a restart: re-join to take the key over), or, once we had registered
        ours, another live process took it over: two nodes would then sign as one, so
        this one stops.
        """
        if not (self.me in s.pending or (m := q.member(s, self.me)) is not None and m.state is ClientState.Healthy):
            return
        registered = q.address_of(s, self.me)
        if registered is None or registered == self.node.address:
            return
        if self._registered and registered not in self._registered:
            raise KeyInUse(registered, taken_over=True)
        await self._refuse_a_live_twin(s)
        if await self._submit(Join(self.node.address)):
            self._registered.add(self.node.address)
            self.say("re-registered this key at this process's P2P address (the run had an earlier one)")

    async def _ensure_joined(self, s: CoordinatorState) -> None:
        if self.me in s.pending:
            return
        me = q.member(s, self.me)
        if me is not None and s.run_state is RunState.WaitingForMembers:
            return  # carried over into the next epoch
        if me is not None and me.state is ClientState.Healthy:
            return
        if self.joined_epoch == s.epoch and me is None and s.run_state is not RunState.WaitingForMembers:
            return  # already asked for the next epoch
        if not access.may_join(s, self.me, int(time.time())):
            if not self._told_gated:
                self._told_gated = True
                self.say(f"run {s.run_id} is gated and this key holds no grant to join; waiting for one "
                         f"(the run's authority grants it with: psyche authorize {self.me.hex()})")
            return
        self._told_gated = False
        await self._refuse_a_live_twin(s)
        if await self._submit(Join(self.node.address)):
            self._registered.add(self.node.address)
            self.joined_epoch = s.epoch
            self.say(f"joined run {s.run_id} (epoch {s.epoch})")

    async def _refuse_a_live_twin(self, s: CoordinatorState) -> None:
        """Before this process first registers its address: raise :class:`KeyInUse` if the
        address the run holds for our key answers (a live process uses it; taking it over would
        stop a healthy node). An address that does not answer belonged to a process that died."""
        if self._registered or self._key_checked or self.key_probe is None:
            return
        registered = q.address_of(s, self.me)
        if registered is None or registered == self.node.address:
            return
        self._key_checked = True
        if await self.key_probe(registered):
            raise KeyInUse(registered, taken_over=False)

    async def _warmup(self, s: CoordinatorState) -> None:
        if self.model_epoch != s.epoch:
            try:
                await self._get_model(s)
            except (ModelUnavailable, ModelMismatch, OSError) as exc:
                # No peer delivered it, the peers serve another architecture, or the checkpoint
                # folder could not be read: try again shortly (peers may have caught up).
                log.warning("could not get the model for epoch %d: %r", s.epoch, exc)
                await asyncio.sleep(MODEL_RETRY_SECONDS)
                return
            self.model_epoch = s.epoch
            try:
                async with self._lock:
                    await asyncio.to_thread(self.trainer.prepare)
            except TrainerFailure as exc:
                await self._trainer_failed("warmup", exc)
                return
        self.trainer.lr_window = q.lr_warmup_window(s)
        if q.is_warmup_witness(s, self.me) and self.warmup_reported != s.epoch:
            if await self._submit(WarmupWitness(), quiet=True):
                self.warmup_reported = s.epoch

    async def _get_model(self, s: CoordinatorState) -> None:
        """Make sure our weights are those of the start of step ``s.step``.

        Epoch 0: built from the run's seed (or its configured checkpoint). Later: our
        own weights if we applied every step so far; else downloaded from peers
        (those that were in the previous epoch, or, when nobody was, from whoever
        kept the weights, unless the run's last checkpoint is current and on this
        machine). Raises :class:`ModelUnavailable`, :class:`ModelMismatch` or ``OSError`` if
        no source works; the caller retries.
        """
        if self.trainer.ready and self.applied_step == s.step - 1:
            return
        source = q.model_source(s)
        ckpt = q.latest_checkpoint(s)
        if source == "init":
            self.trainer.init_model()
            self.say(f"model initialised from the run's seed ({self.trainer.parameters() / 1e6:.2f}M parameters)")
        elif source == "checkpoint" and ckpt is not None and ckpt.step == s.step - 1 and Path(ckpt.location).is_dir():
            self.trainer.load_checkpoint_folder(ckpt.location)
            self.say(f"model loaded from checkpoint {ckpt.location} (after step {ckpt.step})")
        else:
            others = [c.id for c in s.clients if c.id != self.me]
            providers = [c.id for c in s.clients[: s.carried] if c.id != self.me] or others
            self.say(f"fetching the model from {len(providers)} peer(s)")
            t0 = time.time()
            fetched = await self.trainer.fetch_from_peers(lambda sink: self.node.fetch_model(providers, into=sink))
            took = time.time() - t0
            size = fetched.manifest.total_bytes()
            self.say(f"model fetched from {len(fetched.sources)} peer(s) in {took:.1f}s "
                     f"({size / 1e6:,.1f} MB at {size / 1e6 / max(took, 1e-9):,.1f} MB/s)")
        self.applied_step = s.step - 1
        self.trained = {k: v for k, v in self.trained.items() if k <= self.applied_step}
        self._serve_model()

    def _serve_model(self) -> None:
        from psyche.p2p.torch_io import model_from_state_dict

        self.node.serve_model(model_from_state_dict(self.trainer.state_tensors()))

    async def _round(self, s: CoordinatorState) -> None:
        rnd = q.current_round(s)
        if rnd is None:
            return
        step = rnd.step
        overlapped = self.trainer.cfg.optimizer.overlapped
        if not overlapped:
            await self._apply_closed(s)
        if step not in self.trained and self.applied_step >= step - 2:
            interval = q.assignment_for(s, self.me, step=step)
            if interval is not None and s.run_state is RunState.RoundTrain:
                await self._train(s.run_id, step, interval)
            else:
                self.trained[step] = (None, None)
        if step in self.trained:
            # On the weights this step trained on (before any apply below), as its trainers did.
            await self._prepare_checks(s, step)
        # Witness first: the round (everyone's next step) waits for it; evaluating and
        # applying only wait for us.
        await self._witness(s, step)
        await self._evaluate_due()
        if overlapped:
            await self._apply_closed(s)
        await self._witness(s, step)
        await self._health_checks(s)

    async def _train(self, run_id: str, step: int, interval: tuple[int, int]) -> None:
        start, end = interval
        if self._training_since is None:
            # The profile covers training: from now on (the model load before is not in it).
            self._training_since = (time.perf_counter(), time.process_time())
            self.trainer.timer.reset()
        try:
            async with self._lock:
                out = await asyncio.to_thread(self.trainer.train, step, start, end)
        except TrainerFailure as exc:
            # Nothing was published for this step: the round goes on without us.
            self.trained[step] = (None, None)
            await self._trainer_failed(f"step {step}", exc)
            return
        self.steps_trained += 1
        blob_hash = self.node.publish_blob(out.payload, step=step)
        commitment = ResultCommitment(run_id=run_id, step=step, batch_start=start,
                                      batch_end=end, blob_hash=blob_hash, size=len(out.payload))
        book = self.books[step]
        book.commitments[self.me] = commitment
        book.verified[self.me] = blob_hash
        book.arrived.setdefault(self.me, time.monotonic())
        self.blobs[blob_hash] = out.payload
        self.trained[step] = (out, commitment)
        await self.node.broadcast(commitment)
        self.say(f"step {step}: trained samples [{start}, {end}) loss {out.loss:.4f} "
                 f"({out.tokens / max(out.seconds, 1e-9):,.0f} tok/s), result {len(out.payload):,} bytes")
        await self._report(step, out)

    async def _report(self, step: int, out: TrainOutput) -> None:
        total = self.trainer.cfg.coordinator.total_steps
        stats = self.node.stats()
        sent = sum(p.bytes_out for p in stats.values())
        received = sum(p.bytes_in for p in stats.values())
        data: MetricsReport = {"step": step, "loss": out.loss, "tokens": out.tokens, "train_seconds": out.seconds,
                "forward_backward_seconds": out.forward_backward_seconds,
                "tokens_per_sec": out.tokens / max(out.seconds, 1e-9), "result_bytes": len(out.payload),
                # P2P traffic since our previous report, and in total since this client started.
                "bytes_sent": sent - self._reported[0], "bytes_received": received - self._reported[1],
                "bytes_sent_total": sent, "bytes_received_total": received, "peers": len(stats),
                "ranks": self.trainer.ranks,
                **{k: v for k, v in (("upload_limit", self.node.upload_rate), ("download_limit", self.node.download_rate))
                   if v is not None}}
        self._reported = (sent, received)
        await self._send_report(data)
        if step == 1 or step % self.eval_every == 0 or step == total:
            # Every trainer holds the same weights: each measures its slice of the validation
            # set (by its place in the round), and the host weighs the slices by tokens.
            s = self.coord.state if self.coord is not None else None
            trainers = [b.client for b in q.round_batches(s, step)] if s and q.round_for_step(s, step) else []
            part = (trainers.index(self.me), len(trainers)) if self.me in trainers else (0, 1)
            self._eval_due = (data, part)

    async def _evaluate_due(self) -> None:
        """Measure and report the validation loss a step's report asked for.

        Runs right after witnessing and before any further results are applied, so it
        is the loss of the weights that step trained on (the same on every node).
        """
        due, self._eval_due = self._eval_due, None
        if due is None:
            return
        data, part = due
        async with self._lock:
            val, tokens = await asyncio.to_thread(self.trainer.evaluate, part)
        if tokens:
            await self._send_report(dict(data, val_loss=val, val_tokens=tokens))

    async def _send_report(self, data: MetricsReport) -> None:
        """Queue a metrics report and send what is queued, keeping what the host cannot take yet."""
        if len(self._outbox) == self._outbox.maxlen:
            log.warning("metrics report for step %d dropped: %d reports wait for the coordinator",
                        self._outbox[0]["step"], len(self._outbox))
        self._outbox.append(data)
        await self._flush_reports()

    async def _flush_reports(self) -> None:
        """Send queued reports oldest first; stop (keeping them) while the host is unreachable."""
        if self._flushing:
            return
        self._flushing = True
        try:
            while self._outbox:
                data = self._outbox[0]
                try:
                    await self.ledger.report(data)
                except LedgerUnavailable as exc:
                    log.info("metrics report for step %d kept for later: %s", data["step"], exc)
                    return
                except InstructionRefused as exc:
                    log.info("metrics report for step %d not taken: %s", data["step"], exc)
                if self._outbox and self._outbox[0] is data:  # (a full outbox may have dropped it meanwhile)
                    self._outbox.popleft()
        finally:
            self._flushing = False

    async def _prepare_checks(self, s: CoordinatorState, step: int) -> None:
        """Compute the references for the results this node checks in the round of ``step``.

        Which of a trainer's sequences are checked is drawn here, privately, so no trainer
        can know which of its samples it could skip.
        """
        book = self.books[step]
        if book.references is not None:
            return
        checks = q.verification_checks(s, self.me, step=step)
        interval = q.assignment_for(s, self.me, step=step)
        own = interval[1] - interval[0] if interval is not None else 0
        todo = draw_sequences(checks, self.trainer.check_sequences(own, len(checks)), random.SystemRandom())
        if not todo:
            book.references = {}
            return
        async with self._lock:
            refs = await asyncio.to_thread(self.trainer.references, [picks for _, picks in todo])
        book.references = {c.trainer: ref for (c, _), ref in zip(todo, refs)}
        self._wake.set()

    def _scores(self, step: int, checks: list[Check], trainers: set[bytes]) -> list[int]:
        """This witness's verification scores of its ``checks`` in the round of ``step`` (empty: it checks nothing)."""
        if not checks:
            return []
        book = self.books[step]
        refs = book.references or {}
        results = {t: self.blobs[h] for t, h in book.verified.items() if t in trainers and h in self.blobs}
        todo = [(refs[c.trainer], c.trainer) for c in checks if c.trainer in refs]
        return wire_scores(checks, dict(zip([t for _, t in todo], self.trainer.check_scores(todo, results))))

    async def _witness(self, s: CoordinatorState, step: int) -> None:
        if step in self.witnessed or not q.is_witness(s, self.me, step=step):
            return
        book = self.books[step]
        order = q.round_trainers(s, step=step)
        trainers = set(order)
        complete = trainers <= set(book.verified) | book.bad
        if not complete and s.run_state is not RunState.RoundWitness:
            return
        checks = q.verification_checks(s, self.me, step=step)
        if book.references is None and checks and s.run_state is not RunState.RoundWitness:
            return  # our checks are still being prepared (_round sends the report when they are)
        valid = {t: c for t, c in book.commitments.items() if t in trainers}
        out = self.trained.get(step, (None, None))[0]
        instr = Witness(
            step=step,
            participant_bloom=BloomFilter.exact_for([t for t in book.verified if t in trainers], trainers).to_bytes(),
            broadcast_bloom=BloomFilter.exact_for([c.blob_hash for c in valid.values()],
                                                  [c.blob_hash for c in book.commitments.values()]).to_bytes(),
            broadcast_merkle=merkle_root([c.blob_hash for c in valid.values()]),
            loss=float(out.loss) if out is not None else 0.0,
            tokens_per_sec=float(out.tokens / max(out.seconds, 1e-9)) if out is not None else 0.0,
            bandwidth_bytes=book.bytes_received,
            arrivals_ms=book.arrivals_ms(order),
            scores=self._scores(step, checks, trainers),
        )
        self.witnessed.add(step)
        await self._submit(instr, quiet=True)

    async def _health_checks(self, s: CoordinatorState) -> None:
        for rnd in s.rounds:
            if rnd.step in self.accused or not q.round_closed(s, rnd.step):
                continue
            self.accused.add(rnd.step)
            accused = q.accusable_trainers(s, rnd.step)
            if accused:
                ok = await self._submit(HealthCheck(step=rnd.step, accused=accused), quiet=True)
                if ok:
                    self.say(f"step {rnd.step}: accused {[a.hex()[:8] for a in accused]} of missing results")

    async def _apply_closed(self, s: CoordinatorState) -> None:
        """Apply, in step order, every closed round we have not applied yet."""
        while True:
            step = self.applied_step + 1
            if step <= 0 or q.round_for_step(s, step) is None or not q.round_closed(s, step):
                return
            await self._apply(s, step)

    async def _apply(self, s: CoordinatorState, step: int) -> None:
        book = self.books[step]
        batches = q.round_batches(s, step)
        # Only results a witness quorum downloaded and verified, less those verification condemned:
        # they can be fetched from those witnesses, and every node derives this same set from the
        # state. (A trainer that died after broadcasting its commitment but before serving its
        # blob is left out by all.)
        verified = set(q.applied_trainers(s, step))
        candidates: dict[tuple[int, int], list[bytes]] = {}
        owner: dict[tuple[int, int], tuple[bytes, ResultCommitment]] = {}
        for b in batches:
            if b.client not in verified:
                continue
            c = book.commitments.get(b.client)
            if c is None:
                # The others will apply a result we never heard of: we would fork.
                await self._resync(f"step {step}: missed the commitment of {b.client.hex()[:8]}")
                return
            if (c.batch_start, c.batch_end) == (b.start, b.end):
                candidates[(b.start, b.end)] = [c.blob_hash]
                owner[(b.start, b.end)] = (b.client, c)
        agreed = q.consensus(s, step, candidates)
        payloads = []
        for interval in sorted(agreed):
            h = agreed[interval]
            if h is None:
                continue
            data = self.blobs.get(h)
            if data is None:
                trainer, c = owner[interval]
                providers = [trainer] + [x.id for x in s.clients if x.id not in (trainer, self.me)]
                data = await self._fetch_result(trainer, c, providers)
                if data is None:
                    await self._resync(f"step {step}: the agreed result of {trainer.hex()[:8]} could not be fetched")
                    return
            payloads.append(data)
        async with self._lock:
            await asyncio.to_thread(self.trainer.apply, step, payloads)
        self.applied_step = step
        for old in [k for k in self.books if k < step - 2]:
            for h in self.books[old].verified.values():
                self.blobs.pop(h, None)
            del self.books[old]
        self.node.drop_blobs_older_than(step - 1)

    async def _resync(self, why: str) -> None:
        """We cannot hold the weights everyone else holds: leave, and rejoin with the model from peers.

        Applying a step without one of its agreed results would silently fork this
        node's weights from the network's; withdrawing keeps the run consistent.
        """
        self.say(f"{why}; withdrawing to rejoin next epoch with the model from peers")
        self.applied_step = -1  # forces a model download at the next warmup
        self.model_epoch = None
        await self._submit(Withdraw(), quiet=True)

    async def _trainer_failed(self, where: str, exc: TrainerFailure) -> None:
        """The trainer could not go on (a rank of the node died): withdraw to come back next epoch
        with the network's weights; re-raise ``exc`` when it is fatal (the client then stops)."""
        await self._resync(f"{where}: {exc}")
        if exc.fatal:
            raise exc

    async def _cooldown(self, s: CoordinatorState) -> None:
        if self.checkpointed_epoch == s.epoch:
            return
        self.checkpointed_epoch = s.epoch
        async with self._lock:  # not mid-step: a step's lookahead moves the weights while it trains
            self._serve_model()
        if not q.is_checkpointer(s, self.me) or self.checkpoint_dir is None:
            return
        step = self.applied_step
        async with self._lock:
            path, sha = await asyncio.to_thread(self.trainer.save, self.checkpoint_dir, step=step)
        self.say(f"checkpoint after step {step} written to {path}")
        if not await self._submit(Checkpoint(step=step, location=str(path), sha256=sha)):
            # Too late (the cooldown ended) or refused: the file is kept, but the run does not list it.
            self.say(f"the coordinator did not record the checkpoint of step {step} (see the log for why)")

    async def _finish_pending(self) -> None:
        """At Finished: nothing left to train; make sure a checkpointer's last save happened."""
        if self.coord is not None and self.trainer.ready:
            await self._apply_closed(self.coord.state)
