"""The transport seam: authenticated connections carrying bidirectional byte streams.

A :class:`Transport` is bound to one node key. Its ``address`` is an opaque
string another node passes to :meth:`Transport.connect`; every connection
knows the verified public key of the far end (``remote_id``). Two
implementations: :class:`psyche.p2p.iroh_transport.IrohTransport` (QUIC, the
default) and :class:`MemoryNetwork` here, an in-process network for unit tests
that can also cut links between chosen pairs.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from psyche.p2p.errors import TransportError
from psyche.p2p.wire import Buffer


class Stream(Protocol):
    """One bidirectional stream."""

    async def write(self, data: Buffer) -> None:
        """Send bytes (in order)."""

    async def finish(self) -> None:
        """Signal end of our side."""

    async def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` at end of the peer's side."""

    def abort(self) -> None:
        """Abandon the stream in both directions (no more reads or writes)."""


class Connection(Protocol):
    """A connection to one authenticated peer."""

    remote_id: bytes

    async def open_stream(self) -> Stream:
        """Open a new stream to the peer."""

    async def accept_stream(self) -> Stream:
        """Wait for the peer to open a stream; raises :class:`TransportError` once closed."""

    def rtt_ms(self) -> float | None:
        """Current round-trip estimate in milliseconds, if known."""

    def close(self) -> None:
        """Close the connection."""

    @property
    def is_closed(self) -> bool:
        """True once closed by either side."""


class Transport(Protocol):
    """A bound endpoint."""

    local_id: bytes
    address: str

    async def connect(self, peer_id: bytes, address: str) -> Connection:
        """Connect to ``peer_id`` at ``address``; raises :class:`TransportError` if it fails
        or the far end is not ``peer_id``."""

    async def accept(self) -> Connection | None:
        """Next incoming connection, or None once the transport is closed."""

    async def close(self) -> None:
        """Close the endpoint and all its connections."""


