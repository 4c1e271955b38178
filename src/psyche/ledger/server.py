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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response

from psyche.config import RunConfig, parse_config
from psyche.coordinator import Coordinator, decode_instruction
from psyche.coordinator import queries as q
from psyche.ledger.envelope import open_request
from psyche.ledger.host import RunHost
from psyche.ledger.status import run_events, run_status, run_summary
from psyche.ledger.store import Store
from psyche.wsutil import until_closed

log = logging.getLogger("psyche.server")


class CoordinatorServer:
    """The runs a server hosts, their database, and counters of what it refused."""

    def __init__(self, store: Store, *, host_key: bytes = bytes(32), tick_interval: float = 0.25):
        self.store = store
        self.host_key = host_key
        self.tick_interval = tick_interval
        self.hosts: dict[str, RunHost] = {}
        self.configs: dict[str, RunConfig] = {}
        self.rejected: Counter[str] = Counter()
        self._logged: dict[str, tuple[int, Coordinator]] = {}
        """Per run: the seq and state the log last described (events are what changed since)."""
        for stored in store.runs():
            cfg = parse_config(stored.config, f"{store.path}: run {stored.run_id}")
            coord = Coordinator.from_bytes(stored.state)
            self._add(cfg, RunHost(coord, store=store, seq=stored.seq, host_key=host_key))
            log.info("resumed run %s at seq %d after step %d of %d (%s)", cfg.run_id, stored.seq,
                     q.steps_completed(coord.state), coord.state.settings.total_steps, coord.state.run_state.value)

    def _add(self, cfg: RunConfig, host: RunHost) -> None:
        self.hosts[cfg.run_id] = host
        self.configs[cfg.run_id] = cfg
        self._logged[cfg.run_id] = (host.seq, host.coordinator.copy())

    def log_changes(self, host: RunHost, *, origin: str | None = None) -> None:
        """Log (INFO) what happened to ``host``'s run since the last call: joins, departures,
        epochs, steps, pause/resume, the end. ``origin``: who sent the change (a join's address)."""
        seq, before = self._logged[host.run_id]
        if host.seq == seq:
            return
        after = host.coordinator.copy()
        self._logged[host.run_id] = (host.seq, after)
        for line in run_events(before.state, after.state, name=self.configs[host.run_id].name, origin=origin):
            log.info("%s: %s", host.run_id, line)

    def tick(self, host: RunHost) -> None:
        """Let time pass for one run, logging what it changed."""
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


def _error(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status_code=status)


