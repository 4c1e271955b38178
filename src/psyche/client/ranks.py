"""A node with several devices: one trainer whose ranks share each step through ``torch.distributed``.

To the run the node is one trainer: one key, one P2P endpoint, one result per round.
Inside it, ``psyche client --nproc-per-node N`` runs N ranks: rank 0 is the client
process itself (it follows the coordinator, talks to peers and holds the DisTrO
optimizer); ranks 1..N-1 are child processes that only compute gradients. Per step:

1. rank 0 sends each rank the step's order (:class:`StepOrder`: the node's share, and
   whether the weights changed since the last step) over a pipe. Commands never travel
   through a collective, so an idle rank can wait for the next round without a
   collective timing out;
2. if the weights changed (an apply, a model loaded or fetched), rank 0 broadcasts them
   (a rebuilt model is synchronised by ``DistributedDataParallel`` itself, once every rank
   has said over its pipe that its replica is built: a build may take long, a collective's
   timeout is short);
3. the share is cut into contiguous parts (:func:`~psyche.train.step.contiguous_part`), one per rank; each rank
   runs forward and backward over its part in micro-batches under DDP, which *sums* the
   ranks' gradients (:func:`sum_hook`) once, at the last backward. Each part's loss is
   divided by the token count of the whole share, so the sum is the gradient of the
   share's mean loss: what one rank holding the whole share computes;
4. rank 0 clips the summed gradient and runs DisTrO's ``generate`` on it, once per node;
   results are applied on rank 0 only (step 2 then carries the new weights).

What is guaranteed on CPU (gloo): the node's gradient equals a one-rank node's up to the
order of floating-point sums. It is bit-identical where that order is the same: two
ranks, each part one micro-batch of the one-rank node (the one-rank node adds micro-batch
gradients in order; gloo adds the two ranks' the same way).

A rank that dies (or a collective that fails or times out) raises :class:`RankFailure`
from :meth:`NodeTrainer.train`; every other rank is stopped first, so none is left
waiting in a collective. The runtime then withdraws the node; the ranks start again at
its next step, after it rejoined with the model from peers.

Gloo on CPU, NCCL on CUDA. FSDP (``--shard``) is not here: see the README.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Client, Connection, Listener
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from psyche.client.ports import TrainerFailure
from psyche.client.trainer import LocalTrainer
from psyche.config import RunConfig
from psyche.localports import free_port
from psyche.train.step import StepStats, accumulate_gradients, clip_gradients, contiguous_part, default_autocast_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from psyche.data import SampleProvider

AUTHKEY_ENV = "PSYCHE_RANK_AUTHKEY"
"""Where a child rank finds the key (hex) that proves it to rank 0's listener."""

RANK_TIMEOUT = 300.0
"""Seconds a collective (and the ranks' start) waits for a slow rank before the node gives up."""

START_TIMEOUT = 120.0
"""Seconds the ranks may take to start (import torch, open the data) before the node gives up."""

MAX_FAILURES = 3
"""Rank failures in a row (no step completed between them) after which the node stops for good."""


class RankFailure(TrainerFailure):
    """A rank of this node died, or a collective among them failed; every rank was stopped."""


RANK_ERRORS = (RankFailure, RuntimeError, OSError)
"""What a step among the ranks raises when one of them dies or a collective fails or times out."""


@dataclass(frozen=True)
class StepOrder:
    """What rank 0 asks of every rank for one step (or, without a share, to get ready for the next)."""

    share: tuple[int, int] | None
    """The node's share: training samples ``[start, end)``; None: only take the weights."""
    rebuild: bool
    """The model was replaced: build it again (``DistributedDataParallel`` copies rank 0's weights)."""
    sync: bool
    """Rank 0's weights changed since the last step (an apply): receive them first."""


def sum_hook(group: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook that sums the ranks' gradients (DDP's own averages them):
    each rank's part already carries its share of the whole batch's mean loss."""
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _wrap(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` under DDP (rank 0's weights are copied to every rank here), summing gradients."""
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                  forward_sync_buffers=False)
    # Through a lambda: DDP checks the hook's annotations as objects, and this module's are strings.
    ddp.register_comm_hook(None, lambda state, bucket: sum_hook(state, bucket))
    return ddp


def _broadcast_weights(model: torch.nn.Module) -> None:
    """Every rank's weights become rank 0's."""
    works = [dist.broadcast(t.data, src=0, async_op=True) for t in [*model.parameters(), *model.buffers()]]
    for w in works:
        w.wait()


