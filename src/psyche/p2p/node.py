"""P2PNode: the asyncio layer that moves bytes for the sans-io parts.

It owns a :class:`~psyche.p2p.transport.Transport`, a
:class:`~psyche.p2p.gossip.Gossip` state, a :class:`~psyche.p2p.blobs.BlobStore`
and an optional :class:`~psyche.p2p.model.ModelProvider`, and speaks one
request per stream:

=============== ===================================== =================================
request frame   reply                                 purpose
=============== ===================================== =================================
``Push``        ``PushAck``                           broadcast envelopes (ack = processed)
``GetBlob``     ``DataHeader`` + raw bytes            a result blob by content hash
``GetManifest`` ``DataHeader`` + manifest bytes       the served model's manifest
``GetPart``     ``DataHeader`` + raw bytes            one part of a tensor or file
=============== ===================================== =================================

Each node dials its own outbound connection per peer and serves inbound ones;
only current members are served. A node keeps at most one outbound connection
per peer, so a newer inbound connection from a peer replaces the older one (which
may belong to a killed process that QUIC thinks open until its idle timeout).
Nothing a peer sends is raised to the caller: it is dropped and counted in
:attr:`P2PNode.counters`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import overload

import msgspec

from psyche.identity import Identity
from psyche.p2p.blobs import BlobCheckError, BlobReceiver, BlobStore
from psyche.p2p.errors import BlobUnavailable, ModelMismatch, ModelUnavailable, NotAMember, TransportError
from psyche.p2p.gossip import Gossip
from psyche.p2p.model import (
    FetchedModel,
    Manifest,
    MemorySink,
    ModelProvider,
    ModelSink,
    PartRef,
    RawTensor,
    choose_manifest,
    decode_manifest,
)
from psyche.p2p.ratelimit import RateLimit
from psyche.p2p.stats import PeerStats
from psyche.p2p.transport import Connection, Stream, Transport, read_exactly
from psyche.p2p.wire import (
    MAX_FRAME,
    Buffer,
    MAX_PUSH_BATCH,
    DataHeader,
    GetBlob,
    GetManifest,
    GetPart,
    Message,
    Push,
    PushAck,
    SignedMessage,
    decode_frame,
    encode_frame,
    frame_length,
)

log = logging.getLogger("psyche.p2p")

MessageCallback = Callable[[bytes, Message], "Awaitable[None] | None"]
_CHUNK = 1 << 20
_THROTTLED_CHUNK = 64 << 10


class _Stalled(Exception):
    """No bytes arrived within the stall timeout."""


@dataclass(slots=True)
class _Link:
    conn: Connection | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class P2PNode:
    """One node of a run's P2P network. Create with :meth:`start`; close with :meth:`close`.

    >>> node = await P2PNode.start(Identity.load_or_create("key"), "my-run")  # doctest: +SKIP
    >>> node.set_members({peer_pub: peer_address})                            # doctest: +SKIP
    >>> await node.broadcast(Heartbeat(run_id="my-run", step=3))              # doctest: +SKIP
    """

    def __init__(
        self,
        identity: Identity,
        run_id: str,
        transport: Transport,
        *,
        step_window: tuple[int, int] = (2, 2),
        resend_interval: float = 0.5,
        fanout: int | None = None,
        max_parallel_downloads: int = 8,
        connect_timeout: float = 5.0,
        stall_timeout: float = 5.0,
        keep_blob_steps: int = 2,
        upload_rate: float | None = None,
        download_rate: float | None = None,
        message_queue_size: int = 10_000,
    ) -> None:
        if transport.local_id != identity.public_key:
            raise ValueError("the transport is bound to another key than the identity")
        self.identity = identity
        self.public_key = identity.public_key
        self.run_id = run_id
        self.transport = transport
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self.keep_blob_steps = keep_blob_steps
        self._up = RateLimit(upload_rate)
        self._down = RateLimit(download_rate)
        self.gossip = Gossip(
            local_id=self.public_key, run_id=run_id, step_window=step_window,
            resend_interval=resend_interval, fanout=fanout,
        )
        self.blobs = BlobStore()
        self._members: dict[bytes, str] = {}
        self._links: dict[bytes, _Link] = {}
        self._inbound: dict[bytes, Connection] = {}  # the latest accepted connection per peer
        self._stats: dict[bytes, PeerStats] = {}
        self._extra_counters: Counter[str] = Counter()
        self._callbacks: list[MessageCallback] = []
        self._queue: asyncio.Queue[tuple[bytes, Message] | None] = asyncio.Queue(maxsize=message_queue_size)
        self._download_slots = asyncio.Semaphore(max_parallel_downloads)
        self._inflight: dict[bytes, asyncio.Future[bytes]] = {}
        self._provider: ModelProvider | None = None
        self._provider_digest: bytes | None = None
        self._provider_manifest: bytes | None = None
        self._wake = asyncio.Event()
        self._out: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._senders: dict[bytes, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._spawn(self._accept_loop())
        self._spawn(self._gossip_loop())

    @classmethod
    async def start(
        cls,
        identity: Identity,
        run_id: str,
        *,
        bind: str = "127.0.0.1:0",
        transport: Transport | None = None,
        relay: bool = False,
        **options,
    ) -> P2PNode:
        """Bind a transport (iroh unless ``transport`` is given) and start serving.

        ``options`` are the keyword options of :class:`P2PNode` (``step_window``,
        ``resend_interval``, ``fanout``, ``max_parallel_downloads``,
        ``connect_timeout``, ``stall_timeout``, ``keep_blob_steps``, ``upload_rate``,
        ``download_rate``; rates in bytes per second, None for no cap).
        """
        if transport is None:
            from psyche.p2p.iroh_transport import IrohTransport

            transport = await IrohTransport.bind(identity.secret_bytes, bind=bind, relay=relay)
        return cls(identity, run_id, transport, **options)

    # --- caller state ---------------------------------------------------------

    @property
    def address(self) -> str:
        """This node's address (an iroh ticket string): what it puts in its coordinator Join."""
        return self.transport.address

    @property
    def step(self) -> int | None:
        """The current step (None until :meth:`set_step`)."""
        return self.gossip.step

    @property
    def members(self) -> dict[bytes, str]:
        """Current member set ``{public key: address}`` (a copy)."""
        return dict(self._members)

    def set_members(self, members: dict[bytes, str]) -> None:
        """Replace the member set. Only members are accepted, served and dialed; our own key may be included."""
        members = {bytes(k): v for k, v in members.items()}
        for peer in set(self._links) | set(self._inbound):
            if members.get(peer) != self._members.get(peer):
                self._drop_link(peer)  # departed, or its address changed: redial next time
            if peer not in members:
                self._close_inbound(peer)  # departed: nothing it sends is served any more
        self._members = members
        self.gossip.set_members(set(members) - {self.public_key}, now=self._loop.time())
        self._wake.set()

    def set_step(self, step: int) -> None:
        """Move to ``step``: messages outside the step window are rejected from now on,
        and blobs tagged older than ``step - keep_blob_steps`` are dropped."""
        self.gossip.set_step(step)
        self.blobs.drop_older_than(step - self.keep_blob_steps)

    def set_upload_rate(self, bytes_per_second: float | None) -> None:
        """Cap what this node uploads (result blobs and model parts together), or None for no cap."""
        self._up.set_rate(bytes_per_second)

    def set_download_rate(self, bytes_per_second: float | None) -> None:
        """Cap what this node downloads (result blobs and model parts together), or None for no cap.
        The cap is kept by reading slower, so QUIC's flow control slows the sender down."""
        self._down.set_rate(bytes_per_second)

    @property
    def upload_rate(self) -> float | None:
        """The upload cap in bytes per second (None: none)."""
        return self._up.rate

    @property
    def download_rate(self) -> float | None:
        """The download cap in bytes per second (None: none)."""
        return self._down.rate

    @property
    def counters(self) -> dict[str, int]:
        """Dropped input by reason (``bad_signature``, ``non_member``, ``replay``, ``wrong_run``,
        ``malformed``, ``duplicate``, ``bad_blob``, ...) and a few activity counts."""
        c = Counter(self.gossip.counters)
        c.update(self._extra_counters)
        return dict(c)

    def stats(self) -> dict[bytes, PeerStats]:
        """Per-peer traffic statistics (live objects; read, don't modify)."""
        for peer, link in self._links.items():
            if link.conn is not None and not link.conn.is_closed:
                self._peer(peer).rtt_ms = link.conn.rtt_ms()
        return dict(self._stats)

    def _peer(self, peer: bytes) -> PeerStats:
        s = self._stats.get(peer)
        if s is None:
            s = self._stats[peer] = PeerStats()
        return s

    # --- broadcast ----------------------------------------------------------------

    async def broadcast(self, msg: Message) -> bytes:
        """Sign ``msg`` and send it to every member (forwarded, re-sent until acked or out of
        the step window). Returns the message id. ``msg.run_id`` must be this node's run."""
        if msg.run_id != self.run_id:
            raise ValueError(f"message for run {msg.run_id!r} broadcast on a node of run {self.run_id!r}")
        env = SignedMessage.create(self.identity, msg)
        mid = self.gossip.originate(env, step=msg.step, now=self._loop.time())
        self._wake.set()
        await asyncio.sleep(0)
        return mid

    def on_message(self, callback: MessageCallback) -> None:
        """Call ``callback(sender, message)`` for every verified new message (sync or async;
        its exceptions are logged and swallowed so one bad handler cannot stop the node)."""
        self._callbacks.append(callback)

    async def messages(self) -> AsyncIterator[tuple[bytes, Message]]:
        """Verified new messages as ``(origin public key, message)``, until the node closes."""
        while True:
            item = await self._queue.get()
            if item is None:
                self._queue.put_nowait(None)  # let other iterators end too
                return
            yield item

    def pending_pushes(self) -> int:
        """How many (message, peer) deliveries are not acknowledged yet."""
        return self.gossip.pending_count()

    async def send_raw_envelopes(self, peer: bytes, envelopes: list[bytes]) -> int:
        """Push envelope bytes to ``peer`` exactly as given (no signing, no bookkeeping).

        For tools and tests that play a misbehaving peer; returns the peer's ack count.
        """
        return await self._push(peer, envelopes)

    def _deliver(self, sender: bytes, msg: Message) -> None:
        for cb in self._callbacks:
            try:
                r = cb(sender, msg)
                if inspect.isawaitable(r):
                    self._spawn(r)
            except Exception:  # noqa: BLE001 — the caller's handler must not kill the node
                log.exception("p2p: on_message callback failed")
        if self._queue.full():
            self._queue.get_nowait()
            self._extra_counters["queue_overflow"] += 1
        self._queue.put_nowait((sender, msg))

    async def _gossip_loop(self) -> None:
        while not self._closed:
            now = self._loop.time()
            for peer, items in self.gossip.due(now).items():
                self._out.setdefault(peer, []).extend(items)
                if peer not in self._senders:
                    self._senders[peer] = self._spawn(self._sender(peer))
            deadline = self.gossip.next_deadline()
            timeout = 1.0 if deadline is None else min(1.0, max(0.0, deadline - self._loop.time()))
            self._wake.clear()
            try:
                async with asyncio.timeout(max(timeout, 0.005)):
                    await self._wake.wait()
            except asyncio.TimeoutError:
                pass

    async def _sender(self, peer: bytes) -> None:
        try:
            while self._out.get(peer) and not self._closed:
                items = self._out[peer]
                batch, self._out[peer] = items[:MAX_PUSH_BATCH], items[MAX_PUSH_BATCH:]
                first: dict[bytes, bytes] = {}
                for m, e in batch:
                    first.setdefault(m, e)  # a message queued twice goes once
                batch = list(first.items())
                try:
                    await self._push(peer, [e for _, e in batch])
                except (TransportError, NotAMember, _Stalled, EOFError, ValueError, msgspec.DecodeError) as exc:
                    log.debug("p2p: push to %s failed: %s", peer.hex()[:8], exc)
                    continue  # still pending in gossip: re-sent after its backoff
                self.gossip.acked(peer, [m for m, _ in batch])
                self._peer(peer).messages_out += len(batch)
        finally:
            self._senders.pop(peer, None)

    async def _push(self, peer: bytes, envelopes: list[bytes]) -> int:
        stream = await self._open(peer)
        try:
            await stream.write(encode_frame(Push(envelopes)))
            await stream.finish()
            reply = await self._read_frame(stream)
        except BaseException:
            stream.abort()
            raise
        if not isinstance(reply, PushAck):
            raise ValueError(f"expected a push ack, got {type(reply).__name__}")
        self._peer(peer).last_seen = self._loop.time()
        return reply.count

    # --- blobs ------------------------------------------------------------------------

    def publish_blob(self, data: bytes, *, step: int | None = None) -> bytes:
        """Store ``data`` for peers to fetch and return its 32-byte content hash (blake3).

        The blob is tagged with ``step`` (default: the current step) and dropped
        once it is more than ``keep_blob_steps`` steps old; pass a step of None
        via :meth:`BlobStore.put` to pin one.
        """
        return self.blobs.put(data, step=self.step if step is None else step)

    def has_blob(self, blob_hash: bytes) -> bool:
        """True if this node holds (and serves) ``blob_hash``."""
        return blob_hash in self.blobs

    def drop_blobs_older_than(self, step: int) -> int:
        """Drop blobs tagged with a step < ``step``; returns how many."""
        return self.blobs.drop_older_than(step)

    async def fetch_blob(
        self,
        blob_hash: bytes,
        size: int,
        providers: list[bytes],
        *,
        timeout: float = 60.0,
        step: int | None = None,
    ) -> bytes:
        """Download blob ``blob_hash`` of exactly ``size`` bytes and verify its hash.

        Providers are tried in the given order (put the publisher first; add
        peers that may have fetched it already), passes repeat until ``timeout``
        seconds have passed. A provider that sends a wrong size or hash is
        counted (``bad_blob``) and skipped; one that stalls for ``stall_timeout``
        is abandoned. The verified blob is stored (so this node serves it too)
        with tag ``step`` (default: current step). At most
        ``max_parallel_downloads`` fetches run at once; concurrent fetches of the
        same hash share one download. Raises :class:`BlobUnavailable`.
        """
        have = self.blobs.get(blob_hash)
        if have is not None:
            return have
        fut = self._inflight.get(blob_hash)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = self._loop.create_future()
        self._inflight[blob_hash] = fut
        try:
            data = await self._fetch_blob(blob_hash, size, providers, timeout=timeout)
            self.blobs.put_verified(blob_hash, data, step=self.step if step is None else step)
            fut.set_result(data)
            return data
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: sharers re-raise it themselves
            raise
        finally:
            self._inflight.pop(blob_hash, None)

    async def _fetch_blob(self, blob_hash: bytes, size: int, providers: list[bytes], *, timeout: float) -> bytes:
        deadline = self._loop.time() + timeout
        attempts: list[tuple[bytes, str]] = []
        candidates = [p for p in dict.fromkeys(providers) if p != self.public_key]
        backoff = 0.1
        async with self._download_slots:
            while True:
                for peer in candidates:
                    remaining = deadline - self._loop.time()
                    if remaining <= 0:
                        raise BlobUnavailable(blob_hash, size, attempts)
                    try:
                        async with asyncio.timeout(remaining):
                            return await self._get_blob_from(peer, blob_hash, size)
                    except BlobCheckError as exc:
                        self._extra_counters["bad_blob"] += 1
                        self._extra_counters[f"bad_blob_{exc.reason}"] += 1
                        self._peer(peer).bad_blobs += 1
                        self._drop_link(peer)  # don't trust the rest of that stream's bytes
                        log.warning("p2p: bad blob %s from %s: %s", blob_hash.hex()[:8], peer.hex()[:8], exc)
                        attempts.append((peer, f"bad_blob:{exc.reason}"))
                    except _Missing:
                        attempts.append((peer, "missing"))
                    except _Refused:
                        attempts.append((peer, "refused"))
                    except NotAMember:
                        attempts.append((peer, "not_a_member"))
                    except (TransportError, _Stalled, EOFError, asyncio.TimeoutError, ValueError, msgspec.DecodeError) as exc:
                        self._peer(peer).failures += 1
                        self._drop_link(peer)
                        attempts.append((peer, f"{type(exc).__name__}:{str(exc)[:60]}"))
                remaining = deadline - self._loop.time()
                if remaining <= 0 or not candidates:
                    raise BlobUnavailable(blob_hash, size, attempts)
                await asyncio.sleep(min(backoff, remaining))
                backoff = min(backoff * 2, 2.0)

    async def _get_blob_from(self, peer: bytes, blob_hash: bytes, size: int) -> bytes:
        t0 = self._loop.time()
        stream = await self._open(peer)
        try:
            await stream.write(encode_frame(GetBlob(blob_hash, size)))
            await stream.finish()
            data = await self._read_payload(stream, peer, size=size, expected_hash=blob_hash)
        except BaseException:
            stream.abort()
            raise
        self._peer(peer).record_in(len(data), self._loop.time() - t0, now=self._loop.time())
        return data

    @overload
    async def _read_payload(self, stream: Stream, peer: bytes, *, size: int, expected_hash: bytes | None,
                            into: None = None) -> bytes: ...

    @overload
    async def _read_payload(self, stream: Stream, peer: bytes, *, size: int, expected_hash: bytes | None,
                            into: memoryview | None) -> bytes | memoryview: ...

    async def _read_payload(self, stream: Stream, peer: bytes, *, size: int, expected_hash: bytes | None,
                            into: memoryview | None = None) -> bytes | memoryview:
        """Read a DataHeader and its raw bytes. With ``expected_hash`` the size must be exactly
        ``size`` and the hash must match (else BlobCheckError); without, ``size`` is a cap.
        ``into`` (exactly ``size`` writable bytes) receives the bytes in place."""
        header = await self._read_frame(stream)
        if not isinstance(header, DataHeader):
            raise ValueError(f"expected a data header, got {type(header).__name__}")
        if header.status == "missing":
            raise _Missing()
        if header.status == "refused":
            raise _Refused()
        if expected_hash is None:
            if header.size > size:
                raise BlobCheckError("oversized", f"{header.size} bytes announced, limit {size}")
            receiver = BlobReceiver(expected_hash=None, size=header.size)
        else:
            receiver = BlobReceiver(expected_hash=expected_hash, size=size, into=into)
            receiver.check_announced(header.size)
        stats = self._peer(peer)
        while receiver.remaining > 0:
            capped = self._down.rate is not None
            chunk = await self._read_some(stream, min(receiver.remaining, _THROTTLED_CHUNK if capped else _CHUNK))
            if not chunk:
                break
            receiver.feed(chunk)
            stats.bytes_in += len(chunk)  # counted on arrival, so partial transfers show too
            if capped:
                stats.throttled_in_s += await self._wait_for(self._down, len(chunk))
        if receiver.remaining == 0:
            extra = await self._read_some(stream, 1)
            if extra:
                raise BlobCheckError("oversized", f"peer sent more than the announced {receiver.size} bytes")
        return receiver.finish()

    # --- model sharing -----------------------------------------------------------------

    def serve_model(self, provider: ModelProvider | None) -> bytes | None:
        """Serve ``provider``'s model to members (replacing any previous one; None stops).
        Returns the manifest digest (sha256) peers will see, or None."""
        self._provider = provider
        if provider is None:
            self._provider_digest = self._provider_manifest = None
            return None
        m = provider.manifest()
        self._provider_manifest = m.encode()
        self._provider_digest = m.digest()
        return self._provider_digest

    async def fetch_model(
        self,
        providers: list[bytes],
        *,
        into: ModelSink | None = None,
        manifest_digest: bytes | None = None,
        min_agree: int = 1,
        max_providers: int = 3,
        streams_per_peer: int = 2,
        timeout: float = 600.0,
        max_manifest_bytes: int = MAX_FRAME,
    ) -> FetchedModel:
        """Fetch a model from ``providers`` in parallel, part by part, verifying every part.

        The manifest is trusted per :func:`~psyche.p2p.model.choose_manifest`:
        the one whose sha256 is ``manifest_digest`` if given, else the one served
        by a strict majority of the providers that answered (and by at least
        ``min_agree``). ``into`` says where the bytes go (default: a
        :class:`~psyche.p2p.model.MemorySink`); each part is verified and lands in
        its final place there, so the model is held once.

        Up to ``max_providers`` of the agreeing providers serve at a time,
        ``streams_per_peer`` parts each; the rest stand by. A provider that stops
        answering (two failures in a row), says it no longer serves the model, or
        sends two bad parts is dropped, its parts go back in the queue and a
        standby takes its place. Raises :class:`ModelMismatch` if the manifest does
        not fit ``into``, :class:`ModelUnavailable` if no trusted manifest or not
        every part could be had before ``timeout``.
        """
        if max_providers < 1 or streams_per_peer < 1:
            raise ValueError("max_providers and streams_per_peer must be >= 1")
        deadline = self._loop.time() + timeout
        candidates = [p for p in dict.fromkeys(providers) if p != self.public_key]

        async def ask(peer: bytes) -> tuple[bytes, bytes | None]:
            try:
                stream = await self._open(peer)
                try:
                    await stream.write(encode_frame(GetManifest()))
                    await stream.finish()
                    return peer, await self._read_payload(stream, peer, size=max_manifest_bytes, expected_hash=None)
                except BaseException:
                    stream.abort()
                    raise
            except (TransportError, NotAMember, _Stalled, _Missing, _Refused, EOFError, ValueError, BlobCheckError, msgspec.DecodeError, asyncio.TimeoutError) as exc:
                log.info("p2p: no manifest from %s: %s", peer.hex()[:8], type(exc).__name__)
                return peer, None

        replies = dict(await asyncio.gather(*(ask(p) for p in candidates)))
        answered = {p: d for p, d in replies.items() if d is not None}
        chosen = choose_manifest(answered, manifest_digest=manifest_digest, min_agree=min_agree)
        if chosen is None:
            raise ModelUnavailable(
                f"no trusted manifest: {len(answered)} of {len(candidates)} providers answered"
                + (f", none with digest {manifest_digest.hex()[:16]}" if manifest_digest else ", no strict majority agreed")
            )
        manifest_bytes, agreeing = chosen
        for p in set(answered) - set(agreeing):
            self._extra_counters["bad_manifest"] += 1
            self._peer(p).bad_blobs += 1
        try:
            manifest = decode_manifest(manifest_bytes)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            raise ModelUnavailable(f"the trusted manifest is malformed: {exc}") from exc
        digest = manifest.digest()
        dest = (into if into is not None else MemorySink()).buffers(manifest)
        for kind, e in manifest.entries():
            buf = dest.get((kind, e.name))
            if buf is None or buf.readonly or buf.nbytes != e.nbytes:
                raise ModelMismatch(f"{kind} {e.name!r}: the destination gives no writable buffer of {e.nbytes} bytes")

        # A random order of the agreeing providers spreads joiners' load over every peer that holds the model.
        order = random.sample(agreeing, len(agreeing))
        fetch = _ModelFetch(self, digest, manifest, dest, order, max_providers, streams_per_peer)
        try:
            async with asyncio.timeout(max(0.0, deadline - self._loop.time())):
                await fetch.run()
        except asyncio.TimeoutError:
            pass
        finally:
            fetch.stop()
        if fetch.left:
            raise ModelUnavailable(f"{fetch.left} part(s) of model {digest.hex()[:16]} could not be fetched from "
                                   f"{len(agreeing)} provider(s) ({len(fetch.dropped)} dropped)")
        tensors = {e.name: RawTensor(e.dtype, tuple(e.shape), dest[("tensor", e.name)]) for e in manifest.tensors}
        files = {e.name: bytes(dest[("file", e.name)]) for e in manifest.files}
        return FetchedModel(manifest, tensors, files, dict(fetch.sources))

    async def _get_part(self, peer: bytes, digest: bytes, ref: PartRef, into: memoryview | None = None) -> bytes | memoryview:
        stream = await self._open(peer)
        try:
            await stream.write(encode_frame(GetPart(digest, ref.kind, ref.name, ref.index)))
            await stream.finish()
            return await self._read_payload(stream, peer, size=ref.length, expected_hash=ref.hash, into=into)
        except BaseException:
            stream.abort()
            raise

    # --- connections ---------------------------------------------------------------------

    async def _open(self, peer: bytes) -> Stream:
        """A new stream to ``peer`` on our outbound connection (dialing it if needed)."""
        address = self._members.get(peer)
        if address is None:
            raise NotAMember(peer)
        link = self._links.setdefault(peer, _Link())
        async with link.lock:
            if link.conn is None or link.conn.is_closed:
                link.conn = None
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        link.conn = await self.transport.connect(peer, address)
                except asyncio.TimeoutError:
                    self._peer(peer).failures += 1
                    raise TransportError(f"connect to {peer.hex()[:16]} timed out after {self.connect_timeout}s") from None
                except TransportError:
                    self._peer(peer).failures += 1
                    raise
            conn = link.conn
        try:
            async with asyncio.timeout(self.stall_timeout):
                return await conn.open_stream()
        except asyncio.TimeoutError:
            self._drop_link(peer)
            raise _Stalled(f"opening a stream to {peer.hex()[:16]} stalled") from None
        except TransportError:
            self._drop_link(peer)
            raise

    def _drop_link(self, peer: bytes) -> None:
        link = self._links.get(peer)
        if link is not None and link.conn is not None:
            link.conn.close()
            link.conn = None

    async def _read_some(self, stream: Stream, n: int) -> bytes:
        try:
            async with asyncio.timeout(self.stall_timeout):
                return await stream.read(n)
        except asyncio.TimeoutError:
            raise _Stalled(f"no data for {self.stall_timeout}s") from None

    async def _read_frame(self, stream: Stream, *, max_frame: int = MAX_FRAME):
        async def read() -> bytes:
            n = frame_length(await read_exactly(stream, 4), max_frame=max_frame)
            return await read_exactly(stream, n)

        try:
            async with asyncio.timeout(self.stall_timeout):
                payload = await read()
        except asyncio.TimeoutError:
            raise _Stalled(f"no frame within {self.stall_timeout}s") from None
        return decode_frame(payload)

    # --- serving -----------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        while not self._closed:
            conn = await self.transport.accept()
            if conn is None:
                return
            if conn.remote_id not in self._members:
                self._extra_counters["non_member"] += 1
                conn.close()
                continue
            # the peer dials one connection to us at a time: an older one is abandoned,
            # maybe by a process that was killed and still looks open to QUIC
            self._close_inbound(conn.remote_id)
            self._inbound[conn.remote_id] = conn
            self._spawn(self._serve_connection(conn))

    def _close_inbound(self, peer: bytes) -> None:
        conn = self._inbound.pop(peer, None)
        if conn is not None:
            conn.close()

    async def _serve_connection(self, conn: Connection) -> None:
        try:
            while not self._closed:
                try:
                    stream = await conn.accept_stream()
                except TransportError:
                    return
                self._spawn(self._serve_stream(conn.remote_id, stream))
        finally:
            if self._inbound.get(conn.remote_id) is conn:
                del self._inbound[conn.remote_id]

    async def _serve_stream(self, peer: bytes, stream: Stream) -> None:
        try:
            try:
                frame = await self._read_frame(stream)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError, EOFError):
                self._extra_counters["malformed"] += 1
                stream.abort()
                return
            if isinstance(frame, Push):
                count = 0
                now = self._loop.time()
                for raw in frame.envelopes[:MAX_PUSH_BATCH]:
                    verdict = self.gossip.receive(raw, from_peer=peer, now=now)
                    count += 1
                    if verdict.delivery is not None:
                        self._deliver(verdict.delivery.sender, verdict.delivery.message)
                if peer in self._members:
                    self._peer(peer).messages_in += count
                self._wake.set()  # forwards were queued
                await stream.write(encode_frame(PushAck(count)))
                await stream.finish()
                return
            if peer not in self._members:
                self._extra_counters["non_member"] += 1
                await self._send_header(stream, DataHeader("refused"))
                return
            if isinstance(frame, GetBlob):
                data = self.blobs.get(frame.hash)
                await self._send_data(stream, peer, data)
            elif isinstance(frame, GetManifest):
                await self._send_data(stream, peer, self._provider_manifest)
            elif isinstance(frame, GetPart):
                await self._send_data(stream, peer, self._read_part(frame))
            else:
                self._extra_counters["malformed"] += 1
                stream.abort()
        except (TransportError, _Stalled, EOFError):
            stream.abort()  # the requester went away; nothing to tell anyone
        except Exception:  # noqa: BLE001 — a serving bug must not take the node down
            log.exception("p2p: serving a stream from %s failed", peer.hex()[:8])
            stream.abort()

    def _read_part(self, req: GetPart) -> Buffer | None:
        if self._provider is None or req.digest != self._provider_digest:
            return None
        manifest: Manifest = self._provider.manifest()
        entry = manifest.entry(req.kind, req.name)
        if entry is None or not 0 <= req.index < len(entry.parts):
            return None
        off = req.index * manifest.part_size
        return self._provider.read(req.kind, req.name, off, min(manifest.part_size, entry.nbytes - off))

    async def _send_header(self, stream: Stream, header: DataHeader) -> None:
        await stream.write(encode_frame(header))
        await stream.finish()

    async def _send_data(self, stream: Stream, peer: bytes, data: Buffer | None) -> None:
        if data is None:
            await self._send_header(stream, DataHeader("missing"))
            return
        t0 = self._loop.time()
        await stream.write(encode_frame(DataHeader("ok", len(data))))
        if self._up.rate is None:
            await stream.write(data)  # one call: each crossing of the FFI costs a copy and a wakeup
        else:
            mv = memoryview(data)
            for i in range(0, len(data), _THROTTLED_CHUNK):
                piece = mv[i : i + _THROTTLED_CHUNK]
                self._peer(peer).throttled_out_s += await self._wait_for(self._up, len(piece))
                await stream.write(piece)
        await stream.finish()
        self._peer(peer).record_out(len(data), self._loop.time() - t0, now=self._loop.time())

    async def _wait_for(self, limit: RateLimit, nbytes: int) -> float:
        """Wait as long as ``limit`` says ``nbytes`` must; returns the seconds waited."""
        delay = limit.reserve(nbytes, self._loop.time())
        if delay > 0:
            await asyncio.sleep(delay)
        return delay

    # --- lifecycle -------------------------------------------------------------------------

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("p2p: background task failed", exc_info=task.exception())

    async def close(self) -> None:
        """Stop serving, close every connection and the transport; iterators of :meth:`messages` end."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        for link in self._links.values():
            if link.conn is not None:
                link.conn.close()
        for peer in list(self._inbound):
            self._close_inbound(peer)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transport.close()
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def __aenter__(self) -> P2PNode:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class _ModelFetch:
    """One :meth:`P2PNode.fetch_model` transfer: a queue of parts served by a changing set of providers."""

    def __init__(self, node: P2PNode, digest: bytes, manifest: Manifest, dest: dict, providers: list[bytes],
                 max_providers: int, streams_per_peer: int) -> None:
        self.node = node
        self.digest = digest
        self.dest = dest
        self.providers = providers
        self.standby = list(providers[max_providers:])
        self.streams_per_peer = streams_per_peer
        self.todo: asyncio.Queue[PartRef] = asyncio.Queue()
        for ref in manifest.parts():
            self.todo.put_nowait(ref)
        self.left = self.todo.qsize()
        self.failed_on: dict[tuple[str, str, int], set[bytes]] = {}
        self.sources: Counter[bytes] = Counter()
        self.failures: Counter[bytes] = Counter()  # consecutive transport failures
        self.bad: Counter[bytes] = Counter()  # parts that failed their hash
        self.dropped: set[bytes] = set()
        self.active: set[bytes] = set()  # enlisted (serving or dropped since)
        self.done = asyncio.Event()
        self.workers: list[asyncio.Task] = []
        for peer in providers[:max_providers]:
            self._enlist(peer)

    def _enlist(self, peer: bytes) -> None:
        self.active.add(peer)
        self.workers += [self.node._spawn(self._serve_from(peer)) for _ in range(self.streams_per_peer)]

    def _drop(self, peer: bytes, why: str) -> None:
        if peer in self.dropped:
            return
        self.dropped.add(peer)
        log.info("p2p: model provider %s dropped (%s)", peer.hex()[:8], why)
        self.node._extra_counters["model_provider_dropped"] += 1
        while self.standby:
            spare = self.standby.pop(0)
            if spare not in self.dropped:
                self._enlist(spare)
                break
        if self.dropped >= set(self.providers):
            self.done.set()  # nobody left to ask: fetch_model reports what is missing

    def _someone_else_could(self, peer: bytes, key: tuple[str, str, int]) -> bool:
        tried = self.failed_on.get(key, set()) | self.dropped
        return peer in tried and any(p not in tried for p in self.active)

    async def run(self) -> None:
        if self.left == 0:
            return
        await self.done.wait()

    def stop(self) -> None:
        self.done.set()
        for w in self.workers:
            w.cancel()

    async def _serve_from(self, peer: bytes) -> None:
        node = self.node
        while not self.done.is_set() and peer not in self.dropped:
            try:
                async with asyncio.timeout(0.2):
                    ref = await self.todo.get()
            except asyncio.TimeoutError:
                continue
            key = (ref.kind, ref.name, ref.index)
            if self._someone_else_could(peer, key):
                self.todo.put_nowait(ref)  # let a provider that has not failed it take it
                await asyncio.sleep(0.01)
                continue
            place = self.dest[(ref.kind, ref.name)][ref.offset : ref.offset + ref.length]
            t0 = node._loop.time()
            try:
                await node._get_part(peer, self.digest, ref, into=place)
            except BlobCheckError as exc:
                node._extra_counters["bad_blob"] += 1
                node._peer(peer).bad_blobs += 1
                self._retry(peer, key, ref)
                log.warning("p2p: bad part %s[%d] from %s: %s", ref.name, ref.index, peer.hex()[:8], exc)
                self.bad[peer] += 1
                if self.bad[peer] >= 2:
                    self._drop(peer, "bad parts")
                continue
            except (_Missing, _Refused, NotAMember) as exc:
                self._retry(peer, key, ref)
                self._drop(peer, f"{type(exc).__name__.strip('_').lower()}")
                continue
            except (TransportError, _Stalled, EOFError, ValueError, msgspec.DecodeError) as exc:
                node._peer(peer).failures += 1
                node._drop_link(peer)
                self._retry(peer, key, ref)
                self.failures[peer] += 1
                log.info("p2p: part %s[%d] from %s failed: %s", ref.name, ref.index, peer.hex()[:8], type(exc).__name__)
                if self.failures[peer] >= 2:
                    self._drop(peer, f"{type(exc).__name__} twice in a row")
                continue
            node._peer(peer).record_in(ref.length, node._loop.time() - t0, now=node._loop.time())
            self.failures[peer] = 0
            self.sources[peer] += ref.length
            self.left -= 1
            if self.left == 0:
                self.done.set()

    def _retry(self, peer: bytes, key: tuple[str, str, int], ref: PartRef) -> None:
        self.failed_on.setdefault(key, set()).add(peer)
        self.todo.put_nowait(ref)


class _Missing(Exception):
    """The provider does not hold what was asked."""


class _Refused(Exception):
    """The provider refused us (we are not a member in its view)."""


_closing: set[asyncio.Task] = set()
"""Throwaway endpoints still closing (iroh's close waits seconds for an unanswered dial)."""


async def endpoint_answers(peer_id: bytes, address: str, *, bind: str = "127.0.0.1:0", timeout: float = 4.0,
                           transport: Transport | None = None) -> bool:
    """True iff an endpoint holding ``peer_id``'s key completes a handshake at ``address`` within ``timeout`` s.

    The handshake authenticates the endpoint id, which is the node key: so an answer
    proves that a live process holds that key there. A node uses it to tell an
    earlier process of its own key that still runs (refuse to start) from one that
    crashed (take its place in the run). Dials from ``transport`` if given, else from a
    throwaway iroh endpoint with a fresh key bound on ``bind`` (iroh never dials its
    own id). The peer closes the connection at once (we are no member): that is fine.
    """
    own = transport is None
    if transport is None:
        from psyche.p2p.iroh_transport import IrohTransport

        try:
            transport = await IrohTransport.bind(Identity.generate().secret_bytes, bind=bind)
        except TransportError:
            return False
    try:
        async with asyncio.timeout(timeout):
            conn = await transport.connect(peer_id, address)
        conn.close()
        return True
    except (TransportError, TimeoutError):
        return False
    finally:
        if own:
            task = asyncio.get_running_loop().create_task(transport.close())
            _closing.add(task)
            task.add_done_callback(_closing.discard)


def describe_address(address: str) -> str:
    """A node address as a user reads it: the ``ip:port`` pairs of an iroh ticket, else its start."""
    try:
        import iroh

        direct = iroh.EndpointTicket.from_string(address).endpoint_addr().direct_addresses()
    except Exception:  # noqa: BLE001 — not an iroh ticket (e.g. an in-memory test address)
        direct = []
    return ", ".join(direct) if direct else (address if len(address) <= 40 else address[:40] + "…")
