"""Limits on what anyone may send our HTTP servers: body sizes, request rates, slow bodies, WebSockets.

One pure ASGI middleware, :class:`Guard`, stands in front of the coordinator server, the data
server and the stand-alone dashboard. It never buffers: a body is refused from its
``Content-Length`` before a byte of it is read, or cut while it streams in. What it refuses, in
the order it checks, each answered ``{"error", "message"}`` (the coordinator's ``ErrorBody``)
and counted with ``on_refusal(reason)``:

=====  ===================  =======================  ===============================================
code   error                reason                   when
=====  ===================  =======================  ===============================================
429    RateLimited          rate_limited             the client address made more than
                                                     ``Limits.address_rate`` requests (HTTP requests
                                                     and WebSocket handshakes); ``Retry-After`` says
                                                     the whole seconds until it may again
413    PayloadTooLarge      body_too_large           ``Content-Length`` over the endpoint's cap, or a
                                                     chunked body whose bytes pass it
408    RequestTimeout       body_timeout             no byte of the body for ``body_idle_s``, or not
                                                     all of it within ``body_total_s``
1013   (close code)         too_many_websockets      a WebSocket over ``websockets`` open on the
                                                     server or ``websockets_per_address`` from one
                                                     address (over the address's rate: counted as
                                                     rate_limited)
1009   (close code)         websocket_message_big    a WebSocket message over ``ws_message_bytes``
=====  ===================  =======================  ===============================================

A 413 or 408 also closes the connection, so the rest of the body is never read. Rates count
per :class:`Rate` (:class:`RateLimiter`: N at once, then N per SECONDS on average). The
servers' defaults (:class:`Limits`) never throttle a real run, 256 members behind one address included; the signed endpoints add a per-key rate of their own
(``key_rate``, checked by :mod:`psyche.ledger.server`).

>>> parse_rate("120/10")
Rate(count=120, seconds=10)
>>> parse_rate("off") is None
True
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

KEEP_ALIVE_S = 15
"""How long uvicorn keeps an idle connection: longer than httpx's 5 s pool expiry, so a client
always drops an idle connection before the server does (no request races a closing socket),
short enough that idle sockets do not pile up."""


@dataclass(frozen=True)
class Rate:
    """``count`` requests per ``seconds``: as many at once, then on average no more (:class:`RateLimiter`)."""

    count: int
    seconds: int

    def __str__(self) -> str:
        return f"{self.count}/{self.seconds}"


def parse_rate(text: str) -> Rate | None:
    """``"N/SECONDS"`` as a :class:`Rate`, ``"off"`` as None; ``ValueError`` saying the form otherwise.

    >>> parse_rate("6000/60")
    Rate(count=6000, seconds=60)
    >>> parse_rate("6000 a minute")
    Traceback (most recent call last):
    ...
    ValueError: expected N/SECONDS (e.g. 120/10: 120 requests in any 10 s) or off, got '6000 a minute'
    """
    if text.strip().lower() == "off":
        return None
    count, _, seconds = text.strip().partition("/")
    if not (count.isdigit() and seconds.isdigit() and int(count) > 0 and int(seconds) > 0):
        raise ValueError(f"expected N/SECONDS (e.g. 120/10: 120 requests in any 10 s) or off, got {text!r}")
    return Rate(int(count), int(seconds))


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one server lets anyone send (README, "Limits"). Body caps are per endpoint: each
    server passes its own to :class:`Guard`."""

    address_rate: Rate | None = Rate(20_000, 60)
    """Requests one client address may make, HTTP and WebSocket handshakes together (None: no
    limit). 256 members behind one NAT, or a load test on loopback, each sending a few per
    round, stay far below it; one address flooding a server is held to about 330/s."""
    key_rate: Rate | None = Rate(600, 60)
    """Signed requests one key may send, where a server takes them (the coordinator's
    instructions and reports, checked once the envelope is opened; None: no limit). A member
    sends a few per round, and a client back after the server's outage sends its outbox of up
    to 256 kept reports at once."""
    body_idle_s: float = 10.0
    """Seconds a request body may go without a byte arriving before it is cut (408)."""
    body_total_s: float = 30.0
    """Seconds from a request's headers to the last byte of its body before it is cut (408)."""
    websockets: int = 2048
    """WebSockets open at once on the server (clients' state feeds and dashboard viewers)."""
    websockets_per_address: int = 512
    """WebSockets open at once from one address: 256 members behind one NAT with a dashboard each fit."""
    ws_message_bytes: int = 64 * 1024
    """The largest WebSocket message a server takes: the feeds' clients send almost nothing."""


