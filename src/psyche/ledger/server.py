"""``psyche server``: one coordinator service over HTTP + WebSocket, persisted in SQLite.

Endpoints (JSON unless noted):

- ``GET  /api/runs``                         every run's summary
- ``GET  /api/runs/{run_id}``                a run's status: state, epoch, step, clients, history
- ``GET  /api/runs/{run_id}/state``          the coordinator state (msgpack bytes, for clients)
- ``WS   /api/runs/{run_id}/ws``             the coordinator state pushed on every change (binary)
- ``POST /api/runs/{run_id}/instructions``   a signed instruction (msgpack :class:`SignedRequest`)
- ``POST /api/runs/{run_id}/reports``        a member's signed metrics for a step
- ``GET  /metrics``                          Prometheus text format
- ``GET  /healthz``

The server ticks the coordinator on its own clock. Every applied instruction is
written to SQLite with the state it produced in one transaction, so a server
restarted with the same ``--db`` continues the run where it was.

Limits (:mod:`psyche.httplimits`; README, "Limits"): a body is refused with 413 from its
``Content-Length`` before a byte of it is read, or cut once it passes the cap: 64 KiB for
instructions and reports (the largest instruction, a witness report over 256 trainers, is
about 10 KB), 1 KiB elsewhere. A body with no byte for 10 s or not whole in 30 s is cut with
408. Each client address may make 20000 requests in any 60 s (``--rate-limit-address``), each
signer key 600 signed requests in any 60 s (``--rate-limit-key``, checked once the envelope is
opened, before any coordinator sees it); over it, 429 with ``Retry-After``. At most 2048
WebSockets are open, 512 from one address (beyond: closed with 1013), and a WebSocket message
over 64 KiB closes its socket (1009). Each refusal is counted in ``psyche_requests_rejected``.

In FastAPI's idiom: the routes get the run's host from a dependency
(:func:`run_host`, a 404 for an unknown run), raise what they refuse
(:class:`RequestRefused`, or the coordinator's own error) and return typed
documents (:mod:`psyche.ledger.status`); :func:`create_app` maps every refusal to
its status and an :class:`ErrorBody` in one place. ``/docs`` shows it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import HTTPConnection
from pydantic import BaseModel, Field

from psyche.config import RunConfig, parse_config
from psyche.coordinator import Coordinator, CoordinatorError, decode_instruction
from psyche.coordinator import RunState
from psyche.coordinator import queries as q
from psyche.coordinator.state import decode_state_without_rounds
from psyche.httplimits import Guard, Limits, RateLimiter
from psyche.ledger.envelope import RequestKind, SignedRequest, open_request
from psyche.ledger.host import RunHost
from psyche.ledger.prometheus import render_metrics
from psyche.ledger.status import StatusCache, RunStatus, RunSummary, run_events, run_status, run_summary
from psyche.ledger.store import Store
from psyche.wsutil import until_closed

log = logging.getLogger("psyche.server")


RESTART_GRACE_S = 6.0
"""After a restart, how long a resumed run's clock is held (no ticks). While the server was
down, clients kept the reports and witness verdicts it could not take and resend them every
2 s (ServerLedger's retry); without the grace the first tick would find the round's deadline
past and drop every member whose report is still in flight, for the server's own outage."""


PUSH_INTERVAL_S = 0.1
"""The longest a change may wait to be pushed to a run's state feeds. Changes that come closer
together than the push interval go out together as the latest state: with 256 members a push wakes
and writes to each of their feeds, and a round's 32 witness reports come within a fraction of a
second."""
PUSH_COST_S = 0.0004
"""The push interval per feed: pushes to N feeds are at least N times this apart (capped at
PUSH_INTERVAL_S), so a run of a few members gets every change at once and one of 256 at most ten
pushes a second."""


class StatePushes:
    """When a run's state feeds push: after a change, at most every :data:`PUSH_INTERVAL_S`.

    One task per run follows the changes; the feeds wait on it, so a change wakes one task and a
    push wakes each feed once, however many changes it carries (each feed waiting on the changes
    itself cost every feed a wake-up per change: most of a busy server's time at 256 members).
    """

    def __init__(self, host: RunHost):
        self.host = host
        self.seq = host.seq
        """The seq of the latest state pushed."""
        self.feeds = 0
        """Feeds open on the run (the handlers count themselves in and out)."""
        self._pushed = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def due(self, seen: int) -> int:
        """Wait until a state after seq ``seen`` is pushed; its seq."""
        while self.seq <= seen:
            await self._pushed.wait()
        return self.seq

    async def run(self) -> None:
        """Follow the run's changes forever, pushing the latest after each, the pushes spaced by
        PUSH_COST_S a feed (at most PUSH_INTERVAL_S)."""
        while True:
            await self.host.wait_changed(self.seq)
            self.seq = self.host.seq
            pushed, self._pushed = self._pushed, asyncio.Event()
            pushed.set()
            await asyncio.sleep(min(PUSH_INTERVAL_S, self.feeds * PUSH_COST_S))


class CoordinatorServer:
    """The runs a server hosts, their database, and counters of what it refused."""

    def __init__(self, store: Store, *, host_key: bytes = bytes(32), tick_interval: float = 0.25,
                 inference_url: str | None = None):
        self.store = store
        self.host_key = host_key
        self.tick_interval = tick_interval
        # An OpenAI client's base URL ends in /v1; the status gives the server's root either way.
        self.inference_url = inference_url.rstrip("/").removesuffix("/v1") if inference_url else None
        """Where the runs' model answers completions (``psyche server --inference-url``), or None;
        each run's status carries it, for the dashboard's "Try it" box."""
        self.hosts: dict[str, RunHost] = {}
        self.configs: dict[str, RunConfig] = {}
        self.rejected: Counter[str] = Counter()
        self._pushes: dict[str, StatePushes] = {}
        self.status_caches: dict[str, StatusCache] = {}
        """Per run: what its status keeps between builds (reports, history, round outcomes)."""
        self._logged: dict[str, tuple[int, Coordinator]] = {}
        """Per run: the seq and state the log last described (events are what changed since)."""
        self._clock_held_until: dict[str, float] = {}
        """Per resumed run: the monotonic time its clock starts again (see RESTART_GRACE_S)."""
        for stored in store.runs():
            cfg = parse_config(stored.config, f"{store.path}: run {stored.run_id}")
            coord = Coordinator.from_bytes(stored.state)
            self._add(cfg, RunHost(coord, store=store, seq=stored.seq, host_key=host_key))
            log.info("resumed run %s at seq %d after step %d of %d (%s)", cfg.run_id, stored.seq,
                     q.steps_completed(coord.state), coord.state.settings.total_steps, coord.state.run_state.value)
            if coord.state.run_state not in (RunState.Finished, RunState.Paused):  # no clock runs there
                self._clock_held_until[cfg.run_id] = time.monotonic() + RESTART_GRACE_S
                log.info("run %s: its clock starts in %g s, when clients have resent what they kept", cfg.run_id,
                         RESTART_GRACE_S)

    def _add(self, cfg: RunConfig, host: RunHost) -> None:
        self.hosts[cfg.run_id] = host
        self.configs[cfg.run_id] = cfg
        self._logged[cfg.run_id] = (host.seq, Coordinator(decode_state_without_rounds(host.state_bytes())))

    def pushes(self, run_id: str) -> StatePushes:
        """When ``run_id``'s state feeds push (its task started on first use, in the running loop)."""
        pushes = self._pushes.get(run_id)
        loop = asyncio.get_running_loop()
        if pushes is None or pushes.task is None or pushes.task.done() or pushes.task.get_loop() is not loop:
            pushes = self._pushes[run_id] = StatePushes(self.hosts[run_id])
            pushes.task = loop.create_task(pushes.run())
        return pushes

    def stop_pushes(self) -> None:
        """Stop every run's push task (the app shuts down)."""
        for pushes in self._pushes.values():
            if pushes.task is not None:
                pushes.task.cancel()
        self._pushes.clear()

    def status(self, run_id: str) -> RunStatus:
        """The full status of a hosted run, built from what changed since the last one (:class:`StatusCache`)."""
        cache = self.status_caches.setdefault(run_id, StatusCache())
        return run_status(self.hosts[run_id], self.configs[run_id], self.store, cache=cache,
                          inference_url=self.inference_url)

    def add_report(self, run_id: str, signer: bytes, step: int, report: dict, nonce: int) -> None:
        """Store a member's metrics report (checked and cleaned by the caller)."""
        received = self.store.add_report(run_id, signer, step, report, nonce)
        self.status_caches.setdefault(run_id, StatusCache()).added(signer, step, report, received)

    def log_changes(self, host: RunHost, *, origin: str | None = None) -> None:
        """Log (INFO) what happened to ``host``'s run since the last call: joins, departures,
        epochs, steps, pause/resume, the end. ``origin``: who sent the change (a join's address)."""
        seq, before = self._logged[host.run_id]
        if host.seq == seq:
            return
        after = Coordinator(decode_state_without_rounds(host.state_bytes()))  # a copy; the events need no rounds
        self._logged[host.run_id] = (host.seq, after)
        for line in run_events(before.state, after.state, name=self.configs[host.run_id].name, origin=origin):
            log.info("%s: %s", host.run_id, line)

    def tick(self, host: RunHost) -> None:
        """Let time pass for one run, logging what it changed (nothing during a restart's grace)."""
        held = self._clock_held_until.get(host.run_id)
        if held is not None:
            if time.monotonic() < held:
                return
            del self._clock_held_until[host.run_id]
        host.tick()
        self.log_changes(host)

    def create_run(self, cfg: RunConfig, authority: bytes) -> RunHost:
        """Host a new run (or return the existing one of that id, unchanged)."""
        if cfg.run_id in self.hosts:
            if self.configs[cfg.run_id].digest() != cfg.digest():
                log.warning("run %s exists in the database with another config; keeping the stored one", cfg.run_id)
            return self.hosts[cfg.run_id]
        coord = Coordinator.new(cfg.run_id, cfg, authority=authority, now=int(time.time()))
        host = RunHost(coord, store=self.store, host_key=self.host_key)
        self.store.create_run(cfg.run_id, cfg.model_dump(mode="json"), authority, host.coordinator.to_bytes(), host.coordinator.digest())
        self._add(cfg, host)
        log.info("created run %s", cfg.run_id)
        return host

    async def run_clocks(self) -> None:
        """Tick every hosted run forever."""
        while True:
            for host in list(self.hosts.values()):
                try:
                    self.tick(host)
                except Exception:  # a bug in one run must not stop the others' clocks
                    log.exception("tick failed for run %s", host.run_id)
            await asyncio.sleep(self.tick_interval)


# --- refusals: one exception per kind, mapped to a response in one place (create_app) --------


class ErrorBody(BaseModel):
    """The JSON body of every refusal; clients (:class:`psyche.ledger.remote.ServerLedger`) read both fields."""

    error: str = Field(description="The refusal's name: a coordinator error (NotAMember, ...), BadRequest, "
                                   "StaleNonce, UnknownRun, PayloadTooLarge, RequestTimeout or RateLimited.")
    message: str = Field(description="What was wrong, for a person.")


class RequestRefused(Exception):
    """A request the server refuses before any coordinator sees it, counted in
    ``psyche_requests_rejected{reason}``. Subclasses set the status and the error name.

    ``RequestRefused``
     ├── ``MalformedRequest``      400 BadRequest: bad envelope, bad signature, undecodable body
     ├── ``ReportFromNonMember``   403 NotAMember: metrics from someone not training in the run
     ├── ``StaleNonce``            409 StaleNonce: a nonce not above the signer's last one (a replay)
     └── ``KeyRateLimited``        429 RateLimited: the signer sent more than its key's rate (Retry-After)

    Refused before the app reads a request (:class:`psyche.httplimits.Guard`): 413
    PayloadTooLarge, 408 RequestTimeout, and 429 RateLimited for an address over its rate.

    What the coordinator itself refuses is a :class:`~psyche.coordinator.CoordinatorError`:
    409, named by its class.
    """

    status_code: ClassVar[int]
    error: ClassVar[str]

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        """The label it is counted under in ``CoordinatorServer.rejected``."""
        self.message = message
        self.headers: dict[str, str] = {}
        """Headers of the refusal (a 429's Retry-After)."""


class MalformedRequest(RequestRefused):
    """The request does not decode or verify: we cannot even tell what was asked."""

    status_code = 400
    error = "BadRequest"


class ReportFromNonMember(RequestRefused):
    """Only members of the run may report metrics."""

    status_code = 403
    error = "NotAMember"


class StaleNonce(RequestRefused):
    """The signer used this nonce or a higher one before: a replayed request."""

    status_code = 409
    error = "StaleNonce"


class KeyRateLimited(RequestRefused):
    """The signer sent more signed requests than its key's rate; it may again in ``retry_after`` s."""

    status_code = 429
    error = "RateLimited"

    def __init__(self, message: str, retry_after: int):
        super().__init__("rate_limited", message)
        self.headers["Retry-After"] = str(retry_after)


# --- the status API's other bodies ------------------------------------------------------------


class Health(BaseModel):
    """``GET /healthz``."""

    ok: bool
    runs: int = Field(description="Runs this server hosts.")


class Applied(BaseModel):
    """An instruction the coordinator accepted (``POST .../instructions``)."""

    ok: bool
    seq: int = Field(description="Instructions applied to the run so far, this one included.")
    step: int = Field(description="The coordinator's step after it (and the tick it may have completed).")


class Accepted(BaseModel):
    """A metrics report the server stored (``POST .../reports``)."""

    ok: bool


BODY_CAP = 64 * 1024
"""The largest body of a signed request, in bytes: the largest instruction the coordinator
decodes (a witness report over 256 trainers: two 4 KiB bloom filters, arrivals and scores) is
about 10 KB, a report a few hundred bytes."""

RATE_LIMITED: dict[str, Any] = {
    "model": ErrorBody, "headers": {"Retry-After": {"description": "Whole seconds until it may again.",
                                                    "schema": {"type": "integer"}}},
    "description": "RateLimited: the client address (any request), or the signer key (signed requests), "
                   "sent more than its rate."}

REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed: bad envelope, bad signature or undecodable body."},
    404: {"model": ErrorBody, "description": "This server hosts no such run."},
    408: {"model": ErrorBody, "description": "RequestTimeout: no byte of the body for 10 s, or not all of it in 30 s "
                                             "(by default)."},
    409: {"model": ErrorBody, "description": "Refused by the coordinator (named by its error), or a replayed nonce."},
    413: {"model": ErrorBody, "description": f"PayloadTooLarge: a body over {BODY_CAP // 1024} KiB, refused "
                                             "from its Content-Length before it is read (or cut at the cap)."},
    429: RATE_LIMITED,
}
"""The refusals of a signed request, as ``/openapi.json`` documents them."""


