"""Client runtimes in one process: an embedded run, an in-memory network and a clock the test moves.

:class:`RuntimeSwarm` hosts one run (:class:`~psyche.ledger.host.RunHost` behind
:class:`~psyche.ledger.embedded.EmbeddedLedger`), binds every node on one
:class:`~psyche.p2p.MemoryNetwork` and gives each client the real
:class:`~psyche.client.trainer.LocalTrainer` on a tiny LLaMA, so a test drives the
whole phase logic of :class:`~psyche.client.runtime.ClientRuntime` in milliseconds.

Time stands still unless the test moves it: :meth:`RuntimeSwarm.until` ticks the
host as often as it looks (so a phase whose work is done moves on at once), and
only :meth:`RuntimeSwarm.advance` lets a phase's deadline pass.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psyche.client.runtime import ClientRuntime
from psyche.client.trainer import LocalTrainer
from psyche.config import RunConfig, parse_config
from psyche.coordinator import Coordinator, Instruction
from psyche.coordinator import queries as q
from psyche.coordinator.state import ClientState, CoordinatorState, RunState
from psyche.identity import Identity
from psyche.ledger.base import Ledger, LedgerUnavailable, MetricsReport
from psyche.ledger.embedded import EmbeddedLedger
from psyche.ledger.host import RunHost
from psyche.p2p import MemoryNetwork, P2PNode

TINY_VOCAB = 64


def write_token_folder(path: Path, *, tokens: int = 20_000, vocab: int = TINY_VOCAB, seed: int = 0) -> Path:
    """A token folder (train.bin, val.bin, meta.json) of uniformly random tokens below ``vocab``."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in (("train", tokens), ("val", max(tokens // 10, 200))):
        arr = rng.integers(0, vocab, n).astype("<u2")
        arr.tofile(path / f"{name}.bin")
        splits[name] = {"file": f"{name}.bin", "tokens": n}
    (path / "meta.json").write_text(json.dumps({"format": "psyche-tokens", "dtype": "uint16", "vocab_size": vocab,
                                                "splits": splits}))
    return path


