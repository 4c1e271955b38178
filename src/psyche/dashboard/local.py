"""Live documents for the runs a :class:`~psyche.ledger.server.CoordinatorServer` hosts.

The status JSON is built at most once per change of the run (a new coordinator
state, or a client's metrics report) and at most every ``min_interval``
seconds, and only while somebody watches; :class:`~psyche.dashboard.feed.Feed`
then fans the same bytes out to every viewer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from psyche.dashboard.feed import Feed, cancel_tasks
from psyche.ledger.status import RoundOutcome, RunSummary, run_summary

if TYPE_CHECKING:
    from psyche.ledger.server import CoordinatorServer

log = logging.getLogger("psyche.dashboard")

MAX_OUTCOMES = 64
"""Rounds of witness outcomes a run's document keeps (the coordinator stores only the last four)."""


class LocalHub:
    """The runs list and each run's status as live feeds, built from a server in this process."""

    def __init__(self, server: CoordinatorServer, *, min_interval: float = 0.25):
        self.server = server
        self.min_interval = min_interval
        self._runs_feed: Feed | None = None
        self._run_feeds: dict[str, Feed] = {}
        self._dirty: dict[str | None, asyncio.Event] = {}  # None: the runs list
        self._outcomes: dict[str, dict[tuple[int, int], RoundOutcome]] = {}
        self._tasks: list[asyncio.Task] = []
        self.builds = 0
        """How many documents were built (the benchmark reads it)."""

    # -- what the routes ask ---------------------------------------------------

    def runs_feed(self) -> Feed:
        """The feed of the runs list (one summary per run)."""
        if self._runs_feed is None:
            self._runs_feed = self._start(None, deltas=False)
        return self._runs_feed

    def run_feed(self, run_id: str) -> Feed | None:
        """The feed of one run's status, or None if this server hosts no such run."""
        if run_id not in self.server.hosts:
            return None
        feed = self._run_feeds.get(run_id)
        if feed is None:
            host = self.server.hosts[run_id]
            host.listeners.append(lambda _coord: self.mark(run_id))
            feed = self._run_feeds[run_id] = self._start(run_id, deltas=True)
        return feed

    def mark(self, run_id: str) -> None:
        """Note that ``run_id`` changed (its state, or a new metrics report)."""
        for key in (run_id, None):
            event = self._dirty.get(key)
            if event is not None:
                event.set()

    async def close(self) -> None:
        """Stop building documents."""
        await cancel_tasks(self._tasks)

    # -- building --------------------------------------------------------------

    def build_runs(self) -> list[RunSummary]:
        """The runs list now."""
        self.builds += 1
        return [run_summary(h.coordinator, self.server.configs[rid]) for rid, h in self.server.hosts.items()]

    def build_run(self, run_id: str) -> dict[str, Any]:
        """One run's status now, with the witness outcomes of every round seen since startup
        (``witness_outcomes``, instead of the status's ``rounds``: the coordinator keeps only the last few)."""
        self.builds += 1
        status = self.server.status(run_id)
        seen = self._outcomes.setdefault(run_id, {})
        for r in status["rounds"]:
            seen[(r["epoch"], r["step"])] = r
        doc: dict[str, Any] = {k: v for k, v in status.items() if k != "rounds"}
        for key in sorted(seen)[:-MAX_OUTCOMES]:
            del seen[key]
        doc["witness_outcomes"] = [seen[k] for k in sorted(seen)]
        return doc

    def _start(self, key: str | None, *, deltas: bool) -> Feed:
        dirty = self._dirty[key] = asyncio.Event()
        dirty.set()
        build = self.build_runs if key is None else (lambda: self.build_run(key))
        # A new viewer gets the last document at once, then a fresh one (its clock, ages).
        feed = Feed(deltas=deltas, on_subscribe=dirty.set)
        self._tasks.append(asyncio.get_running_loop().create_task(self._pump(feed, dirty, build, key)))
        return feed

    async def _pump(self, feed: Feed, dirty: asyncio.Event, build, key: str | None) -> None:
        while True:
            await feed.watched()
            await dirty.wait()
            dirty.clear()
            started = time.perf_counter()
            try:
                feed.publish(build())
            except Exception:  # a bad build must not stop the page from updating later
                log.exception("building the dashboard document for %s failed", key or "the runs list")
            # Changes arrive in bursts (ticks, witness reports, metrics): coalesce them.
            await asyncio.sleep(max(self.min_interval, 4 * (time.perf_counter() - started)))