def create_app(server: CoordinatorServer, *, extra_routes=None) -> FastAPI:
    """The FastAPI application serving ``server``'s runs."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        clock = asyncio.create_task(server.run_clocks())
        try:
            yield
        finally:
            clock.cancel()

    app = FastAPI(title="Psyche coordinator", lifespan=lifespan)
    app.state.server = server

    def host_or_404(run_id: str) -> RunHost | JSONResponse:
        host = server.hosts.get(run_id)
        if host is None:
            return _error(404, "UnknownRun", f"no run {run_id!r} here; GET /api/runs lists them")
        return host

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True, "runs": len(server.hosts)}

    @app.get("/api/runs")
    async def list_runs() -> list[dict]:
        return [run_summary(h.coordinator, server.configs[rid]) for rid, h in server.hosts.items()]

    @app.get("/api/runs/{run_id}")
    async def get_run(run_id: str):
        host = host_or_404(run_id)
        if isinstance(host, JSONResponse):
            return host
        return run_status(host, server.configs[run_id], server.store)

    @app.get("/api/runs/{run_id}/state")
    async def get_state(run_id: str):
        host = host_or_404(run_id)
        if isinstance(host, JSONResponse):
            return host
        return Response(host.coordinator.to_bytes(), media_type="application/msgpack",
                        headers={"x-psyche-seq": str(host.seq)})

    @app.websocket("/api/runs/{run_id}/ws")
    async def state_feed(ws: WebSocket, run_id: str):
        host = server.hosts.get(run_id)
        if host is None:
            await ws.close(code=4404)
            return
        await ws.accept()
        closed = asyncio.ensure_future(until_closed(ws))
        try:
            seq = -1
            while not closed.done():
                if host.seq != seq:
                    seq = host.seq
                    await ws.send_bytes(host.coordinator.to_bytes())
                changed = asyncio.ensure_future(host.wait_changed(timeout=10))
                await asyncio.wait({changed, closed}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
        except (WebSocketDisconnect, RuntimeError, ConnectionError):
            return
        finally:
            closed.cancel()

    def stale_nonce(run_id: str, req) -> JSONResponse | None:
        """The refusal of a request whose nonce is not above its signer's last one (a replay)."""
        if req.nonce > server.store.last_nonce(run_id, req.signer):
            return None
        server.rejected["stale_nonce"] += 1
        return _error(409, "StaleNonce", "nonce not above the signer's last one (a replayed request?)")

    @app.post("/api/runs/{run_id}/instructions")
    async def post_instruction(run_id: str, request: Request):
        host = host_or_404(run_id)
        if isinstance(host, JSONResponse):
            return host
        try:
            req = open_request(await request.body(), run_id=run_id, kind="instruction")
            instruction = decode_instruction(req.body)
        except ValueError as exc:
            server.rejected["bad_request"] += 1
            return _error(400, "BadRequest", str(exc))
        if (stale := stale_nonce(run_id, req)) is not None:
            return stale
        err = host.apply(instruction, req.signer, nonce=req.nonce)
        if err is not None:
            return _error(409, type(err).__name__, str(err))
        server.log_changes(host, origin=f"{request.client.host}:{request.client.port}" if request.client else None)
        # A phase this instruction completed (say the last witness report) moves on now,
        # not at the next clock tick: every trainer would idle until then.
        server.tick(host)
        return {"ok": True, "seq": host.seq, "step": host.coordinator.state.step}

    @app.post("/api/runs/{run_id}/reports")
    async def post_report(run_id: str, request: Request):
        host = host_or_404(run_id)
        if isinstance(host, JSONResponse):
            return host
        try:
            req = open_request(await request.body(), run_id=run_id, kind="report")
            report = json.loads(req.body)
            if not isinstance(report, dict) or not isinstance(report.get("step"), int):
                raise ValueError("a report is a JSON object with an integer 'step'")
        except ValueError as exc:
            server.rejected["bad_report"] += 1
            return _error(400, "BadRequest", str(exc))
        if q.member(host.coordinator.state, req.signer) is None:
            server.rejected["non_member_report"] += 1
            return _error(403, "NotAMember", "only members of the run may report metrics")
        if (stale := stale_nonce(run_id, req)) is not None:
            return stale
        server.store.add_report(run_id, req.signer, report["step"], _clean_report(report), req.nonce)
        return {"ok": True}

    @app.get("/metrics")
    async def metrics() -> Response:
        from psyche.ledger.prometheus import render_metrics

        body, content_type = render_metrics(server)
        return Response(body, media_type=content_type)

    if extra_routes is not None:
        extra_routes(app)
    return app


# Only these report fields are kept, as numbers: the dashboard and demo read them.
REPORT_FIELDS = ("loss", "val_loss", "tokens", "train_seconds", "forward_backward_seconds", "tokens_per_sec", "result_bytes",
                 "bytes_sent", "bytes_received", "bytes_sent_total", "bytes_received_total", "applied_results", "peers",
                 "upload_limit", "download_limit")


def _clean_report(report: dict) -> dict:
    out: dict = {"step": int(report["step"])}
    for key in REPORT_FIELDS:
        value = report.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            out[key] = value
    return out


def open_server(config: RunConfig | None, db: str | Path, *, authority: bytes,
                host_key: bytes = bytes(32), tick_interval: float = 0.25) -> CoordinatorServer:
    """Open (or create) the database and host ``config``'s run in it (if given and not there yet)."""
    server = CoordinatorServer(Store(db), host_key=host_key, tick_interval=tick_interval)
    if config is not None:
        server.create_run(config, authority)
    return server