# --- dependencies -----------------------------------------------------------------------------


# Both are ``async``: FastAPI runs a plain ``def`` dependency in a worker thread, a hop per
# request that cost more than the dependency itself under load.
async def coordinator_server(conn: HTTPConnection) -> CoordinatorServer:
    """The server whose runs the app serves (``app.state.server``), for HTTP and WebSocket routes."""
    return conn.app.state.server


Server = Annotated[CoordinatorServer, Depends(coordinator_server)]


async def run_host(run_id: str, server: Server) -> RunHost:
    """The host of run ``run_id``, or a 404 naming the run and where the runs are listed."""
    host = server.hosts.get(run_id)
    if host is None:
        message = f"no run {run_id!r} here; GET /api/runs lists them"
        raise HTTPException(404, detail=ErrorBody(error="UnknownRun", message=message).model_dump())
    return host


Host = Annotated[RunHost, Depends(run_host)]


Body = TypeVar("Body")


async def signed_request(request: Request, run_id: str, kind: RequestKind, decode: Callable[[bytes], Body], *,
                         reason: str) -> tuple[SignedRequest, Body]:
    """The request's envelope, verified (for this run, of this kind, signed by its signer), and
    its body as ``decode`` reads it, once the signer is within its key's rate. ``reason``: what
    a malformed one is counted as, an envelope that does not verify or a body ``decode``
    refuses with ``ValueError``."""
    try:
        req = open_request(await request.body(), run_id=run_id, kind=kind)
    except ValueError as exc:
        raise MalformedRequest(reason, str(exc)) from None
    # The signer is known now: its rate is checked before any coordinator or database sees it.
    per_key: RateLimiter = request.app.state.per_key
    if (wait := per_key.hit(req.signer.hex())) is not None:
        assert per_key.rate is not None
        raise KeyRateLimited(f"key {req.signer.hex()[:16]}... sent more than {per_key.rate.count} signed requests "
                             f"in {per_key.rate.seconds} s; retry in {wait} s", wait)
    try:
        return req, decode(req.body)
    except ValueError as exc:
        raise MalformedRequest(reason, str(exc)) from None