class RateLimiter:
    """Requests per identity (an address, a key) against one :class:`Rate` (None: no limit), in
    memory, O(1) per request: the generic cell rate algorithm (a token bucket kept as one
    timestamp per identity). An identity may send ``count`` requests at once, then one every
    ``seconds / count``: over any span of ``seconds`` it gets at most ``count`` more than that.

    Not the ``limits`` library: its in-memory moving window kept every request of the window in a
    list per identity (inserted at the front) and started a thread every 10 ms to expire them,
    a fifth of the coordinator server's time with 256 members behind one address.

    >>> r = RateLimiter(Rate(2, 10))
    >>> [r.hit("a", now=0.0), r.hit("a", now=0.0), r.hit("a", now=1.0), r.hit("a", now=5.0)]
    [None, None, 4, None]
    """

    SWEEP_EVERY = 4096
    """Requests between two sweeps of identities whose bucket is full again (memory stays bounded)."""

    def __init__(self, rate: Rate | None):
        self.rate = rate
        self._due: dict[str, float] = {}
        """Per identity: when its bucket is full again (the "theoretical arrival time")."""
        self._hits = 0

    def hit(self, who: str, *, now: float | None = None) -> int | None:
        """Count a request by ``who`` (at ``now``, monotonic seconds; default: the clock): None if
        it is within the rate, else the whole seconds until it would be (at least 1: a
        ``Retry-After``). A refused request is not counted."""
        if self.rate is None:
            return None
        now = time.monotonic() if now is None else now
        interval = self.rate.seconds / self.rate.count
        due = max(self._due.get(who, now), now)
        if due - now > self.rate.seconds - interval:  # the bucket is empty
            return max(1, math.ceil(due - now - (self.rate.seconds - interval)))
        self._due[who] = due + interval
        self._hits += 1
        if self._hits % self.SWEEP_EVERY == 0:
            self._due = {k: v for k, v in self._due.items() if v > now}
        return None


def client_address(scope: Scope) -> str:
    """The address a request came from (``unknown`` where the server does not say, e.g. a unix socket)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def size_text(n: int) -> str:
    """``n`` bytes for a person: ``64 KiB``, ``1 MiB``, ``300 bytes``."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


@dataclass(frozen=True)
class Refusal:
    """A request refused before (or while) the app reads it."""

    status: int
    error: str
    reason: str
    """The label it is counted under (``on_refusal``)."""
    message: str
    retry_after: int | None = None
    close: bool = False
    """Close the connection after answering: the rest of the body is never read."""


class BodyCut(Exception):
    """Raised into the app reading a body that :class:`Guard` cut (too large, too slow)."""


