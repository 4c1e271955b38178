"""Load on ``psyche server``: N members' signed traffic and V dashboard viewers, on loopback.

Starts the real ``psyche server`` as its own process (its CPU time, run-queue
wait and memory are read from outside, in ``/proc``) hosting a run that admits
``--members`` clients, then plays what that many real clients send, each member
with its own ed25519 key and nonces, one signed request at a time (as
``ServerLedger`` sends them), each over its own keep-alive connection:

1. idle: the server hosting the run, nobody connected but a probe
   (``GET /healthz`` every 0.05 s on its own connection): the baseline.
2. connect: every member opens the state feed (``/api/runs/{id}/ws?encoding=zlib``,
   as ``ServerLedger.watch`` does: each state compressed once by the server); every viewer opens
   the page's live feed (``/api/runs/{id}/live``, snapshot then deltas, applied
   as the page does) and the state feed.
3. join burst: all members send ``Join`` at once (``join_*``); the epoch starts
   and its warmup witnesses send ``WarmupWitness``.
4. steady, ``--duration`` s of rounds that really run: when a round starts (seen
   on the state feed), each trainer with a batch sends its metrics report
   (``POST .../reports``, the fields ``ClientRuntime._report`` sends) at a uniform
   30-100 % of ``--round-seconds``; then each of the round's witnesses (up to 32)
   sends its ``Witness`` instruction (Bloom filters of every trainer's result,
   ``arrivals_ms`` for every trainer, a score per result it checks) within
   ``--witness-spread`` of a round more: they all wait for the last result, so
   they come as a burst. The last one closes the round and starts the next. A
   round thus brings N reports, up to 32 instructions, and a state push to every
   feed per change. Viewers also poll ``GET /api/runs/{id}`` every
   ``--poll-seconds`` (the page only follows its live feed: this stands for
   scripts and monitors).

Prints one JSON line. Of the members' signed requests in the steady phase, as
the client sees them (an httpx exchange adds 1-5 ms on this machine): rates,
``p50_ms``/``p99_ms``/``max_ms`` and per kind, statuses (409 and 429 counted
apart; 5xx and ``transport``, i.e. no answer in the client's 10 s, are
``errors``). The join burst. The server's CPU (% of one core) and RSS idle and
under load, and ``server_cpu_wait_load_pct``: how long its event loop waited for
a core (other processes on the machine). The probe's p99 idle and under load and
their ratio (``probe_ratio``). What the feeds received; ``feed_failures``.
Every WebSocket is held by a second process (``feeds_cpu_pct``), so inflating
and decoding pushes does not delay the requests' timing; ``bench_cpu_pct`` and
``bench_loop_lag_p99_ms`` are the timing process's own CPU and event-loop lag
(when high, the load generator, not the server, set the pace). Measured
in-process after the server stopped (``c256_*``): what one Witness costs at 256
trainers and 32 witnesses: ``verification.assignments`` (once per Witness), the
coordinator's ``apply``, and the server's path without the pushes (host with
SQLite, the log's copy and events, the tick after it), with ``assignments``'
share of each; the state's size, compressed and not, and what one change costs to encode and
compress for every feed.
``meets_goal``: the issue's goal, a round's traffic of 256 members with
``p99_ms`` < 100 and no errors.

``psyche server``'s rate limits (per address and per key) are opened wide
(``--rate-limit``, reported as ``rate_limits``): all members come from
127.0.0.1, and the bench measures capacity, not the limiter (whose bookkeeping
still runs).

    python bench/load.py [--members 256] [--viewers 16] [--duration 30] [--round-seconds 2]
    python bench/load.py --quick            # 32 members, 4 viewers, 8 s: for CI
    python bench/load.py --no-member-feeds  # members hold no state feed: the pushes' share
    python bench/load.py --profile FILE     # the server under cProfile (its CPU figures then include it)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import tomli_w
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import WebSocketException

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from psyche.config import parse_config  # noqa: E402
from psyche.coordinator import (  # noqa: E402
    BloomFilter,
    Coordinator,
    CoordinatorSettings,
    Join,
    RunState,
    WarmupWitness,
    Witness,
    encode_instruction,
)
from psyche.coordinator import queries as q  # noqa: E402
from psyche.coordinator import verification  # noqa: E402
from psyche.dashboard.feed import apply_delta  # noqa: E402
from psyche.demo import free_port  # noqa: E402
from psyche.identity import Identity  # noqa: E402
from psyche.ledger.envelope import RequestKind, new_nonce, sign_request  # noqa: E402
from psyche.ledger.remote import MAX_STATE_BYTES, inflate  # noqa: E402
from psyche.ledger.host import STATE_COMPRESSION, RunHost  # noqa: E402
from psyche.ledger.status import run_events  # noqa: E402
from psyche.ledger.store import Store  # noqa: E402
from psyche.testing.coordinator_swarm import HONEST_SCORE, Swarm, result_commitment  # noqa: E402
from psyche.testing.network import wait_serving  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
GOAL_P99_MS = 100.0
"""The issue's goal: a round's traffic of 256 members handled with p99 below this."""
REQUEST_TIMEOUT_S = 10.0
"""Every HTTP request and WebSocket open gives up after this (the bench always ends)."""
IN_ROUND = (RunState.RoundTrain, RunState.RoundWitness)
WIDE_OPEN_RATE = "1000000/60"
"""The rate limit passed to the server (per address and per key, N/SECONDS): never reached here."""


class BenchFailed(Exception):
    """The load could not be played as planned (a phase did not happen in time, joins refused)."""


# --- the server process, seen from outside -----------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def run_delay_seconds(pid: int) -> float:
    """Time the process's main thread (the server's event loop) spent runnable but waiting for a
    core so far (``/proc/PID/schedstat``): high when other processes loaded the machine."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def own_cpu_seconds() -> float:
    """User + system CPU time of this process (the load generator) so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def rss_mb(pid: int) -> float:
    """Resident memory of a process now (``VmRSS`` in ``/proc/PID/status``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_config(members: int):
    """A run that starts its first epoch once all ``members`` joined and never leaves it during the bench."""
    return parse_config({
        "name": "bench-load",
        "coordinator": dict(warmup_time=120, cooldown_time=5, max_round_train_time=60, round_witness_time=5,
                            epoch_time=3600, total_steps=1_000_000, init_min_clients=members, min_clients=1,
                            witness_nodes=0, global_batch_size_start=4 * members, global_batch_size_end=4 * members,
                            waiting_for_members_extra_time=0, checkpointers=1, verifiers=3),
        "model": {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "seq_len": 128},
    })


def rate_limit_args(psyche_help: str, rate: str) -> tuple[list[str], dict | None]:
    """Options setting the server's rate limits to ``rate`` (N/SECONDS or off), per address and per
    key. The default opens them wide enough for the whole load (every member and viewer comes from
    127.0.0.1): the bench measures capacity, not the limiter, whose bookkeeping still runs on every
    request. None when this server has no such option."""
    args: list[str] = []
    given: dict = {}
    for option in ("--rate-limit-address", "--rate-limit-key"):
        if option in psyche_help:
            args += [option, rate]
            given[option.removeprefix("--rate-limit-")] = rate
    return args, given or None


# --- what the bench measures -------------------------------------------------------------------


@dataclass
class Recorder:
    """Latencies (ms) and statuses of requests, by kind; a status is an HTTP code or "transport"."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, Counter] = field(default_factory=dict)
    open: bool = True
    """Requests started while False are not recorded (outside the measured phase)."""

    def add(self, kind: str, ms: float, status: int | str) -> None:
        self.latencies.setdefault(kind, []).append(ms)
        self.statuses.setdefault(kind, Counter())[str(status)] += 1

    def all_ms(self, kinds: tuple[str, ...]) -> list[float]:
        return [x for k in kinds for x in self.latencies.get(k, [])]

    def status_counts(self, kinds: tuple[str, ...]) -> Counter:
        out: Counter = Counter()
        for k in kinds:
            out.update(self.statuses.get(k, Counter()))
        return out


def pct(xs: list[float], p: float) -> float | None:
    """The ``p``-th percentile (nearest rank) of ``xs``, rounded to 0.01; None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))], 2)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded to 0.1, None when either is missing (or ``b`` is 0)."""
    return round(a / b, 1) if a is not None and b else None


class Member:
    """One simulated client: its key, its nonces, and one signed request at a time."""

    def __init__(self, index: int, http: httpx.AsyncClient, run_id: str, rec: Recorder):
        self.index = index
        self.ident = Identity(hashlib.sha256(b"bench-load" + index.to_bytes(4, "little")).digest())
        self.id = self.ident.public_key
        self.http = http
        self.run_id = run_id
        self.rec = rec
        self._lock = asyncio.Lock()
        self._nonce = 0

    async def post(self, kind: str, what: RequestKind, body: bytes) -> int | str:
        """Sign and send one request, recording its latency (the HTTP exchange only) under ``kind``."""
        path = f"/api/runs/{self.run_id}/{'instructions' if what == 'instruction' else 'reports'}"
        async with self._lock:
            self._nonce = max(self._nonce + 1, new_nonce())
            signed = sign_request(self.ident, self.run_id, what, body, nonce=self._nonce)
            recording = self.rec.open
            t0 = time.perf_counter()
            try:
                resp = await self.http.post(path, content=signed, headers={"content-type": "application/msgpack"})
                status: int | str = resp.status_code
            except httpx.HTTPError:
                status = "transport"
            if recording:
                self.rec.add(kind, (time.perf_counter() - t0) * 1e3, status)
            return status


@dataclass
class FeedCount:
    """What one feed received; ``failed``: why it closed early, if it did."""

    connected: bool = False
    messages: int = 0
    bytes: int = 0
    last_size: int = 0
    failed: str | None = None


FEED_ERRORS = (OSError, TimeoutError, WebSocketException)


async def hold_state_feed(url: str, count: FeedCount) -> None:
    """Hold one state feed (``/ws?encoding=zlib``) as a client does, until cancelled, counting what
    it pushes (bytes on the wire; inflated, as every client does, but not decoded)."""
    try:
        async with ws_connect(url + "?encoding=zlib", max_size=2**27, open_timeout=REQUEST_TIMEOUT_S,
                              compression=None) as ws:
            count.connected = True
            async for msg in ws:
                count.messages += 1
                count.bytes += len(msg)
                count.last_size = len(msg)
                inflate(msg, MAX_STATE_BYTES)
        count.failed = "closed"
    except FEED_ERRORS as exc:
        count.failed = type(exc).__name__


async def follow_live_feed(url: str, count: FeedCount) -> None:
    """Follow the dashboard's live feed (``/live``) as the page does, until cancelled: the snapshot,
    then each delta applied to it."""
    doc = None
    try:
        async with ws_connect(url, max_size=2**27, open_timeout=REQUEST_TIMEOUT_S) as ws:
            count.connected = True
            async for raw in ws:
                msg = json.loads(raw)
                if msg["type"] == "snapshot":
                    doc = msg["data"]
                elif msg["type"] == "delta" and doc is not None:
                    doc = apply_delta(doc, msg)
                count.messages += 1
                count.bytes += len(raw)
        count.failed = "closed"
    except FEED_ERRORS as exc:
        count.failed = type(exc).__name__


def totals(counts: list[FeedCount]) -> dict:
    return {"connected": sum(c.connected for c in counts), "messages": sum(c.messages for c in counts),
            "bytes": sum(c.bytes for c in counts), "last_size": max((c.last_size for c in counts), default=0),
            "failed": dict(Counter(c.failed for c in counts if c.failed))}


def feeds_main(base_ws: str, run_id: str, state_feeds: int, live_feeds: int, conn: Connection) -> None:
    """The feeds process: hold ``state_feeds`` state feeds and ``live_feeds`` live feeds of the run;
    answer each message on ``conn`` with their totals, until told "stop"."""

    async def serve() -> None:
        state = [FeedCount() for _ in range(state_feeds)]
        live = [FeedCount() for _ in range(live_feeds)]
        tasks = [asyncio.create_task(hold_state_feed(f"{base_ws}/api/runs/{run_id}/ws", c)) for c in state]
        tasks += [asyncio.create_task(follow_live_feed(f"{base_ws}/api/runs/{run_id}/live", c)) for c in live]
        while (await asyncio.to_thread(conn.recv)) != "stop":
            conn.send({"state": totals(state), "live": totals(live)})
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(serve())


class Feeds:
    """Every WebSocket of the load (the members' and viewers' state feeds, the viewers' live feeds),
    held by a process of their own: inflating and decoding what they push would otherwise slow the
    event loop that times the requests."""

    def __init__(self, base_ws: str, run_id: str, state_feeds: int, live_feeds: int):
        self.n = state_feeds + live_feeds
        self._conn, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(
            target=feeds_main, args=(base_ws, run_id, state_feeds, live_feeds, child), daemon=True)
        self.process.start()
        assert self.process.pid is not None
        self.pid: int = self.process.pid

    async def totals(self) -> dict:
        """What the feeds received so far: ``{"state": ..., "live": ...}``, each with ``connected``,
        ``messages``, ``bytes``, ``last_size`` and ``failed`` (reason: count)."""
        def ask() -> dict:
            self._conn.send("totals")
            if not self._conn.poll(REQUEST_TIMEOUT_S):
                raise BenchFailed("the feeds process did not answer")
            return self._conn.recv()
        try:
            return await asyncio.to_thread(ask)
        except (EOFError, OSError) as exc:
            raise BenchFailed(f"the feeds process died ({exc!r})") from None

    async def connected(self, timeout: float) -> None:
        """Return once every feed is open (or failed); :class:`BenchFailed` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            t = await self.totals()
            opened = t["state"]["connected"] + t["live"]["connected"]
            if opened + sum(t["state"]["failed"].values()) + sum(t["live"]["failed"].values()) >= self.n:
                return
            if time.monotonic() > deadline:
                raise BenchFailed(f"{opened} of {self.n} feeds opened in {timeout:g} s")
            await asyncio.sleep(0.2)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


class Conductor:
    """One state feed, decoded: the bench's view of the run, woken on every push."""

    def __init__(self, url: str):
        self.url = url
        self.coord: Coordinator | None = None
        self.changed = asyncio.Event()

    async def run(self) -> None:
        async with ws_connect(self.url + "?encoding=zlib", max_size=2**27, open_timeout=REQUEST_TIMEOUT_S,
                              compression=None) as ws:
            async for msg in ws:
                if isinstance(msg, bytes):
                    self.coord = Coordinator.from_bytes(inflate(msg, MAX_STATE_BYTES))
                self.changed.set()

    async def until(self, done: Callable[[Coordinator], bool], timeout: float, what: str) -> Coordinator:
        """The state once ``done`` holds; :class:`BenchFailed` naming ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.coord is None or not done(self.coord):
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                s = self.coord.state if self.coord else None
                raise BenchFailed(f"{what} did not happen in {timeout:g} s "
                                 f"(run is {s.run_state.value if s else '?'}, {len(s.clients) if s else 0} clients)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return self.coord


async def poll_status(http: httpx.AsyncClient, run_id: str, rec: Recorder, every: float, stop: asyncio.Event) -> None:
    """A viewer's ``GET /api/runs/{id}`` every ``every`` seconds (from a random start), recorded as "status"."""
    await asyncio.sleep(random.uniform(0, every))
    while not stop.is_set():
        recording, t0 = rec.open, time.perf_counter()
        try:
            status: int | str = (await http.get(f"/api/runs/{run_id}")).status_code
        except httpx.HTTPError:
            status = "transport"
        if recording:
            rec.add("status", (time.perf_counter() - t0) * 1e3, status)
        await asyncio.sleep(every)


async def probe(http: httpx.AsyncClient, out: list[float], stop: asyncio.Event, every: float = 0.05) -> None:
    """``GET /healthz`` every ``every`` seconds on its own connection, latencies (ms) into ``out``."""
    while not stop.is_set():
        t0 = time.perf_counter()
        with contextlib.suppress(httpx.HTTPError):
            await http.get("/healthz")
            out.append((time.perf_counter() - t0) * 1e3)
        await asyncio.sleep(every)


async def loop_lag(out: list[float], stop: asyncio.Event, every: float = 0.05) -> None:
    """How late this process's own event loop wakes (ms): when high, the bench was the limit."""
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(every)
        out.append(max(0.0, (time.perf_counter() - t0 - every) * 1e3))


class Sampler:
    """The server's CPU % (of one core) over a window, the % of it its event loop waited for a core,
    and its largest RSS in it (sampled every 0.5 s)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.rss: list[float] = []
        self._t0 = self._c0 = self._d0 = 0.0

    def start(self) -> None:
        self.rss = [rss_mb(self.pid)]
        self._c0, self._d0, self._t0 = cpu_seconds(self.pid), run_delay_seconds(self.pid), time.perf_counter()

    async def sample(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(0.5)
            self.rss.append(rss_mb(self.pid))

    def stop(self) -> dict:
        cpu, wall = cpu_seconds(self.pid) - self._c0, time.perf_counter() - self._t0
        delay = run_delay_seconds(self.pid) - self._d0
        self.rss.append(rss_mb(self.pid))
        return {"cpu_pct": round(100 * cpu / wall, 1), "wait_pct": round(100 * delay / wall, 1),
                "rss_mb": round(max(self.rss), 1), "wall_s": wall}


# --- one round, as its members play it ---------------------------------------------------------


def report_body(step: int, seconds: float, tokens: int) -> bytes:
    """A trainer's metrics report as ``ClientRuntime._report`` sends it."""
    return json.dumps({"step": step, "loss": 3.0 + random.random(), "tokens": tokens, "train_seconds": seconds,
                       "forward_backward_seconds": 0.8 * seconds, "tokens_per_sec": tokens / seconds,
                       "result_bytes": 20_000, "bytes_sent": 400_000, "bytes_received": 5_000_000,
                       "bytes_sent_total": 400_000 * step, "bytes_received_total": 5_000_000 * step,
                       "peers": 255}).encode()


async def play_round(coord: Coordinator, members: dict[bytes, Member], round_s: float, spread: float,
                     stop: asyncio.Event) -> None:
    """What the members do in the round under way in ``coord``: reports, then witness reports."""
    s = coord.state
    r = q.current_round(s)
    assert r is not None
    batches = q.round_batches(s)
    done_at = {b.client: random.uniform(0.3, 1.0) * round_s for b in batches}
    tokens = {b.client: (b.end - b.start) * s.settings.seq_len for b in batches}
    received = {b.client: result_commitment(r.step, b.client, b.start, b.end) for b in batches}
    part = BloomFilter.for_items(received).to_bytes()
    bcast = BloomFilter.for_items(received.values()).to_bytes()
    merkle = hashlib.sha256(b"".join(sorted(received.values()))).digest()
    order = q.round_trainers(s)
    arrivals = [max(1, round(done_at[t] * 1000)) if t in done_at else 0 for t in order]

    async def train(m: Member, after: float) -> None:
        await asyncio.sleep(after)
        if not stop.is_set():
            await m.post("report", "report", report_body(r.step, after, tokens[m.id]))

    async def witness(m: Member) -> None:
        await asyncio.sleep(round_s * random.uniform(1.0, 1.0 + spread))
        if stop.is_set():
            return
        scores = [HONEST_SCORE for _ in q.verification_checks(s, m.id)]
        instr = Witness(step=r.step, participant_bloom=part, broadcast_bloom=bcast, broadcast_merkle=merkle,
                        loss=3.0, tokens_per_sec=1000.0, bandwidth_bytes=5_000_000, arrivals_ms=arrivals, scores=scores)
        await m.post("witness", "instruction", encode_instruction(instr))

    jobs = [train(members[c], t) for c, t in done_at.items() if c in members]
    jobs += [witness(members[w]) for w in q.round_witnesses(s) if w in members]
    await asyncio.gather(*jobs)


async def drive_rounds(conductor: Conductor, members: dict[bytes, Member], round_s: float, spread: float,
                       until: float, stop: asyncio.Event) -> list[asyncio.Task]:
    """Start each round's play as the round appears on the feed, until ``until`` (monotonic)."""
    started: set[int] = set()
    tasks: list[asyncio.Task] = []
    while time.monotonic() < until:
        coord = conductor.coord
        if coord is not None and coord.state.run_state in IN_ROUND:
            r = q.current_round(coord.state)
            if r is not None and r.step not in started:
                started.add(r.step)
                tasks.append(asyncio.create_task(play_round(coord, members, round_s, spread, stop)))
        conductor.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conductor.changed.wait(), max(0.0, min(0.5, until - time.monotonic())))
    return tasks