def decode_report(body: bytes) -> dict[str, Any]:
    """A report's body: a JSON object with an integer ``step`` in ``0..2**63-1``, what SQLite
    stores (``ValueError`` otherwise)."""
    try:
        report = json.loads(body)
    except RecursionError:  # arrays nested deeper than the parser goes: no report either
        raise ValueError("a report is a JSON object, not values nested this deep") from None
    step = report.get("step") if isinstance(report, dict) else None
    if not isinstance(step, int) or not 0 <= step <= 2**63 - 1:
        raise ValueError("a report is a JSON object with an integer 'step' in 0..2**63-1")
    return report


def require_fresh_nonce(server: CoordinatorServer, run_id: str, req: SignedRequest) -> None:
    """Refuse a request whose nonce is not above its signer's last one (a replay)."""
    if req.nonce <= server.store.last_nonce(run_id, req.signer):
        raise StaleNonce("stale_nonce", "nonce not above the signer's last one (a replayed request?)")


# --- routes -----------------------------------------------------------------------------------

router = APIRouter(responses={429: RATE_LIMITED})


@router.get("/healthz")
async def healthz(server: Server) -> Health:
    """Whether the server is up, and how many runs it hosts."""
    return Health(ok=True, runs=len(server.hosts))


@router.get("/api/runs")
async def list_runs(server: Server) -> list[RunSummary]:
    """Every run this server hosts, summed up."""
    return [run_summary(h.coordinator, server.configs[rid]) for rid, h in server.hosts.items()]


