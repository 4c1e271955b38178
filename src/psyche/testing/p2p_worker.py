"""A P2P node in its own process, driven by JSON lines: for integration tests, the benchmark and demos.

Run ``python -m psyche.testing.p2p_worker --run RUN [--seed HEX | --key PATH]``. It prints
``{"ready": true, "id": ..., "address": ...}`` then answers each command line
``{"id": N, "cmd": NAME, ...args}`` with ``{"id": N, "ok": true, ...}`` or
``{"id": N, "ok": false, "error": ...}``; :data:`COMMANDS` names every command.
Commands run concurrently, so a long fetch does not block a ``stats`` query.
Bytes travel as hex.

:class:`WorkerProcess` is the parent side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any

import blake3

from psyche.identity import Identity
from psyche.p2p.errors import P2PError
from psyche.p2p.iroh_transport import IrohConnection, IrohStream, IrohTransport
from psyche.p2p.model import InMemoryModel, ModelProvider, RawTensor
from psyche.p2p.node import P2PNode
from psyche.p2p.transport import read_exactly
from psyche.p2p.wire import Finished, Heartbeat, Message, ResultCommitment, SignedMessage, content_hash


def payload(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes (blake3 XOF of ``seed``): every process can recreate a blob."""
    return blake3.blake3(seed.to_bytes(8, "big")).digest(length=size)


# --- child side ---------------------------------------------------------------------


def _llama(a: dict, seed: int):
    from psyche.config import ModelConfig
    from psyche.train.model import build_model

    return build_model(ModelConfig(**a["llama"]), seed=seed)


def _state_hash(state_dict) -> str:
    from psyche.p2p.torch_io import tensor_bytes

    h = blake3.blake3()
    for name in sorted(state_dict):
        h.update(tensor_bytes(state_dict[name].contiguous()))
    return h.hexdigest()


def _serve(node: P2PNode, provider: ModelProvider) -> str:
    """Serve ``provider``'s model; the hex of the manifest digest peers will see."""
    digest = node.serve_model(provider)
    assert digest is not None  # None only when serving nothing
    return digest.hex()


def _serve_llama(node: P2PNode, a: dict) -> dict:
    """Serve a LLaMA of the given sizes initialised from ``seed`` (what a trainer serves: a copy of its weights)."""
    from psyche.p2p.torch_io import model_from_state_dict

    state = {k: v.detach().clone() for k, v in _llama(a, a["seed"]).state_dict().items()}
    digest = _serve(node, model_from_state_dict(state, {"config.json": b'{"ok": 1}'},
                                                part_size=a.get("part_size", 4 << 20)))
    return {"digest": digest, "state_hash": _state_hash(state), "model_bytes": sum(t.nbytes for t in state.values())}


def _memory() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) in bytes, from /proc."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


async def _fetch_llama(node: P2PNode, a: dict) -> dict:
    """Join as a new node would: build the model, fetch its weights from ``providers`` and report time
    and memory. ``"into": "model"`` writes parts into the model's own memory (what the client does);
    ``"buffers"`` fetches into separate buffers and then loads them (the way before sinks)."""
    import gc

    from psyche.p2p.torch_io import StateDictSink, raw_to_state_dict
    from psyche.train.model import import_model_code

    import_model_code()  # a client imports it at start; its memory is not the join's
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    rss0, _ = _memory()
    model = _llama(a, a.get("seed", 12345))
    providers = [bytes.fromhex(p) for p in a["providers"]]
    in_place = a.get("into", "model") == "model"
    t0 = time.perf_counter()
    fetched = await node.fetch_model(providers, into=StateDictSink(model.state_dict()) if in_place else None,
                                     timeout=a.get("timeout", 600), max_providers=a.get("max_providers", 3))
    if not in_place:
        model.load_state_dict(raw_to_state_dict(fetched.tensors))
    seconds = time.perf_counter() - t0
    _, peak = _memory()
    state = model.state_dict()
    return {"seconds": seconds, "model_bytes": fetched.manifest.total_bytes(), "rss_before": rss0, "peak_rss": peak,
            "state_hash": _state_hash(state), "sources": {k.hex(): v for k, v in fetched.sources.items()},
            "counters": node.counters}


