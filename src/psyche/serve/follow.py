"""Following a live run: serve its newest checkpoint, and swap to each newer one it publishes.

A run's checkpointers write a ``save_pretrained`` folder at each cooldown and record it in
the coordinator (``Checkpoint``: step, location, sha256 of the weights). A
:class:`Follower` reads those records (from a coordinator server's status API, by
replaying the run on Solana, or from a checkpoint folder being rewritten on this machine), and when one is newer than what is served, copies the
folder it names into a private place, checks the weights against the recorded sha256,
loads the copy and hands it to the :class:`~psyche.serve.engine.Engine`, which swaps
between batches: requests in flight finish on the old model.

The copy is what makes this safe: a checkpointer replaces its folder in place at every
cooldown, so reading it straight could mix two checkpoints. A copy whose weights do not
match the record is of a newer checkpoint whose record has not arrived yet; it is
dropped, and the next poll tries again. A record whose folder this machine cannot read
(the checkpointer's disk is elsewhere) is said once, and the served model stays.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from psyche.serve.engine import InferenceEngine, ServedModel

log = logging.getLogger("psyche.serve")


@dataclass(frozen=True)
class Published:
    """A checkpoint a run recorded: the step its weights hold, where it was written, and
    the sha256 of its ``*.safetensors`` files (in name order)."""

    step: int
    location: str
    sha256: bytes


class FollowError(Exception):
    """The followed run cannot be read now (unreachable host, no such run); retried."""


class CheckpointSource(Protocol):
    """Where a :class:`Follower` reads a run's checkpoint records."""

    @property
    def run_id(self) -> str | None:
        """The run followed (None for a folder)."""
        ...

    def describe(self) -> str:
        """The run and host, for people (``run demo at http://...``)."""
        ...

    async def latest(self) -> Published | None:
        """The newest recorded checkpoint (None while there is none); raises :class:`FollowError`."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class ServerSource:
    """A run's checkpoint records from a coordinator server's status API (``GET /api/runs/{id}``)."""

    def __init__(self, url: str, run_id: str, *, http: httpx.AsyncClient | None = None):
        self.url = url.rstrip("/")
        self.run_id = run_id
        self.http = http or httpx.AsyncClient(timeout=10)

    def describe(self) -> str:
        return f"run {self.run_id} at {self.url}"

    async def latest(self) -> Published | None:
        try:
            r = await self.http.get(f"{self.url}/api/runs/{self.run_id}")
        except httpx.HTTPError as exc:
            raise FollowError(f"{self.url} cannot be reached ({type(exc).__name__}: {exc})") from None
        if r.status_code == 404:
            raise FollowError(f"{self.url} hosts no run {self.run_id!r}")
        if r.status_code != 200:
            raise FollowError(f"{self.url} answered the run's status with HTTP {r.status_code}")
        try:
            records = r.json().get("checkpoints") or []
            newest = max(records, key=lambda c: c["step"], default=None)
            if newest is None:
                return None
            return Published(int(newest["step"]), str(newest["location"]), bytes.fromhex(newest["sha256"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FollowError(f"{self.url} answered a status without readable checkpoint records ({exc})") from None

    async def close(self) -> None:
        await self.http.aclose()


class SolanaSource:
    """A run's checkpoint records from Solana: the run's transactions replayed (read only)."""

    def __init__(self, rpc: str, run_id: str):
        from psyche.ledger.solana.chain import connect
        from psyche.ledger.solana.ledger import RunSync

        self.rpc = rpc
        self.run_id = run_id
        self.chain = connect(rpc)
        self.sync = RunSync(self.chain, run_id)

    def describe(self) -> str:
        return f"run {self.run_id} on Solana at {self.rpc}"

    async def latest(self) -> Published | None:
        from psyche.ledger.base import LedgerError

        try:
            await self.sync.sync()
        except (LedgerError, OSError, httpx.HTTPError) as exc:
            raise FollowError(f"{self.rpc} cannot be read ({type(exc).__name__}: {exc})") from None
        coordinator = self.sync.replay.coordinator
        if coordinator is None:
            raise FollowError(f"no run {self.run_id!r} on the chain at {self.rpc} (not created yet?)")
        records = coordinator.state.checkpoints
        if not records:
            return None
        c = records[-1]
        return Published(c.step, c.location, bytes(c.sha256))

    async def close(self) -> None:
        await self.chain.close()


class FolderSource:
    """A checkpoint folder watched for newer checkpoints written in its place (``psyche train
    --checkpoint-every``, or a checkpointer's ``--checkpoint-dir`` on this machine).

    The step comes from the folder's ``psyche_state.json``; the weights are hashed only when
    it changes, so watching a large model costs one small read per poll.
    """

    run_id = None  # a folder is not a run

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._seen: Published | None = None

    def describe(self) -> str:
        return f"the checkpoint folder {self.folder}"

    async def latest(self) -> Published | None:
        import json

        from psyche.train.checkpoint import STATE_JSON

        try:
            state = json.loads((self.folder / STATE_JSON).read_text())
            step = int(state["step"])
        except FileNotFoundError:
            return None  # not written yet, or a folder without psyche's state: nothing newer to see
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FollowError(f"{self.folder / STATE_JSON}: unreadable ({exc})") from None
        if self._seen is None or self._seen.step != step:
            try:
                sha = await asyncio.to_thread(weights_sha256, self.folder)
            except OSError as exc:  # replaced while hashing: the next poll sees the new one
                raise FollowError(f"{self.folder}: changed while read ({exc})") from None
            self._seen = Published(step, str(self.folder), sha)
        return self._seen

    async def close(self) -> None:
        pass


def weights_sha256(folder: Path) -> bytes:
    """The sha256 a checkpointer records: its ``*.safetensors`` files, in name order."""
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.digest()


class CheckpointMoved(Exception):
    """The folder no longer holds the recorded checkpoint (a newer one replaced it)."""


def load_published(record: Published, engine: InferenceEngine, *, run_id: str | None, name: str | None) -> ServedModel:
    """Copy the folder ``record`` names, check its weights against the record and load the
    copy on ``engine``. Raises :class:`CheckpointMoved` on a mismatch and ``OSError`` if it
    cannot be read."""
    source = Path(record.location)
    with tempfile.TemporaryDirectory(prefix="psyche-serve-") as tmp:
        copy = Path(tmp) / source.name
        shutil.copytree(source, copy)
        if weights_sha256(copy) != record.sha256:
            raise CheckpointMoved(f"{source} no longer holds the checkpoint of step {record.step}")
        return engine.load(copy, name=name, step=record.step, run_id=run_id, source=str(source))


class Follower:
    """Keeps ``engine`` serving the newest checkpoint of the run ``source`` reads (module
    docstring), polling every ``poll_s`` seconds. ``say`` reports what happens, for people."""

    def __init__(self, source: CheckpointSource, engine: InferenceEngine, *, name: str | None = None,
                 poll_s: float = 5.0, say: Callable[[str], None] = log.info):
        self.source = source
        self.engine = engine
        self.name = name
        self.poll_s = poll_s
        self.say = say
        self._unreadable: str | None = None
        self._moved: Published | None = None
        self._last_problem: str | None = None

    async def run(self) -> None:
        """Follow until cancelled; never raises for the run's or the files' troubles."""
        self.say(f"following {self.source.describe()}: serving each checkpoint it publishes")
        try:
            while True:
                await self.poll_once()
                await asyncio.sleep(self.poll_s)
        finally:
            await self.source.close()

    async def poll_once(self) -> bool:
        """Look once; load and swap in a newer checkpoint if there is one. True if it swapped."""
        try:
            record = await self.source.latest()
        except FollowError as exc:
            self._problem(str(exc))
            return False
        self._last_problem = None
        served = self.engine.served
        if record is None or (served is not None and served.step is not None and record.step <= served.step):
            return False
        if record == self._moved:
            return False  # its folder holds a newer checkpoint already: wait for that one's record
        try:
            new = await asyncio.to_thread(load_published, record, self.engine, run_id=self.source.run_id,
                                          name=self.name or self.source.run_id)
        except CheckpointMoved as exc:
            log.debug("%s; waiting for its record", exc)
            self._moved = record  # not copied again: the folder only moves on
            return False
        except (OSError, ValueError) as exc:  # unreadable here, or not a model transformers loads
            if self._unreadable != record.location:
                self._unreadable = record.location
                self.say(f"the checkpoint of step {record.step} is at {record.location}, which this machine "
                         f"cannot read ({getattr(exc, 'strerror', None) or exc}); still serving "
                         + (f"step {served.step}" if served is not None else "nothing"))
            return False
        self.engine.swap(new)
        self.say(f"serving {new.name} at step {new.step} (from {record.location})")
        return True

    def _problem(self, message: str) -> None:
        if message != self._last_problem:  # say each new trouble once, not every poll
            self._last_problem = message
            self.say(f"{message}; retrying every {self.poll_s:g} s")
