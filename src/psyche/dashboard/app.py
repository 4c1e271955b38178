"""The dashboard's routes: the page, its static files and the live WebSockets.

Served two ways:

- :func:`mount_dashboard` adds them to the coordinator server's FastAPI app
  (``psyche server`` and ``psyche demo``), reading the runs in-process;
- :func:`create_proxy_app` is a small app of its own that follows a remote
  server (``psyche dashboard --server URL``).

Routes:

- ``GET /`` and ``GET /runs/{run_id}``   the page (one HTML shell; the script picks the view)
- ``GET /static/...``                     its script, style and icon (no CDN: works offline)
- ``WS  /api/live``                       the runs list, pushed on every change
- ``WS  /api/runs/{run_id}/live``         a run's status: a snapshot, then deltas
  (see :mod:`psyche.dashboard.feed` for the messages)

Limits (:mod:`psyche.httplimits`; README, "Limits"): the live feeds count among the server's
WebSockets, at most 2048 open and 512 from one address (beyond: closed with 1013 "try again
later"); a viewer sends nothing, so a message over 64 KiB closes its socket (1009). Mounted on
the coordinator server, its limits apply; :func:`create_proxy_app` takes its own
(``limits``), with the same defaults: 20000 requests per address in any 60 s, no request
bodies (GET only: over 1 KiB is refused with 413).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from psyche.dashboard.feed import Feed, encode
from psyche.httplimits import Guard, Limits
from psyche.wsutil import until_closed

STATIC = Path(__file__).parent / "static"
PING_SECONDS = 20.0
"""A viewer hears at least this often, so dead connections are noticed and proxies keep them open."""


class Hub(Protocol):
    """Where the live documents come from (in-process runs, or a remote server)."""

    def runs_feed(self) -> Feed: ...

    def run_feed(self, run_id: str) -> Feed | None: ...

    async def close(self) -> None: ...


async def serve_feed(ws: WebSocket, feed: Feed) -> None:
    """Send ``feed`` to one viewer until it goes away: a snapshot, then a frame per change."""
    await ws.accept()
    feed.subscribe()
    closed = asyncio.ensure_future(until_closed(ws))
    try:
        seen: int | None = None
        while not closed.done():
            nxt = asyncio.ensure_future(feed.next_frame(seen, timeout=PING_SECONDS))
            await asyncio.wait({nxt, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                break
            got = nxt.result()
            if got is None:
                await ws.send_text(encode({"type": "ping", "v": seen}))
                continue
            seen, frame = got
            await ws.send_text(frame)
    except (WebSocketDisconnect, RuntimeError, ConnectionError):
        pass  # the viewer left mid-send
    finally:
        feed.unsubscribe()
        closed.cancel()


def add_dashboard_routes(app: FastAPI, hub: Hub) -> None:
    """Add the page, static files and live endpoints backed by ``hub`` to ``app``,
    and close ``hub`` when the app shuts down."""
    index = STATIC / "index.html"

    @app.get("/", include_in_schema=False)
    async def runs_page() -> Response:
        return FileResponse(index, media_type="text/html")

    @app.get("/runs/{run_id}", include_in_schema=False)
    async def run_page(run_id: str) -> Response:
        return FileResponse(index, media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC), name="dashboard-static")

    @app.websocket("/api/live")
    async def runs_live(ws: WebSocket) -> None:
        await serve_feed(ws, hub.runs_feed())

    @app.websocket("/api/runs/{run_id}/live")
    async def run_live(ws: WebSocket, run_id: str) -> None:
        feed = hub.run_feed(run_id)
        if feed is None:
            await ws.accept()
            await ws.send_text(encode({"type": "error", "message": f"no run {run_id!r} on this server"}))
            await ws.close(code=4404)
            return
        await serve_feed(ws, feed)

    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI):
        async with inner(a) as state:
            try:
                yield state
            finally:
                await hub.close()

    app.router.lifespan_context = lifespan


class ReportWatch:
    """ASGI middleware: tells ``on_report(run_id)`` about every accepted metrics report, since
    a report changes a run's charts without changing its coordinator state."""

    def __init__(self, app: ASGIApp, on_report) -> None:
        self.app = app
        self.on_report = on_report

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or not path.endswith("/reports"):
            await self.app(scope, receive, send)
            return
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        parts = path.strip("/").split("/")  # api/runs/{run_id}/reports
        if status == 200 and len(parts) == 4 and parts[:2] == ["api", "runs"]:
            self.on_report(parts[2])


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard from the coordinator server's app (``app.state.server``).

    Called by :func:`psyche.ledger.server.create_app` as ``extra_routes``.
    """
    from psyche.dashboard.local import LocalHub

    hub = LocalHub(app.state.server)
    app.state.dashboard = hub
    add_dashboard_routes(app, hub)
    app.add_middleware(ReportWatch, on_report=hub.mark)


def create_proxy_app(server_url: str, *, poll_interval: float = 2.0, limits: Limits = Limits()) -> FastAPI:
    """A stand-alone dashboard following the coordinator server at ``server_url``, refusing
    beyond ``limits``.

    The page talks only to this app: the live feeds are relayed (one upstream
    connection each, whatever the number of viewers) and ``GET /api/runs[/{id}]``
    are passed through.
    """
    import httpx

    from psyche.dashboard.remote import RemoteHub

    hub = RemoteHub(server_url, poll_interval=poll_interval)
    app = FastAPI(title="Psyche dashboard", docs_url=None, redoc_url=None)
    app.state.dashboard = hub

    async def passthrough(path: str) -> Response:
        try:
            resp = await hub.http.get(hub.url + path)
        except httpx.HTTPError as exc:
            return JSONResponse({"error": "Upstream", "message": f"{hub.url}: {exc!r}"}, status_code=502)
        return Response(resp.content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"))

    @app.get("/api/runs")
    async def list_runs() -> Response:
        return await passthrough("/api/runs")

    @app.get("/api/runs/{run_id}")
    async def get_run(run_id: str) -> Response:
        return await passthrough(f"/api/runs/{run_id}")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True, "upstream": hub.url}

    add_dashboard_routes(app, hub)
    app.add_middleware(Guard, limits=limits, body_caps={})  # every endpoint is a GET
    return app
