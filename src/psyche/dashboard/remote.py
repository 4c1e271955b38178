"""Live documents read from a remote coordinator server (``psyche dashboard --server URL``).

One upstream connection per document, however many local viewers: a server
with the dashboard pushes over its ``/api/live`` and ``/api/runs/{id}/live``
WebSockets (snapshot + deltas, replayed here with
:func:`~psyche.dashboard.feed.apply_delta`); a server without it is polled on
its Status API. Either way a lost upstream is retried with backoff, so the
local page survives the remote server's restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging

import httpx

from psyche.dashboard.feed import Feed, apply_delta, cancel_tasks

log = logging.getLogger("psyche.dashboard")


class UpstreamMissing(Exception):
    """The remote server answered, but has no such document (404) or no live endpoint."""


def ws_url(http_url: str) -> str:
    """The WebSocket URL of an ``http(s)://`` URL."""
    if http_url.startswith("https://"):
        return "wss://" + http_url[len("https://"):]
    if http_url.startswith("http://"):
        return "ws://" + http_url[len("http://"):]
    raise ValueError(f"server URL must start with http:// or https:// (got {http_url!r})")


class RemoteHub:
    """The runs list and each run's status of a remote server, as live feeds."""

    def __init__(self, url: str, *, poll_interval: float = 2.0, max_backoff: float = 10.0,
                 http: httpx.AsyncClient | None = None):
        self.url = url.rstrip("/")
        ws_url(self.url)  # refuse a bad URL now, not in a background task
        self.poll_interval = poll_interval
        self.max_backoff = max_backoff
        self.http = http or httpx.AsyncClient(timeout=10)
        self._feeds: dict[str | None, Feed] = {}
        self._tasks: list[asyncio.Task] = []

    def runs_feed(self) -> Feed:
        """The feed of the remote runs list."""
        return self._feed(None)

    def run_feed(self, run_id: str) -> Feed | None:
        """The feed of one remote run (a document ``{"error": ...}`` if the server has no such run)."""
        return self._feed(run_id)

    async def close(self) -> None:
        """Stop following the remote server."""
        await cancel_tasks(self._tasks)
        await self.http.aclose()

    def _feed(self, key: str | None) -> Feed:
        feed = self._feeds.get(key)
        if feed is None:
            feed = self._feeds[key] = Feed(deltas=key is not None)
            self._tasks.append(asyncio.get_running_loop().create_task(self._follow(key, feed)))
        return feed

    async def _follow(self, key: str | None, feed: Feed) -> None:
        live = "/api/live" if key is None else f"/api/runs/{key}/live"
        api = "/api/runs" if key is None else f"/api/runs/{key}"
        backoff = 0.5
        while True:
            await feed.watched()
            try:
                try:
                    await self._follow_ws(self.url + live, feed)
                except UpstreamMissing:
                    await self._poll(self.url + api, feed)
                backoff = 0.5
            except Exception as exc:  # network, HTTP, and websockets' own errors alike: retry
                log.info("upstream %s: %r; retrying in %.1fs", self.url + live, exc, backoff)
                # Viewers see why nothing moves; the next document from upstream replaces this.
                feed.publish({"error": f"cannot reach {self.url} ({type(exc).__name__}); retrying"})
            await asyncio.sleep(backoff)
            backoff = min(self.max_backoff, backoff * 2)

    async def _follow_ws(self, url: str, feed: Feed) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        try:
            async with connect(ws_url(url), max_size=2**26, open_timeout=10) as ws:
                doc = None
                async for raw in ws:
                    msg = json.loads(raw)
                    kind = msg.get("type")
                    if kind == "snapshot":
                        doc = msg["data"]
                    elif kind == "delta" and doc is not None:
                        doc = apply_delta(doc, msg)
                    elif kind == "error":
                        feed.publish({"error": msg.get("message", "unknown run")})
                        continue
                    else:
                        continue
                    feed.publish(doc)
        except InvalidStatus as exc:
            if exc.response.status_code in (403, 404):
                raise UpstreamMissing(url) from exc
            raise
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == 4404:
                await asyncio.sleep(self.poll_interval)  # the run may appear later
                return
            raise

    async def _poll(self, url: str, feed: Feed) -> None:
        while True:
            resp = await self.http.get(url)
            if resp.status_code == 404:
                feed.publish({"error": resp.json().get("message", f"{url}: not found")})
            else:
                resp.raise_for_status()
                feed.publish(resp.json())
            await asyncio.sleep(self.poll_interval)