class _Body:
    """The request body as the app reads it (its ``receive``): counted against the endpoint's
    cap and timed, until its last byte; what comes after (a disconnect) passes untouched."""

    def __init__(self, receive: Receive, *, cap: int, endpoint: str, limits: Limits, expected: bool):
        self.receive = receive
        self.cap = cap
        self.endpoint = endpoint
        self.idle_s = limits.body_idle_s
        self.total_s = limits.body_total_s
        self.deadline = asyncio.get_running_loop().time() + limits.body_total_s
        self.read = 0
        self.done = not expected
        """The whole body is in (a request declaring none has none to wait for)."""
        self.cut: Refusal | None = None

    async def __call__(self) -> Message:
        if self.cut is not None:
            raise BodyCut(self.cut.message)
        if self.done:
            return await self.receive()
        left = self.deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(max(0.0, min(self.idle_s, left))):
                message = await self.receive()
        except TimeoutError:
            what = (f"no byte of it for {self.idle_s:g} s" if left > self.idle_s
                    else f"not all of it within {self.total_s:g} s")
            self.cut = Refusal(408, "RequestTimeout", "body_timeout",
                               f"request body of {self.endpoint} cut after {self.read} bytes: {what}", close=True)
            raise BodyCut(self.cut.message) from None
        if message["type"] == "http.request":
            self.read += len(message.get("body", b""))
            if self.read > self.cap:
                self.cut = Refusal(413, "PayloadTooLarge", "body_too_large",
                                   f"request body over the {size_text(self.cap)} cap of {self.endpoint} "
                                   f"(cut after {self.read} bytes)", close=True)
                raise BodyCut(self.cut.message)
            self.done = not message.get("more_body", False)
        return message


