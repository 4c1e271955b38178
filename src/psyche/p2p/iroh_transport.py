"""The default transport: iroh QUIC endpoints (a thin adapter over the ``iroh`` bindings).

Addresses are iroh ``EndpointTicket`` strings (endpoint id + direct addresses
+ optional relay). By default relays are disabled and only direct addresses are
used, which is what a LAN or a test on loopback needs; ``relay=True`` uses
iroh's n0 preset with its public relays and hole punching for the internet.
iroh errors are translated to :class:`TransportError` here, at the boundary.
"""

from __future__ import annotations

import iroh

from psyche.p2p.errors import TransportError
from psyche.p2p.wire import ALPN


def _why(exc: Exception) -> str:
    """iroh errors print as empty strings; take the message the binding carries."""
    try:
        return str(exc.message()).splitlines()[0]  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 — best effort for an error description
        return repr(exc)


def ticket_id(address: str) -> bytes:
    """The endpoint id (public key, 32 bytes) inside an iroh ticket string."""
    try:
        return iroh.EndpointTicket.from_string(address).endpoint_addr().id().to_bytes()
    except iroh.IrohError as exc:
        raise TransportError(f"not an iroh endpoint ticket: {address[:40]!r}") from exc


class IrohStream:
    """A QUIC bidirectional stream."""

    def __init__(self, bi: iroh.BiStream) -> None:
        self._send = bi.send()
        self._recv = bi.recv()

    async def write(self, data: bytes) -> None:
        try:
            await self._send.write_all(bytes(data))
        except iroh.IrohError as exc:
            raise TransportError(f"write failed: {_why(exc)}") from exc

    async def finish(self) -> None:
        try:
            await self._send.finish()
        except iroh.IrohError as exc:
            raise TransportError(f"finish failed: {_why(exc)}") from exc

    async def read(self, max_bytes: int) -> bytes:
        try:
            data = await self._recv.read(max_bytes)
        except iroh.IrohError as exc:
            raise TransportError(f"read failed: {_why(exc)}") from exc
        return data or b""

    def abort(self) -> None:
        # reset/stop are async in the bindings; fire and forget is enough here
        import asyncio

        async def _abort() -> None:
            for op in (lambda: self._send.reset(1), lambda: self._recv.stop(1)):
                try:
                    await op()
                except Exception:  # noqa: BLE001 — stream already gone; nothing to undo
                    pass

        try:
            asyncio.get_running_loop().create_task(_abort())
        except RuntimeError:
            pass


class IrohConnection:
    """A QUIC connection to an authenticated peer."""

    def __init__(self, conn: iroh.Connection) -> None:
        self._conn = conn
        self.remote_id: bytes = conn.remote_id().to_bytes()
        self._closed = False

    async def open_stream(self) -> IrohStream:
        try:
            return IrohStream(await self._conn.open_bi())
        except iroh.IrohError as exc:
            self._closed = True
            raise TransportError(f"open stream failed: {_why(exc)}") from exc

    async def accept_stream(self) -> IrohStream:
        try:
            return IrohStream(await self._conn.accept_bi())
        except iroh.IrohError as exc:
            self._closed = True
            raise TransportError(f"connection ended: {_why(exc)}") from exc

    def rtt_ms(self) -> float | None:
        try:
            r = self._conn.rtt()
        except iroh.IrohError:
            return None
        return None if r is None else float(r)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._conn.close(0, b"bye")
            except iroh.IrohError:
                pass

    @property
    def is_closed(self) -> bool:
        return self._closed or self._conn.close_reason() is not None


class IrohTransport:
    """An iroh endpoint bound to a node key."""

    def __init__(self, endpoint: iroh.Endpoint) -> None:
        self._ep = endpoint
        self.local_id: bytes = endpoint.id().to_bytes()
        self.address: str = str(iroh.EndpointTicket.from_addr(endpoint.addr()))

    @classmethod
    async def bind(cls, secret_key: bytes, *, bind: str = "127.0.0.1:0", relay: bool = False) -> IrohTransport:
        """Bind an endpoint on ``bind`` ("host:port") whose id is the public key of ``secret_key``."""
        try:
            opts = iroh.EndpointOptions(
                preset=iroh.preset_n0() if relay else iroh.preset_minimal(),
                bind_addr=bind,
                secret_key=bytes(secret_key),
                alpns=[ALPN],
                relay_mode=iroh.RelayMode.default_mode() if relay else iroh.RelayMode.disabled(),
            )
            ep = await iroh.Endpoint.bind(opts)
        except iroh.IrohError as exc:
            raise TransportError(f"cannot bind iroh endpoint on {bind}: {_why(exc)}") from exc
        return cls(ep)

    async def connect(self, peer_id: bytes, address: str) -> IrohConnection:
        try:
            addr = iroh.EndpointTicket.from_string(address).endpoint_addr()
        except iroh.IrohError as exc:
            raise TransportError(f"bad address for {peer_id.hex()[:16]}: {address[:40]!r}") from exc
        if addr.id().to_bytes() != peer_id:
            raise TransportError(f"address {address[:24]}… belongs to another endpoint than {peer_id.hex()[:16]}")
        try:
            conn = await self._ep.connect(addr, ALPN)
        except iroh.IrohError as exc:
            raise TransportError(f"connect to {peer_id.hex()[:16]} failed: {_why(exc)}") from exc
        return IrohConnection(conn)

    async def accept(self) -> IrohConnection | None:
        while True:
            try:
                inc = await self._ep.accept_next()
            except iroh.IrohError:
                return None
            if inc is None:
                return None
            try:
                conn = await (await inc.accept()).connect()
            except iroh.IrohError:
                continue  # a handshake that failed is the dialer's problem; keep accepting
            return IrohConnection(conn)

    async def close(self) -> None:
        try:
            await self._ep.close()
        except iroh.IrohError:
            pass
