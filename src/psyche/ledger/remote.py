"""The client side of the coordinator server: signed instructions over HTTP, state over WebSocket."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlparse

import httpx
import websockets
from websockets.asyncio.client import connect as ws_connect

from psyche.coordinator import Coordinator, Instruction, encode_instruction
from psyche.ledger.base import InstructionRefused, Ledger, LedgerUnavailable, MetricsReport
from psyche.ledger.envelope import RequestKind, Signer, sign_request


def server_url_problem(url: str, *, option: str = "--server") -> str | None:
    """Why ``url`` cannot be a coordinator server URL (None if it can): it needs ``http(s)://HOST[:PORT]``.
    ``option``: the command-line option the problem names (any http(s) service URL is checked the same way).

    >>> server_url_problem("http://127.0.0.1:8000") is None
    True
    >>> server_url_problem("127.0.0.1:8000")
    "--server must be a URL like http://HOST:PORT (got '127.0.0.1:8000')"
    """
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"{option} must be a URL like http://HOST:PORT (got {url!r})"
    return None


def transport_problem(exc: BaseException) -> str:
    """A few words on why a connection failed ("connection refused", "unknown host ..."), for a user.

    Looks through the exception's causes for the socket error that httpx or
    websockets wrapped, so no library's repr reaches the user.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return "unknown host"
        if isinstance(seen, (TimeoutError, httpx.TimeoutException)):
            return "no answer in time"
        if isinstance(seen, OSError) and seen.errno is not None:
            if seen.errno == errno.ECONNREFUSED:
                return "connection refused"
            return (seen.strerror or errno.errorcode.get(seen.errno, str(seen.errno))).lower()
        if isinstance(seen, websockets.exceptions.InvalidStatus):
            return f"HTTP {seen.response.status_code} on the state feed"
        if isinstance(seen, websockets.exceptions.ConnectionClosed):
            return "connection closed"
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


def unreachable_message(url: str, exc: BaseException) -> str:
    """The line a user reads when the coordinator server at ``url`` could not be reached."""
    return f"cannot reach the coordinator server at {url} ({transport_problem(exc)}); is `psyche server` running there?"


class Reachability:
    """Whether the coordinator answers, told to a user once per change rather than once per retry.

    Sans-io: callers pass ``now`` (seconds) and get back the line to say, if any.
    While unreachable it speaks again every ``repeat`` seconds.
    """

    def __init__(self, url: str, *, retry_every: float, repeat: float = 30.0):
        self.url = url
        self.retry_every = retry_every
        self.repeat = repeat
        self.down_since: float | None = None
        self._last_said = 0.0

    def failed(self, now: float, problem: str) -> str | None:
        """A request failed: the line to say (first failure, or ``repeat`` s since the last line), else None."""
        if self.down_since is None:
            self.down_since = self._last_said = now
            return f"coordinator unreachable at {self.url} ({problem}), retrying every {self.retry_every:g}s"
        if now - self._last_said >= self.repeat:
            self._last_said = now
            return (f"coordinator still unreachable at {self.url} after {now - self.down_since:.0f}s ({problem}), "
                    f"retrying every {self.retry_every:g}s")
        return None

    def answered(self, now: float) -> str | None:
        """A request got an answer: "reachable again" if it was down, else None."""
        if self.down_since is None:
            return None
        down, self.down_since = now - self.down_since, None
        return f"coordinator reachable again after {down:.0f}s"


RETRY_MAX = 2.0
"""The longest wait, in seconds, between two attempts to reach a coordinator that does not answer."""

RETRY_AFTER_MAX = 60.0
"""The longest wait, in seconds, a 429's ``Retry-After`` may ask for (the server's windows are shorter)."""


def retry_after(resp: httpx.Response) -> float:
    """The seconds a 429 asks to wait: its ``Retry-After`` in whole seconds (1 when absent or a
    date), at most :data:`RETRY_AFTER_MAX`.

    >>> retry_after(httpx.Response(429, headers={"Retry-After": "3"}))
    3.0
    """
    try:
        wait = float(resp.headers.get("retry-after", "1"))
    except ValueError:
        wait = 1.0
    return min(max(wait, 0.0), RETRY_AFTER_MAX)


MAX_STATE_BYTES = 64 * 1024 * 1024
"""The largest coordinator state a client takes from a server, compressed or not."""


def inflate(message: bytes, limit: int) -> bytes:
    """A zlib message decompressed, refusing (``ValueError``) one that is malformed or would pass
    ``limit`` bytes: a small message must not make the client hold gigabytes."""
    z = zlib.decompressobj()
    try:
        out = z.decompress(message, limit)
    except zlib.error as exc:
        raise ValueError(f"malformed compressed state: {exc}") from None
    if z.unconsumed_tail or not z.eof:
        raise ValueError(f"compressed state truncated or larger than {limit} bytes")
    if z.unused_data:
        raise ValueError("bytes after the compressed state")
    return out