def tiny_config(data: Path, *, name: str = "runtime-test", overlapped: bool = True, **coordinator: Any) -> RunConfig:
    """A run of a ~4,700-parameter LLaMA (one layer, hidden 16, seq_len 8) on ``data``.

    Two clients by default, every member a witness, one checkpointer; deadlines are
    long, since the test's clock moves only when it says so. ``coordinator`` overrides;
    ``overlapped``: DisTrO's one-step-late apply (the default) or apply before training.
    """
    c: dict[str, Any] = dict(warmup_time=10, cooldown_time=5, max_round_train_time=10, round_witness_time=2,
                             epoch_time=600, total_steps=3, init_min_clients=2, min_clients=2, witness_nodes=0,
                             global_batch_size_start=6, global_batch_size_end=6, waiting_for_members_extra_time=0,
                             checkpointers=1)
    c.update(coordinator)
    return parse_config({
        "name": name,
        "coordinator": c,
        "model": {"vocab_size": TINY_VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_key_value_heads": 2, "seq_len": 8},
        "data": {"location": str(data)},
        "lr": {"kind": "constant", "peak_lr": 1e-2, "warmup_steps": 0, "final_lr": 1e-2},
        "optimizer": {"micro_batch_size": 2, "chunk": 8, "topk": 2, "overlapped": overlapped},
    }, "tiny runtime config")


class ManualClock:
    """A host clock that moves only when told (unix-like seconds)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward."""
        self.now += seconds


class OutageLedger(Ledger):
    """A real ledger whose host can stop taking requests: while :attr:`down`, ``submit``,
    ``report`` and ``state`` raise :class:`LedgerUnavailable` (as a server that restarts);
    the state feed keeps coming, so the client goes on with the run meanwhile."""

    def __init__(self, inner: Ledger) -> None:
        self.inner = inner
        self.run_id = inner.run_id
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise LedgerUnavailable("the host is restarting (test outage)")

    async def submit(self, instruction: Instruction) -> None:
        self._check()
        await self.inner.submit(instruction)

    async def report(self, report: MetricsReport) -> None:
        self._check()
        await self.inner.report(report)

    async def state(self) -> Coordinator:
        self._check()
        return await self.inner.state()

    async def watch(self) -> AsyncIterator[Coordinator]:
        async for coord in self.inner.watch():
            yield coord


@dataclass
class SwarmClient:
    """One client of a :class:`RuntimeSwarm`: its key, ledger, node, trainer and runtime."""

    identity: Identity
    ledger: Ledger
    node: P2PNode
    trainer: LocalTrainer
    runtime: ClientRuntime
    said: list[str] = field(default_factory=list)
    """Every line the runtime said to its user."""
    task: asyncio.Task[int] | None = None

    @property
    def id(self) -> bytes:
        """The client's id in the run (its public key)."""
        return self.identity.public_key

    def saw(self, fragment: str) -> bool:
        """Whether the runtime said a line containing ``fragment``."""
        return any(fragment in line for line in self.said)

    def weights(self) -> dict[str, Any]:
        """A CPU copy of the client's current weights (name -> tensor)."""
        return self.trainer.state_tensors()


class RuntimeSwarm:
    """One embedded run, its clients and the clock (see the module docstring).

    Use as ``async with RuntimeSwarm(cfg) as swarm:``; leaving cancels every runtime
    and closes every node.
    """

    def __init__(self, cfg: RunConfig, *, checkpoint_root: Path | None = None, blob_timeout: float = 1.0) -> None:
        self.cfg = cfg
        self.clock = ManualClock()
        self.authority = Identity(b"\xaa" * 32)
        coord = Coordinator.new(cfg.run_id, cfg, authority=self.authority.public_key, now=int(self.clock()))
        self.host = RunHost(coord, clock=self.clock, secret=b"runtime-swarm")
        self.net = MemoryNetwork()
        self.clients: list[SwarmClient] = []
        self.checkpoint_root = checkpoint_root
        self.blob_timeout = blob_timeout
        self._nodes: list[P2PNode] = []

    @property
    def state(self) -> CoordinatorState:
        return self.host.coordinator.state

    def node(self, identity: Identity) -> P2PNode:
        """A P2P node for ``identity`` on the swarm's network (closed with the swarm)."""
        nd = P2PNode(identity, self.cfg.run_id, self.net.transport(identity.public_key), resend_interval=0.05,
                     stall_timeout=0.5)
        self._nodes.append(nd)
        return nd

    def ledger(self, identity: Identity) -> EmbeddedLedger:
        """``identity``'s view of the run (for a test that plays a participant by hand)."""
        return EmbeddedLedger(self.host, identity)

    def add(self, *, seed: int | None = None, ledger: Callable[[EmbeddedLedger], Ledger] | None = None,
            start: bool = True, **runtime: Any) -> SwarmClient:
        """A new client (key from ``seed``, default: its position) with a real trainer; started
        unless ``start`` is False. ``ledger`` wraps its embedded ledger (e.g. :class:`OutageLedger`);
        ``runtime`` goes to :class:`ClientRuntime` (``key_probe``, ``eval_every``, ...)."""
        n = len(self.clients) if seed is None else seed
        identity = Identity(bytes([n + 1]) * 32)
        embedded = self.ledger(identity)
        said: list[str] = []
        trainer = LocalTrainer(self.cfg, eval_batches=1, eval_batch_size=2)
        node = self.node(identity)
        ckpt = self.checkpoint_root / identity.public_key.hex()[:8] if self.checkpoint_root is not None else None
        rt = ClientRuntime(ledger(embedded) if ledger is not None else embedded, node, trainer, identity,
                           checkpoint_dir=ckpt, say=said.append, blob_timeout=self.blob_timeout, **runtime)
        client = SwarmClient(identity, rt.ledger, node, trainer, rt, said)
        self.clients.append(client)
        if start:
            self.start(client)
        return client

    def start(self, client: SwarmClient) -> None:
        """Run ``client``'s runtime as a task of this loop."""
        client.task = asyncio.get_running_loop().create_task(client.runtime.run())

    def tick(self) -> bool:
        """Let the coordinator act on the current time; True if its state changed."""
        return self.host.tick()

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` on and tick (a phase whose deadline passed moves on)."""
        self.clock.advance(seconds)
        self.tick()

    async def until(self, condition: Callable[[], bool], *, timeout: float = 5.0, pace: float = 0.0,
                    what: str = "") -> None:
        """Tick and yield to the runtimes until ``condition()`` holds; AssertionError after ``timeout``
        seconds of real time (or at once if a runtime ended with an error). ``pace``: seconds the
        clock moves at each look where the runtimes have done all they can (:meth:`settled`);
        0: time stands still."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            if pace and self.settled():
                self.clock.advance(pace)
            self.tick()
            if condition():
                return
            for c in self.clients:
                if c.task is not None and c.task.done() and not c.task.cancelled() and c.task.exception() is not None:
                    raise AssertionError(f"runtime {c.id.hex()[:8]} failed while waiting for {what or condition}") \
                        from c.task.exception()
            if loop.time() > end:
                last = "; ".join(f"{c.id.hex()[:8]}: {c.said[-1] if c.said else '-'}" for c in self.clients)
                raise AssertionError(f"not reached in {timeout}s: {what or condition} "
                                     f"(run is {self.state.run_state.value} at step {self.state.step}; waiting for: "
                                     f"{self.waiting_for() or 'a deadline'}; last said: {last})")
            await asyncio.sleep(0.005)

    def settled(self) -> bool:
        """Whether only a deadline can move the run on (see :meth:`waiting_for`)."""
        return self.waiting_for() is None

    def waiting_for(self) -> str | None:
        """Whether every running healthy member has done all it can in the current phase, so that
        only a deadline can move the run on. Letting time pass earlier would drop or accuse a
        member only because this machine was slow. Per phase: Warmup, every member has the model;
        a round, every member trained its batch and holds the result of every other member it can
        reach (or gave up on it), and in RoundWitness every witness reported; Cooldown, every
        member applied the epoch's last step, and the checkpoints are in (when kept). Returns
        what is still awaited, for people, or None once settled."""
        s = self.state
        healthy = {c.id for c in s.clients if c.state is ClientState.Healthy}
        running = [c for c in self.clients if c.id in healthy and c.task is not None and not c.task.done()]
        if busy := [c for c in running if c.runtime._background]:
            return "background work (downloads, witness reports) of " + ", ".join(
                f"{c.id.hex()[:8]}: {sorted(t.get_name() for t in c.runtime._background)}" for c in busy)
        rnd = q.current_round(s)
        match s.run_state:
            case RunState.Warmup:
                if lacking := [c.id.hex()[:8] for c in running if c.runtime.model_epoch != s.epoch]:
                    return f"the model of epoch {s.epoch} at {lacking}"
            case RunState.RoundTrain | RunState.RoundWitness if rnd is not None:
                step = rnd.step
                trainers = [c for c in running if q.assignment_for(s, c.id, step=step) is not None]
                for x in running:
                    if x in trainers and step not in x.runtime.trained:
                        return f"{x.id.hex()[:8]} to train step {step}"
                    book = x.runtime.books.get(step)
                    # A result counts once verified, refused, or given up on: a fetch that ended
                    # without it (the blob timeout is real time, which a busy machine can overrun:
                    # 0.2 s was, in the full suite) is retried only at the apply, after the round's
                    # deadline, so waiting for it would stop the clock for good.
                    done = (set(book.verified) | book.bad | (set(book.commitments) - book.fetching)
                            if book is not None else set())
                    if missing := [y.id.hex()[:8] for y in trainers if y is not x and y.id not in done
                                   and frozenset((x.id, y.id)) not in self.net.blocked]:
                        return f"{x.id.hex()[:8]} to hold the results of step {step} of {missing}"
                    if s.run_state is RunState.RoundWitness and q.is_witness(s, x.id, step=step) \
                            and step not in x.runtime.witnessed:
                        return f"{x.id.hex()[:8]} to witness step {step}"
            case RunState.Cooldown:
                if unapplied := [c.id.hex()[:8] for c in running if c.runtime.checkpointed_epoch != s.epoch]:
                    return f"{unapplied} to end epoch {s.epoch}"
                if self.checkpoint_root is not None and not all(
                        i in s.checkpointed for i in s.checkpointers if s.clients[i].state is ClientState.Healthy):
                    return "the checkpoints"
        return None

    def in_state(self, run_state: RunState, *, step: int | None = None) -> Callable[[], bool]:
        """A condition: the run is in ``run_state`` (at ``step``, if given)."""
        return lambda: self.state.run_state is run_state and (step is None or self.state.step == step)

    def health(self, client_id: bytes) -> ClientState | None:
        """``client_id``'s state in the current epoch (None: not a member)."""
        m = q.member(self.state, client_id)
        return m.state if m is not None else None

    async def finish(self, *, timeout: float = 10.0, pace: float = 1.0) -> None:
        """Drive the run to Finished, letting ``pace`` seconds pass at each look where the runtimes
        are :meth:`settled`, and wait for every runtime to end."""
        await self.until(self.in_state(RunState.Finished), timeout=timeout, pace=pace, what="the run finishes")
        tasks = [c.task for c in self.clients if c.task is not None]
        done, _ = await asyncio.wait(tasks, timeout=timeout)
        assert len(done) == len(tasks), "a runtime did not end after the run finished"

    async def close(self) -> None:
        for c in self.clients:
            if c.task is not None and not c.task.done():
                c.task.cancel()
        for c in self.clients:
            if c.task is not None:
                await asyncio.gather(c.task, return_exceptions=True)
        for nd in self._nodes:
            await nd.close()

    async def __aenter__(self) -> RuntimeSwarm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