# --- what one Witness costs the server at 256 trainers (in-process) ---------------------------


def coordinator_costs(tmp: Path, n: int = 256, rounds: int = 3) -> dict:
    """What one Witness instruction costs the server at ``n`` trainers and 32 witnesses, in this
    process: ``verification.assignments`` (called once per Witness), the coordinator's whole
    ``apply``, and the server's whole path without the pushes (``RunHost.apply`` with SQLite,
    the log's copy and ``run_events``, the tick after it, as ``post_instruction`` does); and what
    one state change costs to push (encode and compress, once for every feed)."""
    settings = CoordinatorSettings(init_min_clients=n, min_clients=1, witness_nodes=0, epoch_time=10**9,
                                   max_round_train_time=60, round_witness_time=5, total_steps=10**6,
                                   global_batch_size_start=4 * n, global_batch_size_end=4 * n,
                                   waiting_for_members_extra_time=0, checkpointers=1, seq_len=128, verifiers=3)
    coord = Coordinator.new("bench", settings, authority=bytes(32), now=0)
    store = Store(tmp / "costs.sqlite")
    store.create_run("bench", {}, bytes(32), coord.to_bytes(), coord.digest())
    swarm = Swarm(coord)
    host = RunHost(coord, store=store, clock=lambda: swarm.now)
    logged = coord.copy()
    apply_ns: list[int] = []
    server_ns: list[int] = []
    real_apply = coord.apply

    def timed_apply(instr, signer, now, seed):
        t0 = time.perf_counter_ns()
        err = real_apply(instr, signer, now, seed)
        if isinstance(instr, Witness):
            apply_ns.append(time.perf_counter_ns() - t0)
        return err

    def server_path(instr, signer):
        """What post_instruction does with a verified instruction, but the pushes."""
        nonlocal logged
        t0 = time.perf_counter_ns()
        err = host.apply(instr, signer, nonce=time.time_ns())
        after = Coordinator.from_bytes(host.state_bytes())
        run_events(logged.state, after.state, name="bench")
        logged = after
        host.tick()
        if isinstance(instr, Witness):
            server_ns.append(time.perf_counter_ns() - t0)
        return err

    swarm.submit = server_path  # type: ignore[method-assign]
    swarm.join(range(n))
    swarm.run_until(lambda c: c.state.run_state is RunState.RoundTrain)
    coord.apply = timed_apply  # type: ignore[method-assign]
    for _ in range(rounds):  # rounds close with 32 reports each: the state reaches its steady size
        step = coord.state.step
        swarm.run_until(lambda c: c.state.step > step)
    coord.apply = real_apply  # type: ignore[method-assign]
    store.close()
    r = q.current_round(coord.state)
    assert r is not None
    state = coord.to_bytes()

    def per_call_ms(fn: Callable[[], object], k: int = 30) -> float:
        times = []
        for _ in range(k):
            t0 = time.perf_counter_ns()
            fn()
            times.append(time.perf_counter_ns() - t0)
        return statistics.median(times) / 1e6

    def compress() -> bytes:  # what RunHost.compressed_state does once per change, for every feed
        return zlib.compress(state, STATE_COMPRESSION)

    assign_ms = per_call_ms(lambda: verification.assignments(len(r.trainers), r.witnesses, r.verifiers))
    apply_ms = statistics.median(apply_ns) / 1e6
    server_ms = statistics.median(server_ns) / 1e6
    return {
        "trainers": len(r.trainers),
        "assignments_ms": round(assign_ms, 3),
        "witness_apply_ms": round(apply_ms, 3),
        "witness_server_ms": round(server_ms, 3),
        "assignments_share_of_apply": round(assign_ms / apply_ms, 2),
        "assignments_share_of_server": round(assign_ms / server_ms, 2),
        "state_bytes": len(state),
        "state_zlib_bytes": len(compress()),
        "push_ms_per_change": round(per_call_ms(coord.to_bytes) + per_call_ms(compress), 3),
    }