@router.get("/api/runs/{run_id}", responses={404: REFUSALS[404]})
async def get_run(run_id: str, host: Host, server: Server) -> RunStatus:
    """A run's full status: its state, members, history, checkpoints and config."""
    return server.status(run_id)


@router.get("/api/runs/{run_id}/state", response_class=Response,
            responses={200: {"content": {"application/msgpack": {}},
                             "description": "The coordinator state (``Coordinator.from_bytes``); "
                                            "header x-psyche-seq: instructions applied."},
                       404: REFUSALS[404]})
async def get_state(host: Host) -> Response:
    """The coordinator state as msgpack bytes, for clients."""
    return Response(host.state_bytes(), media_type="application/msgpack",
                    headers={"x-psyche-seq": str(host.seq)})


@router.websocket("/api/runs/{run_id}/ws")
async def state_feed(ws: WebSocket, run_id: str, server: Server,
                     encoding: Literal["msgpack", "zlib"] = "msgpack") -> None:
    """The coordinator state (msgpack bytes), pushed on every change; closed with 4404 for an unknown run.

    ``?encoding=zlib``: each message is the state zlib-compressed (``zlib.decompress`` gives the
    msgpack), compressed once per change for every feed; clients then leave the connection's own
    compression off. Without it, the plain msgpack (which permessage-deflate, if negotiated,
    compresses again for each feed)."""
    host = server.hosts.get(run_id)
    if host is None:
        await ws.close(code=4404)
        return
    await ws.accept()
    message = host.compressed_state if encoding == "zlib" else host.state_bytes
    pushes = server.pushes(run_id)
    pushes.feeds += 1
    closed = asyncio.ensure_future(until_closed(ws))
    try:
        while not closed.done():
            seq = host.seq
            await ws.send_bytes(message())
            # Since the seq just sent: a change applied during the send must not wait for a later one.
            due = asyncio.ensure_future(pushes.due(seq))
            await asyncio.wait({due, closed}, return_when=asyncio.FIRST_COMPLETED)
            due.cancel()
    except (WebSocketDisconnect, RuntimeError, ConnectionError):
        return
    finally:
        pushes.feeds -= 1
        closed.cancel()