class _Worker:
    """The child's node, the messages it received, and the state its baseline commands keep."""

    def __init__(self, node: P2PNode) -> None:
        self.node = node
        self.received: list[dict] = []
        node.on_message(self._on_message)
        self.tcp_server: asyncio.AbstractServer | None = None
        self.raw: IrohTransport | None = None
        self.raw_conns: dict[bytes, IrohConnection] = {}
        self.raw_accept: asyncio.Future[None] | None = None

    def _on_message(self, sender: bytes, msg: Message) -> None:
        d: dict[str, Any] = {"sender": sender.hex(), "type": type(msg).__name__, "step": msg.step}
        if isinstance(msg, Finished):
            d["phase"] = msg.phase
        if isinstance(msg, ResultCommitment):
            d["blob_hash"] = msg.blob_hash.hex()
            d["size"] = msg.size
        self.received.append(d)

    async def handle(self, cmd: str, a: dict) -> dict:
        """Run the command named ``cmd`` with the request's arguments ``a``; its reply fields."""
        command = COMMANDS.get(cmd)
        if command is None:
            raise ValueError(f"unknown command {cmd!r}")
        return await command(self, a)


def _message(w: _Worker, a: dict) -> Message:
    """The gossip message a ``broadcast``/``forge`` request describes (``kind``: commit, finished, heartbeat)."""
    run_id = a.get("run_id", w.node.run_id)
    kind = a["kind"]
    if kind == "commit":
        return ResultCommitment(run_id=run_id, step=a["step"], batch_start=a.get("batch_start", 0),
                                batch_end=a.get("batch_end", 1), blob_hash=bytes.fromhex(a["blob_hash"]),
                                size=a["size"])
    if kind == "finished":
        return Finished(run_id=run_id, step=a["step"], phase=a.get("phase", "round"))
    return Heartbeat(run_id=run_id, step=a["step"])


# --- the commands: each takes the worker and the request, and returns the reply's fields ---------


async def _set_members(w: _Worker, a: dict) -> dict:
    w.node.set_members({bytes.fromhex(k): v for k, v in a["members"].items()})
    return {}


async def _set_step(w: _Worker, a: dict) -> dict:
    w.node.set_step(a["step"])
    return {}


async def _broadcast(w: _Worker, a: dict) -> dict:
    msg = _message(w, a)
    envelope = SignedMessage.create(w.node.identity, msg).encode().hex()
    if msg.run_id != w.node.run_id:  # signed for another run on purpose: returned, not sent
        return {"envelope": envelope}
    mid = await w.node.broadcast(msg)
    return {"message_id": mid.hex(), "envelope": envelope}


async def _forge(w: _Worker, a: dict) -> dict:
    """An envelope whose signature is broken (its first byte flipped), for injection."""
    env = SignedMessage.create(w.node.identity, _message(w, a))
    sig = bytes(b ^ 0xFF for b in env.sig[:1]) + env.sig[1:]
    return {"envelope": SignedMessage(env.v, env.sender, env.body, sig).encode().hex()}


async def _inject(w: _Worker, a: dict) -> dict:
    n = await w.node.send_raw_envelopes(bytes.fromhex(a["peer"]), [bytes.fromhex(e) for e in a["envelopes"]])
    return {"acked": n}


async def _received(w: _Worker, a: dict) -> dict:
    return {"messages": w.received}


async def _pending(w: _Worker, a: dict) -> dict:
    return {"pending": w.node.pending_pushes()}


async def _publish(w: _Worker, a: dict) -> dict:
    data = payload(a["seed"], a["size"])
    return {"hash": w.node.publish_blob(data, step=a.get("step")).hex()}