class ServerLedger(Ledger):
    """A participant talking to ``psyche server`` at ``url`` for run ``run_id``.

    ``watch()`` reconnects on its own (with back-off) when the server restarts,
    and yields the state the server holds once it is back. ``say``, if given, is
    told when the server stops answering and when it answers again (see
    :class:`Reachability`), not at every retry. A request the server refuses for its rate
    limits (429) is sent again after the wait it asks for, rather than failing; ``say`` hears
    of it once per spell of refusals.
    """

    def __init__(self, url: str, run_id: str, signer: Signer, *, timeout: float = 10.0,
                 say: Callable[[str], None] | None = None, transport: httpx.AsyncBaseTransport | None = None):
        self.url = url.rstrip("/")
        self.run_id = run_id
        self.signer = signer
        self.say = say
        self.reachability = Reachability(self.url, retry_every=RETRY_MAX)
        self.malformed_states = 0
        """State messages on the feed that did not decode (each dropped, and the feed opened again)."""
        # ``transport``: HTTP requests go there instead of the network (tests pass an in-process mock).
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport)
        # The server takes a signer's nonces only in increasing order, and requests sent at
        # once over several connections can arrive in any order: so one signed request at a
        # time, each signed when its turn comes.
        self._signed_post = asyncio.Lock()
        self._throttled = False
        """The last answer was a 429 (said once, not at every wait)."""

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The server's answer to one HTTP request, noting that it answered; ``LedgerUnavailable``
        (noting that it did not) when it could not be reached.

        A 429 is waited out (its ``Retry-After``) and the same request sent again: the server
        refused it before anything else looked at it, so a signed request's nonce is still
        unused (and, one signed request at a time, still above the signer's last one).
        """
        while True:
            try:
                resp = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise self._unavailable(exc) from exc
            self._answered()
            if resp.status_code != 429:
                self._throttled = False
                return resp
            wait = retry_after(resp)
            if not self._throttled and self.say is not None:
                self.say(f"the coordinator at {self.url} refuses requests this fast ({resp.text[:200]}); "
                         f"waiting {wait:g}s and sending again")
            self._throttled = True
            await asyncio.sleep(wait)

    async def _post_signed(self, path: str, kind: RequestKind, body: bytes) -> None:
        async with self._signed_post:
            signed = sign_request(self.signer, self.run_id, kind, body)
            resp = await self._request("POST", path, content=signed, headers={"content-type": "application/msgpack"})
        self._raise_for(resp)

    def _unavailable(self, exc: BaseException) -> LedgerUnavailable:
        """Note that the server did not answer (saying so if that is news); the error to raise."""
        line = self.reachability.failed(time.monotonic(), transport_problem(exc))
        if line is not None and self.say is not None:
            self.say(line)
        return LedgerUnavailable(unreachable_message(self.url, exc))

    def _answered(self) -> None:
        line = self.reachability.answered(time.monotonic())
        if line is not None and self.say is not None:
            self.say(line)

    @staticmethod
    def _raise_for(resp: httpx.Response) -> None:
        if resp.status_code == 200:
            return
        if resp.status_code >= 500:
            raise LedgerUnavailable(f"coordinator server error {resp.status_code}: {resp.text[:200]}")
        try:
            detail = resp.json()
            raise InstructionRefused(str(detail.get("error", resp.status_code)), str(detail.get("message", "")))
        except (ValueError, RecursionError, AttributeError):  # not JSON (or too deep for the parser), or no object
            raise InstructionRefused(str(resp.status_code), resp.text[:200]) from None

    async def submit(self, instruction: Instruction) -> None:
        await self._post_signed(f"/api/runs/{self.run_id}/instructions", "instruction", encode_instruction(instruction))

    async def report(self, report: MetricsReport) -> None:
        """Send this client's metrics for a step; the server stores them for its dashboard,
        status API and `psyche demo`."""
        await self._post_signed(f"/api/runs/{self.run_id}/reports", "report", json.dumps(report).encode())

    async def state(self) -> Coordinator:
        """The state the server holds; ``ValueError`` if its answer is not a coordinator state."""
        resp = await self._request("GET", f"/api/runs/{self.run_id}/state")
        if resp.status_code != 200:
            self._raise_for(resp)
        return Coordinator.from_bytes(resp.content)

    async def status(self) -> dict:
        """The run's JSON status (the same as ``GET /api/runs/{run_id}``); ``ValueError`` if the answer is not JSON."""
        resp = await self._request("GET", f"/api/runs/{self.run_id}")
        self._raise_for(resp)
        try:
            return resp.json()
        except RecursionError:
            raise ValueError("the run's status is not JSON this parser reads (nested too deep)") from None

    async def watch(self) -> AsyncIterator[Coordinator]:
        # The server compresses each state once for every feed (a run of 256 members: 206 KB ->
        # 17 KB); the connection's own permessage-deflate would only compress it again.
        ws_url = "ws" + self.url[len("http"):] + f"/api/runs/{self.run_id}/ws?encoding=zlib"
        backoff = 0.2
        while True:
            try:
                async with ws_connect(ws_url, max_size=MAX_STATE_BYTES, open_timeout=5, compression=None) as ws:
                    backoff = 0.2
                    self._answered()
                    async for message in ws:
                        if isinstance(message, bytes):
                            try:
                                coord = Coordinator.from_bytes(inflate(message, MAX_STATE_BYTES))
                            except ValueError:
                                # Dropped and counted, like any message that does not decode, and the
                                # feed opened again below: the server starts a new one with its state.
                                self.malformed_states += 1
                                break
                            yield coord
            except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
                # A feed that closed is not yet news: the reconnect below tells whether the server is gone.
                if not isinstance(exc, websockets.exceptions.ConnectionClosed):
                    self._unavailable(exc)
            # The server went away (restart, network): try again, a little slower each time.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX)

    async def close(self) -> None:
        await self._http.aclose()
