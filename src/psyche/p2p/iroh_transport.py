"""The default transport: iroh QUIC endpoints (a thin adapter over the ``iroh`` bindings).

Addresses are iroh ``EndpointTicket`` strings (endpoint id + direct addresses
+ optional relay). By default relays are disabled and only direct addresses are
used, which is what a LAN or a test on loopback needs; ``relay=True`` uses
iroh's n0 preset with its public relays and hole punching for the internet.
iroh errors are translated to :class:`TransportError` here, at the boundary.

A peer that was killed and restarted with the same key at a new address needs
care. iroh keeps one path state per endpoint id while any connection to it is
open, and sends a new connection's handshake to the path it selected, not to the
address we dial: that is still the dead process's address (QUIC thinks the dead
connections open until their idle timeout, about 30 s, and even after that a
connection from the restarted process keeps the old selection alive). So the
dial hangs. :meth:`IrohTransport.connect` therefore closes every connection to
an endpoint id that has been seen at an address the new ticket does not list,
which resets iroh's state for it; a live connection closed this way is redialed
by its owner.

The ``iroh`` wheel's generated bindings (uniffi before 0.32) copy every byte of a
``bytes`` argument into Rust's buffer in an interpreted loop, ~100-250 ns a byte,
which capped a stream at a few MB/s; :func:`install_fast_buffer_copy` replaces
that one method with a ``memmove`` when (and only when) the installed bindings
still carry the loop.
"""

from __future__ import annotations

import ctypes
import os

import iroh
import iroh.iroh_ffi as _ffi

from psyche.p2p.errors import TransportError
from psyche.p2p.wire import ALPN, Buffer

FAST_COPY_ENV = "PSYCHE_IROH_FAST_COPY"
"""Set to ``0`` to keep the bindings' own per-byte copy (to measure it, or to rule the fix out)."""


def _memmove_write(self, value) -> None:
    """``_UniffiRustBufferBuilder.write`` as uniffi 0.32 does it: one memmove of the whole value."""
    data = value if isinstance(value, bytes) else bytes(value)
    n = len(data)
    with self._reserve(n):  # grows the Rust buffer first; self.rbuf may be a new one after this
        if n:
            ctypes.memmove(ctypes.addressof(self.rbuf.data.contents) + self.rbuf.len, data, n)


def install_fast_buffer_copy(builder: type | None = None) -> bool:
    """Make the bindings copy a ``bytes`` argument into Rust's buffer with one memmove.

    Applies only while ``builder.write`` (default: the installed bindings'
    ``iroh.iroh_ffi._UniffiRustBufferBuilder``) is the old per-byte loop
    (uniffi < 0.32; the upstream fix is uniffi-rs PR 2824, tracked for iroh in
    iroh-ffi issue 229), so a fixed wheel is left alone; and not at all when
    ``PSYCHE_IROH_FAST_COPY=0``. Returns True iff writes go through one memmove
    after the call (ours or the binding's own). Idempotent.
    """
    if builder is None:
        builder = getattr(_ffi, "_UniffiRustBufferBuilder", None)
    write = getattr(builder, "write", None)
    if write is None:
        return False
    if write is _memmove_write:
        return True
    names = getattr(getattr(write, "__code__", None), "co_names", ())
    if "memmove" in names:
        return True  # a fixed binding: nothing to do
    if os.environ.get(FAST_COPY_ENV, "1") == "0" or "enumerate" not in names:
        return False  # switched off, or a copy we don't recognise: leave it as it is
    builder.write = _memmove_write  # type: ignore[union-attr]
    return True


FAST_BUFFER_COPY = install_fast_buffer_copy()
"""Whether writes go through one memmove (ours, or a fixed binding's)."""


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

    async def write(self, data: Buffer) -> None:
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

    def remote_addresses(self) -> set[str]:
        """The peer's UDP addresses ("ip:port") on this connection's direct paths (none if relayed or closed)."""
        try:
            return {p.remote_addr for p in self._conn.paths() if p.is_ip}
        except iroh.IrohError:
            return set()

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
        # per peer: our open connections (both directions), and the peer addresses seen on
        # their direct paths since the peer last had no open connection (iroh's state lifetime)
        self._conns: dict[bytes, list[IrohConnection]] = {}
        self._seen: dict[bytes, set[str]] = {}

    def _open_conns(self, peer_id: bytes) -> list[IrohConnection]:
        conns = [c for c in self._conns.pop(peer_id, []) if not c.is_closed]
        if conns:
            self._conns[peer_id] = conns
            seen = self._seen.setdefault(peer_id, set())
            for c in conns:
                seen |= c.remote_addresses()
        else:
            self._seen.pop(peer_id, None)  # iroh forgot this peer's paths too
        return conns

    def _track(self, conn: IrohConnection) -> IrohConnection:
        self._conns[conn.remote_id] = [*self._open_conns(conn.remote_id), conn]
        self._seen.setdefault(conn.remote_id, set()).update(conn.remote_addresses())
        return conn

    def _forget_old_incarnation(self, peer_id: bytes, addresses: list[str]) -> None:
        """Close all connections to ``peer_id`` if one of them was seen at an address other
        than ``addresses``: it belongs to an earlier process with the same key, and iroh would
        send our handshake there (see the module docstring)."""
        conns = self._open_conns(peer_id)
        if not conns or not addresses or not self._seen.get(peer_id, set()) - set(addresses):
            return  # nothing open, a relay-only ticket, or every path at a listed address
        for c in conns:
            c.close()
        self._conns.pop(peer_id, None)
        self._seen.pop(peer_id, None)

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
        self._forget_old_incarnation(peer_id, addr.direct_addresses())
        try:
            conn = await self._ep.connect(addr, ALPN)
        except iroh.IrohError as exc:
            raise TransportError(f"connect to {peer_id.hex()[:16]} failed: {_why(exc)}") from exc
        return self._track(IrohConnection(conn))

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
            return self._track(IrohConnection(conn))

    async def close(self) -> None:
        try:
            await self._ep.close()
        except iroh.IrohError:
            pass