async def read_exactly(stream: Stream, n: int) -> bytes:
    """Read exactly ``n`` bytes; raises :class:`EOFError` if the stream ends first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


# --- in-memory network -------------------------------------------------------


class _Pipe:
    """One direction of a memory stream."""

    def __init__(self) -> None:
        self.chunks: asyncio.Queue = asyncio.Queue()  # bytes | None (finish) | _CLOSED
        self.pending = b""
        self.ended = False


class MemoryStream:
    """A stream inside a :class:`MemoryNetwork` (bytes are copied, order kept)."""

    def __init__(self, inbound: _Pipe, outbound: _Pipe, conn: MemoryConnection) -> None:
        self._in = inbound
        self._out = outbound
        self._conn = conn

    async def write(self, data: Buffer) -> None:
        if self._conn.is_closed:
            raise TransportError("connection closed")
        if data:
            self._out.chunks.put_nowait(bytes(data))
        await asyncio.sleep(0)

    async def finish(self) -> None:
        self._out.chunks.put_nowait(None)

    async def read(self, max_bytes: int) -> bytes:
        pipe = self._in
        if not pipe.pending:
            if pipe.ended:
                return b""
            chunk = await pipe.chunks.get()
            if chunk is None or chunk is _CLOSED:
                pipe.ended = True
                if chunk is _CLOSED:
                    raise TransportError("connection closed")
                return b""
            pipe.pending = chunk
        out, pipe.pending = pipe.pending[:max_bytes], pipe.pending[max_bytes:]
        return out

    def abort(self) -> None:
        self._out.chunks.put_nowait(_CLOSED)


_CLOSED: object = object()  # "connection closed" marker in a pipe; compared with `is`


class MemoryConnection:
    """One end of a connection inside a :class:`MemoryNetwork`."""

    def __init__(self, local_id: bytes, remote_id: bytes) -> None:
        self.local_id = local_id
        self.remote_id = remote_id
        self.peer: MemoryConnection | None = None
        self._incoming: asyncio.Queue[MemoryStream | None] = asyncio.Queue()
        self._streams: list[MemoryStream] = []
        self._closed = False

    async def open_stream(self) -> MemoryStream:
        if self._closed or self.peer is None or self.peer._closed:
            raise TransportError("connection closed")
        a, b = _Pipe(), _Pipe()
        mine = MemoryStream(a, b, self)
        theirs = MemoryStream(b, a, self.peer)
        self._streams.append(mine)
        self.peer._streams.append(theirs)
        self.peer._incoming.put_nowait(theirs)
        return mine

    async def accept_stream(self) -> MemoryStream:
        if self._closed:
            raise TransportError("connection closed")
        s = await self._incoming.get()
        if s is None:
            raise TransportError("connection closed")
        return s

    def rtt_ms(self) -> float | None:
        return 0.0

    def close(self) -> None:
        for c in (self, self.peer):
            if c is not None and not c._closed:
                c._closed = True
                c._incoming.put_nowait(None)
                for s in c._streams:
                    s._in.chunks.put_nowait(_CLOSED)

    @property
    def is_closed(self) -> bool:
        return self._closed


class MemoryNetwork:
    """An in-process network of :class:`MemoryTransport` endpoints.

    ``block(a, b)`` makes connections between ``a`` and ``b`` fail in both
    directions (and closes open ones), to test forwarding around broken links.
    """

    def __init__(self) -> None:
        self.endpoints: dict[bytes, MemoryTransport] = {}
        self.blocked: set[frozenset[bytes]] = set()

    def transport(self, local_id: bytes) -> MemoryTransport:
        """Bind an endpoint for ``local_id`` (its address is ``mem:<hex id>``)."""
        t = MemoryTransport(self, local_id)
        self.endpoints[local_id] = t
        return t

    def block(self, a: bytes, b: bytes) -> None:
        """Cut the link between ``a`` and ``b``."""
        self.blocked.add(frozenset((a, b)))
        for x, y in ((a, b), (b, a)):
            t = self.endpoints.get(x)
            if t is not None:
                for c in list(t.connections):
                    if c.remote_id == y:
                        c.close()

    def unblock(self, a: bytes, b: bytes) -> None:
        """Restore the link between ``a`` and ``b``."""
        self.blocked.discard(frozenset((a, b)))


class MemoryTransport:
    """An endpoint of a :class:`MemoryNetwork`."""

    def __init__(self, network: MemoryNetwork, local_id: bytes) -> None:
        self.network = network
        self.local_id = local_id
        self.address = "mem:" + local_id.hex()
        self.connections: list[MemoryConnection] = []
        self._incoming: asyncio.Queue[MemoryConnection | None] = asyncio.Queue()
        self._closed = False

    async def connect(self, peer_id: bytes, address: str) -> MemoryConnection:
        await asyncio.sleep(0)
        if self._closed:
            raise TransportError("transport closed")
        if address != "mem:" + peer_id.hex():
            raise TransportError(f"address {address!r} does not belong to peer {peer_id.hex()[:16]}")
        far = self.network.endpoints.get(peer_id)
        if far is None or far._closed or frozenset((self.local_id, peer_id)) in self.network.blocked:
            raise TransportError(f"peer {peer_id.hex()[:16]} unreachable")
        mine, theirs = MemoryConnection(self.local_id, peer_id), MemoryConnection(peer_id, self.local_id)
        mine.peer, theirs.peer = theirs, mine
        self.connections.append(mine)
        far.connections.append(theirs)
        far._incoming.put_nowait(theirs)
        return mine

    async def accept(self) -> MemoryConnection | None:
        if self._closed:
            return None
        return await self._incoming.get()

    async def close(self) -> None:
        self._closed = True
        for c in self.connections:
            c.close()
        self._incoming.put_nowait(None)
        self.network.endpoints.pop(self.local_id, None)