def rank_step(ddp: DistributedDataParallel, data: SampleProvider, share: range, *, rank: int, world: int,
              micro_batch_size: int, autocast_dtype: torch.dtype | None, batch: torch.Tensor | None = None) -> torch.Tensor:
    """One rank's half of a step: forward and backward its part of the node's ``share``, the
    node's gradient summed across ranks into ``.grad``; return the share's mean loss (summed
    across ranks too). ``batch``: this rank's part, already read (rank 0's, by the trainer)."""
    part = contiguous_part(share, rank, world)
    seq_tokens = data.seq_len
    if batch is None:
        # A rank with no sample still runs a pass (weighted 0) through the same collectives.
        batch = data.batch(part if len(part) else share[:1])
    ddp.module.train()
    ddp.zero_grad(set_to_none=True)
    loss = accumulate_gradients(ddp, batch, micro_batch_size=micro_batch_size, total_tokens=len(share) * seq_tokens,
                                autocast_dtype=autocast_dtype, weight=1.0 if len(part) else 0.0, no_sync=ddp.no_sync)
    dist.all_reduce(loss)
    return loss


def _rank_main(conn: Connection) -> int:
    """A child rank: take its settings from rank 0, open the data, join the process group, then
    follow rank 0's orders until it says stop (None) or goes away (the connection closes).
    Returns the process's exit code: 0 then, 1 after a failure (said on stderr, or to rank 0)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the client's to handle; it stops us
    from psyche.train.loop import prepare_data
    from psyche.train.model import build_model

    setup: dict[str, Any] = {}
    try:
        setup = conn.recv()
        rank, world = setup["rank"], setup["world"]
        torch.set_num_threads(setup["threads"])
        cfg = RunConfig.model_validate(setup["config"])
        data = prepare_data(cfg, location=setup["data_location"], progress=False).train
        dev = torch.device(setup["device"])
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        conn.send("ready")
    except (EOFError, OSError):
        return 0  # rank 0 is gone
    except Exception as exc:  # noqa: BLE001 - said to rank 0, which names it in its failure
        conn.send(f"rank {setup.get('rank', '?')} could not start: {type(exc).__name__}: {exc}")
        return 1
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=setup["init_method"], rank=rank,
                            world_size=world, timeout=timedelta(seconds=setup["timeout"]))
    amp = default_autocast_dtype(dev)
    ddp: DistributedDataParallel | None = None
    try:
        while True:
            try:
                order = conn.recv()
            except (EOFError, OSError):
                return 0  # rank 0 is gone
            if order is None:
                return 0
            if order.rebuild or ddp is None:
                ddp = None  # the old replica goes before the new one is built
                model = build_model(cfg.model).to(dev)  # type: ignore[arg-type]
                # Said before DDP's first collective, so rank 0 waits out the build (which may take
                # long) on the pipe and the collective's short timeout only covers the copy.
                conn.send("built")
                ddp = _wrap(model, dev)
            elif order.sync:
                _broadcast_weights(ddp.module)
            if order.share is not None:
                rank_step(ddp, data, range(*order.share), rank=rank, world=world,
                          micro_batch_size=cfg.optimizer.micro_batch_size, autocast_dtype=amp)
            conn.send("done")
    except Exception as exc:  # noqa: BLE001 - a failed collective means rank 0 or another rank went away
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"psyche rank {rank}: stopping: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    finally:
        dist.destroy_process_group()


class RankGroup:
    """Ranks 1..N-1 of a node as child processes, and the process group this process (rank 0) shares with them."""

    def __init__(self, cfg: RunConfig, devices: list[str], *, data_location: str | None, timeout: float = RANK_TIMEOUT,
                 threads: int = 1) -> None:
        """Start the ranks and join them in a process group; raise :class:`RankFailure` if one
        cannot start (its reason is in the message)."""
        self.world = len(devices)
        self.timeout = timeout
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        # Children are started as `python -m psyche.client.ranks` (not multiprocessing's spawn,
        # which re-runs the parent's main script) and dial back to this listener.
        authkey = secrets.token_bytes(32)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        with tempfile.TemporaryDirectory(prefix="psyche-ranks-") as tmp, \
                Listener(os.path.join(tmp, "ranks.sock"), family="AF_UNIX", authkey=authkey) as listener:
            try:
                for r in range(1, self.world):
                    self.procs.append(subprocess.Popen(
                        [sys.executable, "-m", "psyche.client.ranks", str(listener.address)],
                        env={**os.environ, AUTHKEY_ENV: authkey.hex()}))
                    conn = self._accept(listener, r)
                    conn.send({"rank": r, "world": self.world, "threads": threads, "config": cfg.model_dump(mode="json"),
                               "data_location": data_location, "device": devices[r], "init_method": init_method,
                               "timeout": timeout})
                    self.conns.append(conn)
                for r, conn in enumerate(self.conns, start=1):
                    said = self._receive(r, conn, START_TIMEOUT, "start")
                    if said != "ready":
                        raise RankFailure(said)
                first = torch.device(devices[0])
                if first.type == "cuda":
                    torch.cuda.set_device(first)  # NCCL binds each process to its current device
                backend = "nccl" if first.type == "cuda" else "gloo"
                dist.init_process_group(backend, init_method=init_method, rank=0, world_size=self.world,
                                        timeout=timedelta(seconds=timeout))
            except BaseException:
                self.stop()
                raise

    def _accept(self, listener: Listener, rank: int) -> Connection:
        """The connection rank ``rank`` (just started) dials; :class:`RankFailure` if it exits first."""
        proc = self.procs[rank - 1]
        box: list[Connection] = []
        thread = threading.Thread(target=lambda: box.append(listener.accept()), daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while thread.is_alive():
            thread.join(0.05)
            if proc.poll() is not None:
                raise RankFailure(f"rank {rank} exited (code {proc.returncode}) during start")
            if time.monotonic() > deadline:
                raise RankFailure(f"rank {rank} did not start within {START_TIMEOUT:.0f}s")
        if not box:
            raise RankFailure(f"rank {rank} could not connect to rank 0")
        return box[0]

    def _receive(self, rank: int, conn: Connection, timeout: float, what: str) -> Any:
        """What rank ``rank`` says next; :class:`RankFailure` if it exits or stays silent ``timeout`` s."""
        proc = self.procs[rank - 1]
        deadline = time.monotonic() + timeout
        while not conn.poll(0.05):
            if proc.poll() is not None:
                raise RankFailure(f"rank {rank} exited (code {proc.returncode}) during {what}")
            if time.monotonic() > deadline:
                raise RankFailure(f"rank {rank} did not {what} within {timeout:.0f}s")
        try:
            return conn.recv()
        except (EOFError, OSError) as exc:
            raise RankFailure(f"rank {rank} exited (code {proc.poll()}) during {what}") from exc

    def dead(self) -> str | None:
        """Which rank is no longer running, if one is."""
        for r, proc in enumerate(self.procs, start=1):
            if proc.poll() is not None:
                return f"rank {r} exited (code {proc.returncode})"
        return None

    def send(self, order: StepOrder) -> None:
        """Give every rank ``order``; :class:`RankFailure` if one is gone."""
        if (why := self.dead()) is not None:
            raise RankFailure(why)
        for r, conn in enumerate(self.conns, start=1):
            try:
                conn.send(order)
            except OSError as exc:
                raise RankFailure(f"rank {r} exited (code {self.procs[r - 1].poll()})") from exc

    def built(self) -> None:
        """Wait (up to :data:`START_TIMEOUT`) for every rank to have built the replica a rebuild
        order asked for; :class:`RankFailure` if one exits or stays silent."""
        for r, conn in enumerate(self.conns, start=1):
            said = self._receive(r, conn, START_TIMEOUT, "build its replica")
            if said != "built":
                raise RankFailure(f"rank {r} said {said!r} where it should have built its replica")

    def finish(self) -> None:
        """Wait for every rank to end the step it was given."""
        for r, conn in enumerate(self.conns, start=1):
            self._receive(r, conn, self.timeout, "finish its step")

    def stop(self) -> None:
        """Stop every rank (asked, then killed) and leave the process group; safe to call twice."""
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        if dist.is_initialized():
            dist.destroy_process_group()


class NodeTrainer(LocalTrainer):
    """A :class:`~psyche.client.trainer.LocalTrainer` whose gradients come from several local
    ranks (one per device); everything else (DisTrO, verification, checkpoints, serving the
    model to peers) runs once, on rank 0, which holds the whole model."""

    def __init__(self, cfg: RunConfig, *, devices: list[str], data_location: str | None = None,
                 rank_timeout: float = RANK_TIMEOUT, **kwargs: Any) -> None:
        """Start the node's ranks (each device of ``devices`` is one; rank 0 is this process).
        Raises :class:`RankFailure` if a rank cannot start."""
        if len(devices) < 2:
            raise ValueError(f"a NodeTrainer needs at least 2 devices (got {devices}); use LocalTrainer")
        super().__init__(cfg, device=devices[0], data_location=data_location, **kwargs)
        self.devices = devices
        self.ranks = len(devices)
        self.rank_timeout = rank_timeout
        # Each CPU rank gets its part of the cores (a GPU rank's threads only feed its device).
        self.threads = max(1, (os.cpu_count() or 1) // self.ranks) if self.device.type == "cpu" else 1
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        self._ddp: DistributedDataParallel | None = None
        self._stale = False
        self.failures = 0
        self.group: RankGroup | None = None
        self.group = self._start()

    def _start(self) -> RankGroup:
        with self.timer.phase("ranks_start"):
            return RankGroup(self.cfg, self.devices, data_location=self.data_location, timeout=self.rank_timeout,
                             threads=self.threads)

    def _install(self, model: PreTrainedModel) -> None:
        super()._install(model)
        self._ddp = None  # the ranks rebuild their replica from this one at the next step

    def apply(self, step: int, payloads: list[bytes]) -> None:
        super().apply(step, payloads)
        if payloads:
            self._weights_changed()

    def _weights_changed(self) -> None:
        """Rank 0's weights changed (an apply, or a lookahead applied or undone): the ranks get them
        at the next step."""
        self._stale = True

    def own_samples(self, samples: range) -> range:
        """Rank 0's part of a share (the other ranks read their own parts)."""
        return contiguous_part(samples, 0, self.ranks)

    def gradients(self, samples: range, batch: torch.Tensor) -> StepStats:
        """The node's gradient of ``samples`` (``batch``: rank 0's part, :meth:`own_samples`) (see the module's docstring), clipped, in rank 0's
        ``.grad``. Raises :class:`RankFailure` (fatal after :data:`MAX_FAILURES` in a row) if a
        rank dies or a collective fails; the ranks are then stopped, and started again next time."""
        assert self.model is not None
        try:
            with self.timer.phase("ranks_sync"):  # orders out, and rank 0's new weights to every rank
                ddp = self._ranks_ready((samples.start, samples.stop))
            loss = rank_step(ddp, self.data.train, samples, rank=0, world=self.ranks,
                             micro_batch_size=self.cfg.optimizer.micro_batch_size, autocast_dtype=self.amp, batch=batch)
            assert self.group is not None
            self.group.finish()
        except RANK_ERRORS as exc:
            self._fail(exc)
        self.failures = 0
        return clip_gradients(self.model, loss, len(samples) * self.data.train.seq_len, self.cfg.optimizer.grad_clip)

    def prepare(self) -> None:
        """Start the ranks if they are down and give them the weights now (after warmup's model
        load, or an apply), so the next step trains at once: a first step that also built the
        replicas would look slow to the run's throughput estimate. :class:`RankFailure` as
        :meth:`gradients`."""
        if self.model is None or (self.group is not None and self._ddp is not None and not self._stale):
            return
        try:
            self._ranks_ready(None)
            assert self.group is not None
            self.group.finish()
        except RANK_ERRORS as exc:
            self._fail(exc)

    def _ranks_ready(self, share: tuple[int, int] | None) -> DistributedDataParallel:
        """Send every rank its order for ``share`` (starting them first if they are down), after
        which all hold rank 0's weights; the replica of rank 0 (this process)."""
        assert self.model is not None
        if self.group is None:
            self.group = self._start()
        order = StepOrder(share, rebuild=self._ddp is None, sync=self._stale)
        self.group.send(order)
        if order.rebuild:
            self.group.built()
            self._ddp = _wrap(self.model, self.device)
        elif order.sync:
            _broadcast_weights(self.model)
        self._stale = False
        assert self._ddp is not None
        return self._ddp

    def _fail(self, exc: BaseException) -> None:
        """Stop every rank, forget the replica, and raise :class:`RankFailure` for ``exc``."""
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if self.group is not None and (dead := self.group.dead()) is not None:
            why = dead  # the cause, rather than what the collective saw of it
        self._stale = False
        self.close()
        self.failures += 1
        fatal = self.failures >= MAX_FAILURES
        raise RankFailure(f"this node's ranks failed ({why})" + (f"; {self.failures} times in a row, giving up"
                                                                  if fatal else ""), fatal=fatal) from exc

    def close(self) -> None:
        """Stop the node's ranks (the next step starts them again and rebuilds their replicas)."""
        self._ddp = None
        if self.group is not None:
            self.group.stop()
            self.group = None


if __name__ == "__main__":
    # A child rank (started by RankGroup): dial rank 0 at argv[1] and follow its orders.
    _conn = Client(sys.argv[1], family="AF_UNIX", authkey=bytes.fromhex(os.environ.pop(AUTHKEY_ENV)))
    try:
        _code = _rank_main(_conn)
    finally:
        _conn.close()
    sys.exit(_code)