@router.post("/api/runs/{run_id}/instructions", responses=REFUSALS,
             openapi_extra={"requestBody": {"required": True, "content": {"application/msgpack": {}},
                                            "description": "A SignedRequest (psyche.ledger.envelope) of kind "
                                                           "instruction, its body an encoded instruction."}})
async def post_instruction(run_id: str, request: Request, host: Host, server: Server) -> Applied:
    """Apply one signed instruction to the run's coordinator."""
    req, instruction = await signed_request(request, run_id, "instruction", decode_instruction, reason="bad_request")
    require_fresh_nonce(server, run_id, req)
    if (err := host.apply(instruction, req.signer, nonce=req.nonce)) is not None:
        raise err
    server.log_changes(host, origin=f"{request.client.host}:{request.client.port}" if request.client else None)
    # A phase this instruction completed (say the last witness report) moves on now,
    # not at the next clock tick: every trainer would idle until then.
    server.tick(host)
    return Applied(ok=True, seq=host.seq, step=host.coordinator.state.step)


@router.post("/api/runs/{run_id}/reports", responses={**REFUSALS, 403: {"model": ErrorBody, "description": "Not a member."}},
             openapi_extra={"requestBody": {"required": True, "content": {"application/msgpack": {}},
                                            "description": "A SignedRequest of kind report, its body a JSON object "
                                                           "with an integer step and the metrics of REPORT_FIELDS."}})