async def _publish_fake(w: _Worker, a: dict) -> dict:
    """Serve wrong bytes under the hash of ``payload(seed, size)``: ``mode`` truncate, oversize or corrupt."""
    data = payload(a["seed"], a["size"])
    fake = {"truncate": data[: len(data) // 2], "oversize": data + b"\0" * 4096,
            "corrupt": data[:-1] + bytes([data[-1] ^ 1])}[a["mode"]]
    h = content_hash(data)
    w.node.blobs.insert_unchecked(h, fake)
    return {"hash": h.hex()}


async def _fetch(w: _Worker, a: dict) -> dict:
    """Fetch one blob from ``providers``; a failure is reported in the reply, with each provider's attempt."""
    t0 = time.perf_counter()
    try:
        data = await w.node.fetch_blob(bytes.fromhex(a["hash"]), a["size"], [bytes.fromhex(p) for p in a["providers"]],
                                       timeout=a.get("timeout", 60))
    except P2PError as exc:
        attempts = [(p.hex(), r) for p, r in getattr(exc, "attempts", [])]
        return {"fetched": False, "error": str(exc), "attempts": attempts, "seconds": time.perf_counter() - t0}
    return {"fetched": True, "size": len(data), "seconds": time.perf_counter() - t0}


async def _fetch_many(w: _Worker, a: dict) -> dict:
    t0 = time.perf_counter()
    res = await asyncio.gather(*(_fetch(w, {**it, "timeout": a.get("timeout", 60)}) for it in a["items"]))
    return {"seconds": time.perf_counter() - t0, "results": res}


async def _counters(w: _Worker, a: dict) -> dict:
    return {"counters": w.node.counters}


async def _stats(w: _Worker, a: dict) -> dict:
    return {"stats": {k.hex(): v.to_dict() for k, v in w.node.stats().items()}}


async def _set_upload_rate(w: _Worker, a: dict) -> dict:
    w.node.set_upload_rate(a.get("rate"))
    return {}


async def _set_download_rate(w: _Worker, a: dict) -> dict:
    w.node.set_download_rate(a.get("rate"))
    return {}


async def _serve_model(w: _Worker, a: dict) -> dict:
    """Serve a LLaMA (``llama``: its sizes) or ``n_tensors`` raw tensors of ``tensor_bytes`` from ``seed``."""
    if "llama" in a:
        return _serve_llama(w.node, a)
    tensors = {f"t{i}": RawTensor("U8", (a["tensor_bytes"],), payload(a["seed"] * 1000 + i, a["tensor_bytes"]))
               for i in range(a["n_tensors"])}
    return {"digest": _serve(w.node, InMemoryModel(tensors, {"config.json": b'{"ok": 1}'},
                                                   part_size=a.get("part_size", 1 << 20)))}


async def _fetch_model(w: _Worker, a: dict) -> dict:
    """Fetch what a ``serve_model`` serves, and check every tensor's content."""
    if "llama" in a:
        return await _fetch_llama(w.node, a)
    t0 = time.perf_counter()
    digest = bytes.fromhex(a["digest"]) if a.get("digest") else None
    m = await w.node.fetch_model([bytes.fromhex(p) for p in a["providers"]], manifest_digest=digest,
                                 timeout=a.get("timeout", 60))
    ok = all(t.data == payload(a["seed"] * 1000 + int(n[1:]), len(t.data)) for n, t in m.tensors.items())
    return {"seconds": time.perf_counter() - t0, "tensors": len(m.tensors), "content_ok": ok,
            "sources": {k.hex(): v for k, v in m.sources.items()}, "files": sorted(m.files)}


# Plain-TCP baseline for the benchmark: request = 32-byte hash + 8-byte size; reply = 8-byte size + bytes.


async def _tcp_serve(w: _Worker, a: dict) -> dict:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                req = await reader.readexactly(40)
                data = w.node.blobs.get(req[:32]) or b""
                writer.write(len(data).to_bytes(8, "big"))
                writer.write(data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    w.tcp_server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return {"port": w.tcp_server.sockets[0].getsockname()[1]}


async def _tcp_fetch_one(it: dict) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", it["port"])
    h = bytes.fromhex(it["hash"])
    writer.write(h + it["size"].to_bytes(8, "big"))
    await writer.drain()
    n = int.from_bytes(await reader.readexactly(8), "big")
    data = await reader.readexactly(n)
    writer.close()
    return n == it["size"] and content_hash(data) == h


# Bare-iroh baseline for the benchmark: the same transport adapter with none of the node's
# protocol (a second endpoint; request = 32-byte hash, reply = the blob, then end of stream).


async def _raw_serve(w: _Worker, a: dict) -> dict:
    raw = w.raw = await IrohTransport.bind(os.urandom(32))

    async def serve_stream(stream: IrohStream) -> None:
        data = w.node.blobs.get(await read_exactly(stream, 32)) or b""
        await stream.write(data)
        await stream.finish()

    async def serve_conn(conn: IrohConnection) -> None:
        while True:
            try:
                stream = await conn.accept_stream()
            except P2PError:
                return
            asyncio.ensure_future(serve_stream(stream))

    async def accept() -> None:
        while (conn := await raw.accept()) is not None:
            asyncio.ensure_future(serve_conn(conn))

    w.raw_accept = asyncio.ensure_future(accept())
    return {"raw_id": raw.local_id.hex(), "raw_address": raw.address}


async def _raw_fetch_one(w: _Worker, it: dict) -> bool:
    assert w.raw is not None, "raw_fetch needs raw_serve first (it binds the bare endpoint)"
    peer = bytes.fromhex(it["raw_id"])
    conn = w.raw_conns.get(peer)
    if conn is None or conn.is_closed:
        conn = w.raw_conns[peer] = await w.raw.connect(peer, it["raw_address"])
    stream = await conn.open_stream()
    h = bytes.fromhex(it["hash"])
    await stream.write(h)
    await stream.finish()
    chunks = []
    while chunk := await stream.read(1 << 20):
        chunks.append(chunk)
    data = b"".join(chunks)
    return len(data) == it["size"] and content_hash(data) == h


async def _tcp_fetch(w: _Worker, a: dict) -> dict:
    """Baseline: fetch all ``items`` at once over plain TCP, each checked by hash."""
    t0 = time.perf_counter()
    oks = await asyncio.gather(*(_tcp_fetch_one(it) for it in a["items"]))
    return {"seconds": time.perf_counter() - t0, "ok": all(oks)}


async def _raw_fetch(w: _Worker, a: dict) -> dict:
    """Baseline: fetch all ``items`` at once over bare iroh streams, each checked by hash."""
    t0 = time.perf_counter()
    oks = await asyncio.gather(*(_raw_fetch_one(w, it) for it in a["items"]))
    return {"seconds": time.perf_counter() - t0, "ok": all(oks)}


COMMANDS: dict[str, Callable[[_Worker, dict], Awaitable[dict]]] = {
    # membership and gossip
    "set_members": _set_members,
    "set_step": _set_step,
    "broadcast": _broadcast,
    "forge": _forge,
    "inject": _inject,
    "received": _received,
    "pending": _pending,
    # blobs
    "publish": _publish,
    "publish_fake": _publish_fake,
    "fetch": _fetch,
    "fetch_many": _fetch_many,
    # models
    "serve_model": _serve_model,
    "fetch_model": _fetch_model,
    # observation and shaping
    "counters": _counters,
    "stats": _stats,
    "set_upload_rate": _set_upload_rate,
    "set_download_rate": _set_download_rate,
    # baselines for the benchmark
    "tcp_serve": _tcp_serve,
    "tcp_fetch": _tcp_fetch,
    "raw_serve": _raw_serve,
    "raw_fetch": _raw_fetch,
}
"""Every command a worker answers, by the name a request gives in ``cmd``."""


async def _child_main(args: argparse.Namespace) -> None:
    ident = Identity(bytes.fromhex(args.seed)) if args.seed else Identity.load_or_create(args.key)
    node = await P2PNode.start(ident, args.run, bind=args.bind, stall_timeout=args.stall_timeout,
                               connect_timeout=args.connect_timeout, resend_interval=args.resend_interval)
    w = _Worker(node)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out_lock = asyncio.Lock()

    async def reply(obj: dict) -> None:
        async with out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    await reply({"ready": True, "id": ident.public_key.hex(), "address": node.address})

    async def run(req: dict) -> None:
        try:
            res = await w.handle(req["cmd"], req)
            await reply({"id": req["id"], "ok": True, **res})
        except Exception as exc:  # noqa: BLE001 — report to the parent instead of dying
            await reply({"id": req["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    tasks = set()
    while True:
        line = await reader.readline()
        if not line:
            break
        req = json.loads(line)
        if req["cmd"] == "close":
            break
        t = asyncio.ensure_future(run(req))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    await node.close()


# --- parent side --------------------------------------------------------------------


class WorkerError(RuntimeError):
    """A worker command failed or the worker died; the message carries its stderr tail."""


class WorkerProcess:
    """A worker child process and a thread-safe way to send it commands and await replies."""

    def __init__(self, run_id: str, *, seed: bytes | None = None, env: dict | None = None,
                 stall_timeout: float = 2.0, connect_timeout: float = 2.0, resend_interval: float = 0.2,
                 start_timeout: float = 60.0, wait: bool = True) -> None:
        self.seed = seed or os.urandom(32)
        self._err = tempfile.NamedTemporaryFile(prefix="p2p-worker-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "psyche.testing.p2p_worker", "--run", run_id, "--seed", self.seed.hex(),
             "--stall-timeout", str(stall_timeout), "--connect-timeout", str(connect_timeout),
             "--resend-interval", str(resend_interval)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True, bufsize=1,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both are pipes
        self._stdin: IO[str] = self.proc.stdin
        self._stdout: IO[str] = self.proc.stdout
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._next = 0
        self._ready: dict | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.start_timeout = start_timeout
        if wait:
            self.wait_ready()

    def wait_ready(self) -> WorkerProcess:
        """Wait until the worker printed its ready line; sets ``id`` and ``address``."""
        start_timeout = self.start_timeout
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready is not None or self.proc.poll() is not None, start_timeout):
                raise WorkerError(f"worker did not start in {start_timeout}s: {self.stderr_tail()}")
        if self._ready is None:
            raise WorkerError(f"worker exited at start: {self.stderr_tail()}")
        self.id = bytes.fromhex(self._ready["id"])
        self.address: str = self._ready["address"]
        return self

    def _read(self) -> None:
        for line in self._stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                if obj.get("ready"):
                    self._ready = obj
                else:
                    self._replies[obj["id"]] = obj
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def stderr_tail(self, n: int = 3000) -> str:
        """The last ``n`` characters the worker wrote to stderr."""
        try:
            with open(self._err.name) as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def send(self, cmd: str, **args: Any) -> int:
        """Send a command; returns its id for :meth:`result`."""
        with self._cond:
            self._next += 1
            rid = self._next
        self._stdin.write(json.dumps({"id": rid, "cmd": cmd, **args}) + "\n")
        self._stdin.flush()
        return rid

    def result(self, rid: int, timeout: float = 60.0) -> dict:
        """Wait for the reply to command ``rid``; raises :class:`WorkerError` on failure."""
        with self._cond:
            ok = self._cond.wait_for(lambda: rid in self._replies or self.proc.poll() is not None, timeout)
            if rid not in self._replies:
                raise WorkerError(f"no reply to command {rid} ({'timeout' if not ok else 'worker exited'}): {self.stderr_tail()}")
            reply = self._replies.pop(rid)
        if not reply["ok"]:
            raise WorkerError(reply["error"] + "\n" + self.stderr_tail())
        return reply

    def call(self, cmd: str, *, reply_timeout: float = 60.0, **args: Any) -> dict:
        """Send a command and wait up to ``reply_timeout`` seconds for its reply."""
        return self.result(self.send(cmd, **args), reply_timeout)

    def kill(self) -> None:
        """SIGKILL the worker (no goodbye to its peers)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def request_close(self) -> None:
        """Ask the worker to close its node and exit (without waiting)."""
        if self.proc.poll() is None:
            try:
                self._stdin.write(json.dumps({"id": 0, "cmd": "close"}) + "\n")
                self._stdin.flush()
            except (OSError, ValueError):
                pass

    def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to close its node and exit; kill it if it does not."""
        self.request_close()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.kill()
        try:
            os.unlink(self._err.name)
        except OSError:
            pass


def wait_until(pred, timeout: float, what: str):
    """Poll ``pred()`` every 0.1 s until it returns something truthy (returned), or raise
    ``AssertionError`` naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def start_workers(n: int, run_id: str, **options: Any) -> list[WorkerProcess]:
    """Start ``n`` workers in parallel and wait until all are ready."""
    ws = [WorkerProcess(run_id, wait=False, **options) for _ in range(n)]
    try:
        return [w.wait_ready() for w in ws]
    except BaseException:
        for w in ws:
            w.kill()
        raise


def close_all(workers: list[WorkerProcess]) -> None:
    """Close several workers at once."""
    for w in workers:
        w.request_close()
    for w in workers:
        w.close()


def connect_all(workers: list[WorkerProcess], *, step: int = 0, overrides: dict | None = None) -> None:
    """Make every worker a member of every other's set and move all to ``step``.

    ``overrides`` maps ``(i, j)`` to the address worker ``i`` gets for worker ``j``
    (e.g. a dead one, to cut that link).
    """
    for i, w in enumerate(workers):
        members = {x.id.hex(): x.address for x in workers}
        for (a, b), addr in (overrides or {}).items():
            if a == i:
                members[workers[b].id.hex()] = addr
        w.call("set_members", members=members)
        w.call("set_step", step=step)


def main() -> None:
    """Entry point of ``python -m psyche.testing.p2p_worker``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--seed", help="hex of the 32 secret bytes (else --key)")
    ap.add_argument("--key", help="key file (created if missing)")
    ap.add_argument("--bind", default="127.0.0.1:0")
    ap.add_argument("--stall-timeout", type=float, default=5.0)
    ap.add_argument("--connect-timeout", type=float, default=5.0)
    ap.add_argument("--resend-interval", type=float, default=0.5)
    args = ap.parse_args()
    if not args.seed and not args.key:
        ap.error("one of --seed or --key is required")
    asyncio.run(_child_main(args))


if __name__ == "__main__":
    main()