class Guard:
    """ASGI middleware enforcing ``limits`` and per-endpoint body caps in front of ``app``.

    ``body_caps``: the cap in bytes of each endpoint that takes a body, keyed ``"METHOD
    /path/{param}"`` (a ``{...}`` segment matches any one segment); every other request may
    carry at most ``no_body_cap`` bytes. ``on_refusal(reason)`` counts each refusal, and
    ``render(refusal)`` gives its JSON body where the server's API has its own error shape
    (default ``{"error": ..., "message": ...}``).

    >>> guard = Guard(None, limits=Limits(), body_caps={"POST /api/runs/{run_id}/reports": 65536})
    >>> guard.endpoint("POST", "/api/runs/r1/reports")
    ('POST /api/runs/{run_id}/reports', 65536)
    >>> guard.endpoint("GET", "/api/runs/r1")
    ('GET /api/runs/r1 (which takes no body)', 1024)
    """

    def __init__(self, app: ASGIApp, *, limits: Limits, body_caps: Mapping[str, int], no_body_cap: int = 1024,
                 on_refusal: Callable[[str], None] | None = None,
                 render: Callable[[Refusal], dict[str, Any]] | None = None):
        self.app = app
        self.render = render
        self.limits = limits
        self.no_body_cap = no_body_cap
        self.on_refusal = on_refusal
        self._caps = [(name, name.split(" ", 1)[0], name.split(" ", 1)[1].strip("/").split("/"), cap)
                      for name, cap in body_caps.items()]
        self._per_address = RateLimiter(limits.address_rate)
        self._websockets: Counter[str] = Counter()
        """Open WebSockets by address."""

    def endpoint(self, method: str, path: str) -> tuple[str, int]:
        """The name of the endpoint ``method path`` reaches, and its body cap."""
        parts = path.strip("/").split("/")
        for name, m, pattern, cap in self._caps:
            if m == method and len(pattern) == len(parts) and all(
                    p == s or (p.startswith("{") and p.endswith("}")) for p, s in zip(pattern, parts)):
                return name, cap
        return f"{method} {path[:200]} (which takes no body)", self.no_body_cap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _count(self, reason: str) -> None:
        if self.on_refusal is not None:
            self.on_refusal(reason)

    def _rate_refusal(self, address: str) -> Refusal | None:
        wait = self._per_address.hit(address)
        if wait is None:
            return None
        rate = self._per_address.rate
        assert rate is not None  # (a limiter without a rate refuses nothing)
        return Refusal(429, "RateLimited", "rate_limited",
                       f"more than {rate.count} requests in {rate.seconds} s from {address}; retry in {wait} s",
                       retry_after=wait)

    # --- HTTP ---------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        length, chunked = _declared_body(scope["headers"])
        if (refusal := self._rate_refusal(client_address(scope))) is not None:
            # A body it declared is never read: close rather than drain it.
            await self._answer(send, replace(refusal, close=bool(length) or chunked))
            return
        endpoint, cap = self.endpoint(scope["method"], scope["path"])
        if length is not None and length > cap:
            await self._answer(send, Refusal(413, "PayloadTooLarge", "body_too_large",
                                             f"request body of {length} bytes is over the {size_text(cap)} cap "
                                             f"of {endpoint}", close=True))
            return
        body = _Body(receive, cap=cap, endpoint=endpoint, limits=self.limits, expected=bool(length) or chunked)
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if body.cut is not None:
                return  # the app's answer to a body we cut: ours goes instead
            if message["type"] == "http.response.start":
                started = True
                if not body.done:  # answered before the body is in: wait for (or drain) none of the rest
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, body, guarded_send)
        except Exception:
            if body.cut is None:  # only what the app made of our cut is ours to answer
                raise
        if body.cut is not None and not started:
            await self._answer(send, body.cut)

    async def _answer(self, send: Send, refusal: Refusal) -> None:
        self._count(refusal.reason)
        body = self.render(refusal) if self.render is not None else {"error": refusal.error, "message": refusal.message}
        content = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        if refusal.retry_after is not None:
            headers.append((b"retry-after", str(refusal.retry_after).encode()))
        if refusal.close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    # --- WebSocket ----------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        address = client_address(scope)
        limits = self.limits
        reason: str | None = None
        if (refusal := self._rate_refusal(address)) is not None:
            reason = f"rate limited: retry in {refusal.retry_after} s"
        elif sum(self._websockets.values()) >= limits.websockets:
            reason = f"server busy: {limits.websockets} WebSockets open, its cap"
        elif self._websockets[address] >= limits.websockets_per_address:
            reason = f"{limits.websockets_per_address} WebSockets open from your address, its cap"
        if reason is not None:
            self._count("rate_limited" if refusal is not None else "too_many_websockets")
            await _close_at_once(receive, send, 1013, reason)
            return
        self._websockets[address] += 1
        closed = False

        async def guarded_receive() -> Message:
            nonlocal closed
            message = await receive()
            if message["type"] == "websocket.receive" and _ws_size(message) > limits.ws_message_bytes:
                self._count("websocket_message_big")
                closed = True
                await send({"type": "websocket.close", "code": 1009,
                            "reason": f"message over {size_text(limits.ws_message_bytes)}, the cap"})
                return {"type": "websocket.disconnect", "code": 1009}
            return message

        async def guarded_send(message: Message) -> None:
            if not closed:  # after our close the app's sends go nowhere
                await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        finally:
            self._websockets[address] -= 1
            if not self._websockets[address]:
                del self._websockets[address]


def _declared_body(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """The body a request declares: its ``Content-Length`` (None if absent) and whether it is chunked."""
    length, chunked = None, False
    for name, value in headers:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                pass  # the server (h11, httptools) refuses it before any app sees it
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked


def _ws_size(message: Message) -> int:
    data = message.get("bytes")
    if data is not None:
        return len(data)
    return len((message.get("text") or "").encode())


async def _close_at_once(receive: Receive, send: Send, code: int, reason: str) -> None:
    """Accept a WebSocket only to close it with ``code`` and ``reason``, before the app sees it
    (a close before the accept would reach the client as a bare HTTP 403, without the reason)."""
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": code, "reason": reason.encode()[:123].decode(errors="ignore")})


def uvicorn_options(limits: Limits) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.run`` / ``uvicorn.Config`` that enforce uvicorn's part
    of ``limits``: the WebSocket message size (refused while it arrives, 1009) and the keep-alive."""
    return {"ws_max_size": limits.ws_message_bytes, "timeout_keep_alive": KEEP_ALIVE_S}