# --- the run -----------------------------------------------------------------------------------


def start_server(tmp: Path, members: int, port: int, rate: str,
                 profile: Path | None) -> tuple[subprocess.Popen, str, dict | None]:
    """``psyche server`` hosting a run for ``members`` on ``port``, answering; its run id and the rate
    limits passed to it."""
    cfg = run_config(members)
    (tmp / "run.toml").write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "psyche.cli"]
    help_text = subprocess.run([*cli, "server", "--help"], capture_output=True, text=True, env=env, cwd=ROOT,
                               timeout=60).stdout
    limits, rate_limits = rate_limit_args(help_text, rate)
    runner = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "psyche.cli"] if profile else cli
    log = open(tmp / "server.log", "wb")
    server = subprocess.Popen([*runner, "server", "--config", str(tmp / "run.toml"), "--db", str(tmp / "run.sqlite"),
                               "--port", str(port), "--key", str(tmp / "server.key"), *limits],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    if not wait_serving(url, server):
        raise SystemExit(f"bench/load.py: the server did not start; see {tmp / 'server.log'}")
    return server, cfg.run_id, rate_limits


async def load(args: argparse.Namespace, pid: int, url: str, run_id: str) -> dict:
    n, v = args.members, args.viewers
    base_ws = url.replace("http://", "ws://")
    rec = Recorder()
    stop_all = asyncio.Event()
    background: list[asyncio.Task] = []
    feeds: Feeds | None = None
    tls = ssl.create_default_context()  # unused on http://, but httpx would load the CA store per client

    def connection() -> httpx.AsyncClient:
        """One keep-alive connection, as each real client holds. (A shared pool of hundreds would
        make the bench the bottleneck: httpcore scans every connection for every request.)"""
        return httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, verify=tls,
                                 limits=httpx.Limits(max_connections=1))

    async with contextlib.AsyncExitStack() as clients:
        probe_http = await clients.enter_async_context(connection())
        try:
            lag: list[float] = []
            background.append(asyncio.create_task(loop_lag(lag, stop_all)))
            sampler = Sampler(pid)

            # 1. idle: the baseline.
            idle_probe: list[float] = []
            stop = asyncio.Event()
            sampler.start()
            idle_tasks = [asyncio.create_task(probe(probe_http, idle_probe, stop)),
                          asyncio.create_task(sampler.sample(stop))]
            await asyncio.sleep(args.idle)
            stop.set()
            await asyncio.gather(*idle_tasks)
            idle = sampler.stop()

            # 2. connect: members' state feeds, the viewers, the conductor's decoded feed.
            members = [Member(i, await clients.enter_async_context(connection()), run_id, rec) for i in range(n)]
            by_id = {m.id: m for m in members}
            n_feeds = (n if args.member_feeds else 0) + v
            feeds = Feeds(base_ws, run_id, n_feeds, v)
            for _ in range(v):
                http = await clients.enter_async_context(connection())
                background.append(asyncio.create_task(poll_status(http, run_id, rec, args.poll_seconds, stop_all)))
            conductor = Conductor(f"{base_ws}/api/runs/{run_id}/ws")
            background.append(asyncio.create_task(conductor.run()))
            await conductor.until(lambda c: True, REQUEST_TIMEOUT_S, "the first state push")
            await feeds.connected(60)
            await asyncio.sleep(1.0)  # the connection burst (snapshots) is not the join burst

            # 3. join burst, then warmup.
            t0 = time.perf_counter()
            pending = members
            for _ in range(3):  # a join that got no answer in time is sent again, as a client would
                joins = [m.post("join", "instruction", encode_instruction(Join(f"bench-{m.index}"))) for m in pending]
                answers = await asyncio.gather(*joins)
                if any(st not in (200, "transport") for st in answers):
                    raise BenchFailed(f"joins refused: {Counter(map(str, answers))}")
                pending = [m for m, st in zip(pending, answers) if st != 200]
                if not pending:
                    break
            join_s = time.perf_counter() - t0
            coord = await conductor.until(lambda c: c.state.run_state is RunState.Warmup, 30, "the epoch's start")
            warm = await asyncio.gather(*(by_id[w].post("warmup", "instruction", encode_instruction(WarmupWitness()))
                                          for w in by_id if q.is_warmup_witness(coord.state, w)))
            if not warm or any(st != 200 for st in warm):
                raise BenchFailed(f"warmup witness reports refused: {Counter(map(str, warm))}")
            coord = await conductor.until(lambda c: c.state.run_state is RunState.RoundTrain, 120, "round 0")

            # 4. steady: rounds for --duration seconds.
            rec.open = False
            rec.latencies = {k: vals for k, vals in rec.latencies.items() if k in ("join", "warmup")}
            rec.statuses = {k: c for k, c in rec.statuses.items() if k in ("join", "warmup")}
            load_probe: list[float] = []
            lag.clear()
            stop = asyncio.Event()
            step0 = coord.state.step
            feed0 = await feeds.totals()
            feeds_cpu0 = cpu_seconds(feeds.pid)
            sampler.start()
            own0 = own_cpu_seconds()
            rec.open = True
            steady = [asyncio.create_task(probe(probe_http, load_probe, stop)),
                      asyncio.create_task(sampler.sample(stop))]
            round_tasks = await drive_rounds(conductor, by_id, args.round_seconds, args.witness_spread,
                                             time.monotonic() + args.duration, stop)
            rec.open = False
            loaded = sampler.stop()
            own_pct = 100 * (own_cpu_seconds() - own0) / loaded["wall_s"]
            step1 = conductor.coord.state.step if conductor.coord else step0
            feeds_pct = 100 * (cpu_seconds(feeds.pid) - feeds_cpu0) / loaded["wall_s"]
            feed1 = await feeds.totals()
            feed_failures = Counter(feed1["state"]["failed"]) + Counter(feed1["live"]["failed"])
            lag_p99 = pct(lag, 99)
            stop.set()
            # Requests in flight finish (each bounded by its timeout); rounds not yet sent are dropped.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*round_tasks, *steady, return_exceptions=True),
                                       REQUEST_TIMEOUT_S + 5)
        finally:
            stop_all.set()
            for t in background:
                t.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if feeds is not None:
                await asyncio.to_thread(feeds.close)

    wall = loaded["wall_s"]
    signed = ("report", "witness")
    lat = rec.all_ms(signed)
    statuses = rec.status_counts(signed)
    errors = {k: c for k, c in statuses.items() if k not in ("200", "409", "429")}
    p99 = pct(lat, 99)
    rounds = step1 - step0

    def pushes(kind: str) -> int:
        return feed1[kind]["messages"] - feed0[kind]["messages"]

    return {
        "members": n,
        "viewers": v,
        "member_feeds": args.member_feeds,
        "duration_s": round(wall, 1),
        "round_seconds": args.round_seconds,
        "witness_spread": args.witness_spread,
        "rounds": rounds,
        "round_s_measured": round(wall / rounds, 2) if rounds else None,
        "requests": len(lat),
        "instructions_per_s": round(len(rec.latencies.get("witness", [])) / wall, 1),
        "reports_per_s": round(len(rec.latencies.get("report", [])) / wall, 1),
        "p50_ms": pct(lat, 50),
        "p99_ms": p99,
        "max_ms": round(max(lat), 2) if lat else None,
        "report_p99_ms": pct(rec.latencies.get("report", []), 99),
        "witness_p50_ms": pct(rec.latencies.get("witness", []), 50),
        "witness_p99_ms": pct(rec.latencies.get("witness", []), 99),
        "statuses": dict(sorted(statuses.items())),
        "refused_409": statuses.get("409", 0),
        "rate_limited_429": statuses.get("429", 0),
        "errors": dict(sorted(errors.items())),
        "status_polls": len(rec.latencies.get("status", [])),
        "status_poll_p99_ms": pct(rec.latencies.get("status", []), 99),
        "status_poll_errors": sum(c for k, c in rec.statuses.get("status", Counter()).items() if k != "200"),
        "join_s": round(join_s, 2),
        "join_statuses": dict(sorted(rec.statuses.get("join", Counter()).items())),
        "join_p50_ms": pct(rec.latencies.get("join", []), 50),
        "join_p99_ms": pct(rec.latencies.get("join", []), 99),
        "join_max_ms": round(max(rec.latencies.get("join", [0])), 2),
        "server_cpu_idle_pct": idle["cpu_pct"],
        "server_cpu_load_pct": loaded["cpu_pct"],
        "server_cpu_wait_load_pct": loaded["wait_pct"],
        "server_rss_idle_mb": idle["rss_mb"],
        "server_rss_load_mb": loaded["rss_mb"],
        "probe_p50_idle_ms": pct(idle_probe, 50),
        "probe_p50_load_ms": pct(load_probe, 50),
        "probe_p99_idle_ms": pct(idle_probe, 99),
        "probe_p99_load_ms": pct(load_probe, 99),
        "probe_ratio": ratio(pct(load_probe, 99), pct(idle_probe, 99)),
        "state_feeds": n_feeds,
        "state_pushes_per_feed_per_s": round(pushes("state") / max(1, n_feeds) / wall, 2),
        "state_push_mb_per_s": round((feed1["state"]["bytes"] - feed0["state"]["bytes"]) / 1e6 / wall, 1),
        "state_push_bytes": feed1["state"]["last_size"],
        "live_pushes_per_viewer_per_s": round(pushes("live") / max(1, v) / wall, 2),
        "feed_failures": dict(feed_failures),
        "bench_loop_lag_p99_ms": lag_p99,
        "bench_cpu_pct": round(own_pct, 1),
        "feeds_cpu_pct": round(feeds_pct, 1),
        "meets_goal": p99 is not None and p99 < GOAL_P99_MS and not errors and not feed_failures,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=256)
    ap.add_argument("--viewers", type=int, default=16)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of steady rounds measured")
    ap.add_argument("--round-seconds", type=float, default=2.0,
                    help="a round's training time: reports arrive over 30-100%% of it, witness reports just after")
    ap.add_argument("--witness-spread", type=float, default=0.1, metavar="FRACTION",
                    help="witness reports arrive over this fraction of a round after its training time")
    ap.add_argument("--poll-seconds", type=float, default=5.0, help="each viewer's GET /api/runs/{id} interval")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of the idle baseline")
    ap.add_argument("--no-member-feeds", dest="member_feeds", action="store_false",
                    help="members do not hold the state feed (to separate its cost)")
    ap.add_argument("--quick", action="store_true", help="32 members, 4 viewers, 8 s (CI)")
    ap.add_argument("--rate-limit", default=WIDE_OPEN_RATE, metavar="N/SECONDS",
                    help="the server's per-address and per-key rate limits (off: none; the default is never reached)")
    ap.add_argument("--profile", type=Path, help="run the server under cProfile, writing its stats here")
    args = ap.parse_args()
    if args.quick:
        args.members, args.viewers, args.duration, args.idle = 32, 4, 8.0, 3.0
    if not 1 <= args.members <= 256:
        raise SystemExit("bench/load.py: --members must be in 1..256 (the coordinator's MAX_CLIENTS)")

    # Each member and viewer holds sockets on both sides (the server inherits the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * (args.members + 3 * args.viewers) + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard) if hard != resource.RLIM_INFINITY else need, hard))

    tmp = Path(tempfile.mkdtemp(prefix="psyche-bench-load-"))
    port = free_port()
    profile = args.profile.resolve() if args.profile else None  # the server runs in the repository root
    server, run_id, rate_limits = start_server(tmp, args.members, port, args.rate_limit, profile)
    try:
        budget = args.idle + args.duration + 300  # every phase also has its own bound; this bounds them all
        out = asyncio.run(asyncio.wait_for(load(args, server.pid, f"http://127.0.0.1:{port}", run_id), budget))
    except (BenchFailed, TimeoutError) as exc:
        why = exc or "over its time budget"
        raise SystemExit(f"bench/load.py: {why}; the server's log: {tmp / 'server.log'}") from None
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    out["rate_limits"] = rate_limits
    out.update({f"c256_{k}": val for k, val in coordinator_costs(tmp).items()})
    print(json.dumps({"bench": "load", **out}))
    shutil.rmtree(tmp, ignore_errors=True)  # kept on failure, for the server's log


if __name__ == "__main__":
    main()