async def post_report(run_id: str, request: Request, host: Host, server: Server) -> Accepted:
    """Store a member's signed metrics for a step."""
    req, report = await signed_request(request, run_id, "report", decode_report, reason="bad_report")
    if q.member(host.coordinator.state, req.signer) is None:
        raise ReportFromNonMember("non_member_report", "only members of the run may report metrics")
    require_fresh_nonce(server, run_id, req)
    server.add_report(run_id, req.signer, report["step"], _clean_report(report), req.nonce)
    return Accepted(ok=True)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(server: Server) -> Response:
    """The runs in Prometheus text format."""
    body, content_type = render_metrics(server.hosts, server.rejected)
    return Response(body, media_type=content_type)


# --- the app ----------------------------------------------------------------------------------


def _refusal(status_code: int, error: str, message: str) -> JSONResponse:
    return JSONResponse(ErrorBody(error=error, message=message).model_dump(), status_code=status_code)


def create_app(server: CoordinatorServer, *, extra_routes: Callable[[FastAPI], None] | None = None,
               limits: Limits = Limits()) -> FastAPI:
    """The FastAPI application serving ``server``'s runs (``extra_routes(app)`` may add more, e.g. the dashboard).

    ``limits``: what anyone may send it (address and key rates, slow bodies, WebSockets); every
    refusal is counted in ``server.rejected``. A load test sending more than a real run turns the
    rates off: ``create_app(server, limits=Limits(address_rate=None, key_rate=None))``.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # What the process holds once started (the libraries, the runs) lives as long as it does:
        # kept out of the collector's full passes, which otherwise walk it all every few seconds
        # under load (65-130 ms each with 256 members, every request waiting behind them).
        gc.collect()
        gc.freeze()
        clock = asyncio.create_task(server.run_clocks())
        try:
            yield
        finally:
            clock.cancel()
            server.stop_pushes()

    app = FastAPI(title="Psyche coordinator", lifespan=lifespan)
    app.state.server = server
    app.state.per_key = RateLimiter(limits.key_rate)
    app.include_router(router)

    @app.exception_handler(RequestRefused)
    async def refused(request: Request, exc: RequestRefused) -> JSONResponse:
        server.rejected[exc.reason] += 1
        response = _refusal(exc.status_code, exc.error, exc.message)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(CoordinatorError)
    async def coordinator_refused(request: Request, exc: CoordinatorError) -> JSONResponse:
        return _refusal(409, type(exc).__name__, str(exc))

    @app.exception_handler(HTTPException)
    async def unknown_run(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404 and isinstance(exc.detail, dict):  # from run_host: already an ErrorBody
            return JSONResponse(exc.detail, status_code=404)
        return await http_exception_handler(request, exc)

    if extra_routes is not None:
        extra_routes(app)

    def count(reason: str) -> None:
        server.rejected[reason] += 1

    # Added last, so it is the outermost of our middleware: nothing runs for a refused request.
    app.add_middleware(Guard, limits=limits, on_refusal=count,
                       body_caps={"POST /api/runs/{run_id}/instructions": BODY_CAP,
                                  "POST /api/runs/{run_id}/reports": BODY_CAP})
    return app


# Only these report fields are kept, as numbers: the dashboard and demo read them.
REPORT_FIELDS = ("loss", "val_loss", "val_tokens", "tokens", "train_seconds", "forward_backward_seconds", "tokens_per_sec", "result_bytes",
                 "bytes_sent", "bytes_received", "bytes_sent_total", "bytes_received_total", "applied_results", "peers",
                 "upload_limit", "download_limit", "ranks")


def _clean_report(report: dict) -> dict:
    out: dict = {"step": int(report["step"])}
    for key in REPORT_FIELDS:
        value = report.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            out[key] = value
    return out


def open_server(config: RunConfig | None, db: str | Path, *, authority: bytes,
                host_key: bytes = bytes(32), tick_interval: float = 0.25,
                inference_url: str | None = None) -> CoordinatorServer:
    """Open (or create) the database and host ``config``'s run in it (if given and not there yet).
    ``inference_url``: where the runs' model answers completions (see :class:`CoordinatorServer`)."""
    server = CoordinatorServer(Store(db), host_key=host_key, tick_interval=tick_interval,
                               inference_url=inference_url)
    if config is not None:
        server.create_run(config, authority)
    return server
