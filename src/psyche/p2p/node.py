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

import msgspec

from psyche.p2p.blobs import BlobCheckError, BlobReceiver, BlobStore
from psyche.p2p.errors import BlobUnavailable, ModelUnavailable, NotAMember, TransportError
from psyche.p2p.gossip import Gossip
from psyche.p2p.identity import Identity
from psyche.p2p.model import FetchedModel, Manifest, ModelProvider, PartRef, RawTensor, choose_manifest, decode_manifest
from psyche.p2p.stats import PeerStats
from psyche.p2p.transport import Connection, Stream, Transport, read_exactly
from psyche.p2p.wire import (
    MAX_FRAME,
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
        self.upload_rate = upload_rate
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
        self._next_upload = 0.0
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
        ``connect_timeout``, ``stall_timeout``, ``keep_blob_steps``, ``upload_rate``).
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
        """Cap what this node uploads (blobs and model parts), or None for no cap."""
        self.upload_rate = bytes_per_second

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
                seen: set[bytes] = set()
                batch = [(m, e) for m, e in batch if not (m in seen or seen.add(m))]
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

    async def _read_payload(self, stream: Stream, peer: bytes, *, size: int, expected_hash: bytes | None) -> bytes:
        """Read a DataHeader and its raw bytes. With ``expected_hash`` the size must be exactly
        ``size`` and the hash must match (else BlobCheckError); without, ``size`` is a cap."""
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
            receiver = BlobReceiver(expected_hash=expected_hash, size=size)
            receiver.check_announced(header.size)
        while receiver.remaining > 0:
            chunk = await self._read_some(stream, min(receiver.remaining, _CHUNK))
            if not chunk:
                break
            receiver.feed(chunk)
            self._peer(peer).bytes_in += len(chunk)  # counted on arrival, so partial transfers show too
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
        manifest_digest: bytes | None = None,
        min_agree: int = 1,
        streams_per_peer: int = 2,
        timeout: float = 600.0,
        max_manifest_bytes: int = MAX_FRAME,
    ) -> FetchedModel:
        """Fetch a model from ``providers`` in parallel, part by part, verifying every part.

        The manifest is trusted per :func:`~psyche.p2p.model.choose_manifest`:
        the one whose sha256 is ``manifest_digest`` if given, else the one served
        by a strict majority of the providers that answered (and by at least
        ``min_agree``). Parts are spread over the agreeing providers,
        ``streams_per_peer`` at a time each; a part that fails is retried on
        another provider. Raises :class:`ModelUnavailable`.
        """
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

        buffers: dict[tuple[str, str], bytearray] = {
            **{("tensor", e.name): bytearray(e.nbytes) for e in manifest.tensors},
            **{("file", e.name): bytearray(e.nbytes) for e in manifest.files},
        }
        todo: asyncio.Queue[PartRef] = asyncio.Queue()
        for ref in manifest.parts():
            todo.put_nowait(ref)
        left = todo.qsize()
        failed_on: dict[tuple[str, str, int], set[bytes]] = {}
        sources: Counter[bytes] = Counter()
        done = asyncio.Event()
        if left == 0:
            done.set()
        alive = {p: streams_per_peer for p in agreeing}

        async def worker(peer: bytes) -> None:
            nonlocal left
            strikes = 0
            while not done.is_set() and strikes < 3:
                try:
                    async with asyncio.timeout(0.2):
                        ref = await todo.get()
                except asyncio.TimeoutError:
                    continue
                key = (ref.kind, ref.name, ref.index)
                if peer in failed_on.get(key, set()) and len(failed_on[key]) < len(agreeing):
                    todo.put_nowait(ref)  # let another provider take it
                    await asyncio.sleep(0.01)
                    continue
                try:
                    t0 = self._loop.time()
                    data = await self._get_part(peer, digest, ref)
                    self._peer(peer).record_in(len(data), self._loop.time() - t0, now=self._loop.time())
                except BlobCheckError as exc:
                    self._extra_counters["bad_blob"] += 1
                    self._peer(peer).bad_blobs += 1
                    strikes += 1
                    failed_on.setdefault(key, set()).add(peer)
                    todo.put_nowait(ref)
                    log.warning("p2p: bad part %s[%d] from %s: %s", ref.name, ref.index, peer.hex()[:8], exc)
                    continue
                except (TransportError, NotAMember, _Stalled, _Missing, _Refused, EOFError, ValueError, msgspec.DecodeError) as exc:
                    self._peer(peer).failures += 1
                    self._drop_link(peer)
                    strikes += 1
                    failed_on.setdefault(key, set()).add(peer)
                    todo.put_nowait(ref)
                    log.info("p2p: part %s[%d] from %s failed: %s", ref.name, ref.index, peer.hex()[:8], type(exc).__name__)
                    continue
                buffers[(ref.kind, ref.name)][ref.offset : ref.offset + ref.length] = data
                sources[peer] += len(data)
                left -= 1
                if left == 0:
                    done.set()
            alive[peer] -= 1
            if all(v <= 0 for v in alive.values()):
                done.set()  # every worker gave up: report below

        workers = [self._spawn(worker(p)) for p in agreeing for _ in range(streams_per_peer)]
        try:
            async with asyncio.timeout(max(0.0, deadline - self._loop.time())):
                await done.wait()
        except asyncio.TimeoutError:
            pass
        finally:
            done.set()
            for w in workers:
                w.cancel()
        if left:
            raise ModelUnavailable(f"{left} part(s) of model {digest.hex()[:16]} could not be fetched from {len(agreeing)} provider(s)")
        tensors = {e.name: RawTensor(e.dtype, tuple(e.shape), bytes(buffers[("tensor", e.name)])) for e in manifest.tensors}
        files = {e.name: bytes(buffers[("file", e.name)]) for e in manifest.files}
        return FetchedModel(manifest, tensors, files, dict(sources))

    async def _get_part(self, peer: bytes, digest: bytes, ref: PartRef) -> bytes:
        stream = await self._open(peer)
        try:
            await stream.write(encode_frame(GetPart(digest, ref.kind, ref.name, ref.index)))
            await stream.finish()
            return await self._read_payload(stream, peer, size=ref.length, expected_hash=ref.hash)
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

    def _read_part(self, req: GetPart) -> bytes | None:
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

    async def _send_data(self, stream: Stream, peer: bytes, data: bytes | None) -> None:
        if data is None:
            await self._send_header(stream, DataHeader("missing"))
            return
        t0 = self._loop.time()
        await stream.write(encode_frame(DataHeader("ok", len(data))))
        if self.upload_rate is None:
            await stream.write(data)  # one call: each crossing of the FFI costs a copy and a wakeup
        else:
            mv = memoryview(data)
            for i in range(0, len(data), _THROTTLED_CHUNK):
                piece = mv[i : i + _THROTTLED_CHUNK]
                await self._throttle(len(piece))
                await stream.write(piece)
        await stream.finish()
        self._peer(peer).record_out(len(data), self._loop.time() - t0, now=self._loop.time())

    async def _throttle(self, nbytes: int) -> None:
        rate = self.upload_rate
        if rate is None or rate <= 0:
            return
        now = self._loop.time()
        start = max(now, self._next_upload)
        self._next_upload = start + nbytes / rate
        if start > now:
            await asyncio.sleep(start - now)

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


class _Missing(Exception):
    """The provider does not hold what was asked."""


class _Refused(Exception):
    """The provider refused us (we are not a member in its view)."""


def random_order(providers: list[bytes], *, first: bytes | None = None, rng: random.Random | None = None) -> list[bytes]:
    """``providers`` shuffled, with ``first`` (e.g. the publisher) kept in front: spreads load
    over peers that already hold a blob."""
    rest = [p for p in providers if p != first]
    (rng or random).shuffle(rest)
    return ([first] if first is not None and first in providers else []) + rest
