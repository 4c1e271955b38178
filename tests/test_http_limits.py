"""What anyone may send our HTTP servers (psyche.httplimits): body caps, request rates, slow
bodies, WebSocket caps, on real uvicorn servers started in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from typer.testing import CliRunner
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from psyche.coordinator import Join, Tick, Witness, encode_instruction
from psyche.coordinator.instructions import MAX_BLOOM_WIRE, MAX_SCORE, MAX_TRAINERS
from psyche.httplimits import Limits, Rate, parse_rate, uvicorn_options
from psyche.identity import Identity
from psyche.ledger.envelope import sign_request
from psyche.ledger.server import BODY_CAP, CoordinatorServer, create_app
from psyche.localports import free_port
from tests.test_server import make_server

RUN = "/api/runs/srv-test"


@contextlib.contextmanager
def serving(app, limits: Limits = Limits()) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port, with the options ``psyche server`` uses; yields HOST:PORT."""
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_options(limits)))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            assert thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        yield f"127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(10)


class BodyReads:
    """ASGI wrapper: counts the request body bytes the server handed the app behind it."""

    def __init__(self, app) -> None:
        self.app = app
        self.bytes = 0

    async def __call__(self, scope, receive, send) -> None:
        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                self.bytes += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


def rss() -> int:
    """This process's resident memory, in bytes (the server runs in it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture
def server(tmp_path) -> CoordinatorServer:
    return make_server(tmp_path / "run.sqlite", Identity.generate())


def tick(who: Identity) -> bytes:
    """A signed Tick: anyone may send one, and it is applied (200)."""
    return sign_request(who, "srv-test", "instruction", encode_instruction(Tick()))


# --- bodies -------------------------------------------------------------------------------------


def test_a_256_mb_body_is_refused_from_its_content_length_before_it_is_read(server):
    """Before: read whole, then refused (400 after 8 s, +150 MB RSS). Now 413 from the header:
    the app reads none of it, memory barely moves, and the sender is cut off early."""
    app = BodyReads(create_app(server))
    chunk = bytes(1 << 20)
    sent = 0

    def body() -> Iterator[bytes]:  # 256 MiB, without the test holding more than 1 MiB of it
        nonlocal sent
        for _ in range(256):
            sent += len(chunk)
            yield chunk

    with serving(app) as addr, httpx.Client(timeout=60) as client:
        assert client.get(f"http://{addr}/healthz").status_code == 200  # warm: first-request allocations
        before = rss()
        resp = client.post(f"http://{addr}{RUN}/instructions", content=body(),
                           headers={"content-length": str(256 << 20)})
        grown = rss() - before
    assert resp.status_code == 413
    assert resp.json()["error"] == "PayloadTooLarge"
    assert "64 KiB cap of POST /api/runs/{run_id}/instructions" in resp.json()["message"]
    assert app.bytes == 0, "not a byte of the body reached the app"
    assert grown < 16 << 20, f"RSS grew {grown} bytes for a refused 256 MiB body"
    assert sent < 64 << 20, f"the server let {sent} bytes in before closing"
    assert server.rejected["body_too_large"] == 1


def test_a_chunked_body_is_cut_at_the_cap(server):
    app = BodyReads(create_app(server))

    def body() -> Iterator[bytes]:  # no Content-Length: chunked, 16 MiB if nobody stops it
        for _ in range(1024):
            yield bytes(16 << 10)

    with serving(app) as addr, httpx.Client(timeout=60) as client:
        resp = client.post(f"http://{addr}{RUN}/reports", content=body())
    assert resp.status_code == 413
    assert resp.json()["error"] == "PayloadTooLarge"
    assert "64 KiB cap of POST /api/runs/{run_id}/reports" in resp.json()["message"]
    # Read past the cap by at most what uvicorn hands over at once (its buffer: some 100 KB).
    assert BODY_CAP < app.bytes < 1 << 20, f"read {app.bytes} bytes of a 16 MiB body"
    assert server.rejected["body_too_large"] == 1


def test_the_largest_instruction_is_far_under_the_cap_and_gets_through(server):
    who = Identity.generate()
    widest = Witness(step=1, participant_bloom=bytes(MAX_BLOOM_WIRE), broadcast_bloom=bytes(MAX_BLOOM_WIRE),
                     broadcast_merkle=bytes(32), loss=1.0, tokens_per_sec=1.0, bandwidth_bytes=2**63 - 1,
                     arrivals_ms=[2**32 - 1] * MAX_TRAINERS, scores=[MAX_SCORE] * MAX_TRAINERS)
    signed = sign_request(who, "srv-test", "instruction", encode_instruction(widest))
    assert len(signed) < BODY_CAP // 4
    with TestClient(create_app(server)) as client:  # refused by the coordinator (409), not for its size
        assert client.post(f"{RUN}/instructions", content=signed).status_code == 409
        assert client.post("/healthz", content=bytes(2048)).status_code == 413  # a GET's endpoint takes no body
    assert server.rejected["body_too_large"] == 1


def _raw_post(addr: str, head_and_first: bytes, then: Iterator[bytes] = iter(())) -> tuple[int, dict]:
    """POST over a plain socket: send ``head_and_first``, then each of ``then`` until the server
    answers; the status and JSON body of its answer."""
    import select

    host, port = addr.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head_and_first)
        for piece in then:
            if select.select([s], [], [], 0)[0]:
                break  # it answered
            try:
                s.sendall(piece)
            except OSError:
                break
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_body_that_trickles_is_cut_with_408(server):
    head = f"POST {RUN}/instructions HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n".encode()

    def drip() -> Iterator[bytes]:  # a byte every 0.05 s: never idle long, never done
        for _ in range(600):
            time.sleep(0.05)
            yield b"x"

    idle = Limits(body_idle_s=0.3, body_total_s=30)
    with serving(create_app(server, limits=idle), idle) as addr:
        status, body = _raw_post(addr, head + b"x" * 10)  # then nothing
    assert (status, body["error"]) == (408, "RequestTimeout")
    assert "cut after 10 bytes: no byte of it for 0.3 s" in body["message"]
    slow = Limits(body_idle_s=5, body_total_s=1)
    with serving(create_app(server, limits=slow), slow) as addr:
        status, body = _raw_post(addr, head, drip())
    assert (status, body["error"]) == (408, "RequestTimeout")
    assert "not all of it within 1 s" in body["message"]
    assert server.rejected["body_timeout"] == 2


# --- rates --------------------------------------------------------------------------------------


def test_a_key_over_its_rate_gets_429_with_retry_after_and_gets_through_after_the_wait(server):
    a, b = Identity.generate(), Identity.generate()
    limits = Limits(key_rate=Rate(3, 1))
    with serving(create_app(server, limits=limits), limits) as addr, httpx.Client(base_url=f"http://{addr}") as client:
        for _ in range(3):
            assert client.post(f"{RUN}/instructions", content=tick(a)).status_code == 200
        refused = client.post(f"{RUN}/instructions", content=tick(a))
        assert refused.status_code == 429
        assert refused.json()["error"] == "RateLimited"
        assert "3 signed requests in 1 s" in refused.json()["message"]
        wait = int(refused.headers["retry-after"])
        assert wait >= 1
        assert client.post(f"{RUN}/instructions", content=tick(b)).status_code == 200, "another key is not held back"
        time.sleep(wait + 0.1)
        assert client.post(f"{RUN}/instructions", content=tick(a)).status_code == 200
        metrics = client.get("/metrics").text
    assert server.rejected["rate_limited"] == 1
    assert 'psyche_requests_rejected_total{reason="rate_limited"} 1.0' in metrics


def test_an_address_over_its_rate_gets_429_for_requests_and_websockets(server):
    limits = Limits(address_rate=Rate(5, 60))
    with serving(create_app(server, limits=limits), limits) as addr, httpx.Client(base_url=f"http://{addr}") as client:
        for _ in range(5):
            assert client.get("/healthz").status_code == 200
        refused = client.get("/healthz")
        assert refused.status_code == 429
        assert refused.json()["error"] == "RateLimited"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        with ws_connect(f"ws://{addr}{RUN}/ws") as ws, pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    assert "rate limited" in closed.value.rcvd.reason
    assert server.rejected["rate_limited"] == 2


def test_the_client_waits_out_a_429_instead_of_failing(server):
    from psyche.ledger.remote import ServerLedger

    a = Identity.generate()
    said: list[str] = []
    limits = Limits(key_rate=Rate(2, 1))

    async def scenario(url: str) -> None:
        ledger = ServerLedger(url, "srv-test", a, say=said.append)
        try:
            for _ in range(5):
                await ledger.submit(Tick())  # raises InstructionRefused on any refusal but a 429
        finally:
            await ledger.close()

    with serving(create_app(server, limits=limits), limits) as addr:
        asyncio.run(scenario(f"http://{addr}"))
    assert server.rejected["rate_limited"] >= 1, "it was held back, and waited"
    assert len(said) == server.rejected["rate_limited"], "told once per spell of refusals"
    assert "refuses requests this fast" in said[0]


def test_the_rate_options_refuse_a_bad_value_naming_the_option(tmp_path):
    from psyche.cli import app as cli_app

    runner = CliRunner()
    db = tmp_path / "run.sqlite"
    out = runner.invoke(cli_app, ["server", "--db", str(db), "--key", str(tmp_path / "k"), "--rate-limit-key", "lots"])
    assert out.exit_code == 1
    assert "--rate-limit-key: expected N/SECONDS" in out.output
    assert not db.exists() and not (tmp_path / "k").exists(), "nothing created before the refusal"
    out = runner.invoke(cli_app, ["data-server", "--rate-limit-address", "5 per minute"])
    assert out.exit_code == 1
    assert "--rate-limit-address: expected N/SECONDS" in out.output
    assert parse_rate("OFF") is None and parse_rate("20000/60") == Rate(20000, 60)


def test_openapi_documents_the_refusals(server):
    spec = TestClient(create_app(server)).get("/openapi.json").json()
    post = spec["paths"]["/api/runs/{run_id}/instructions"]["post"]["responses"]
    assert {"408", "413", "429"} <= set(post)
    assert "Retry-After" in post["429"]["headers"]
    assert "429" in spec["paths"]["/api/runs"]["get"]["responses"]


# --- WebSockets ---------------------------------------------------------------------------------


def test_websockets_over_the_caps_are_refused_with_1013(tmp_path, server):
    from psyche.dashboard import mount_dashboard

    limits = Limits(websockets=3, websockets_per_address=2)
    app = create_app(server, extra_routes=mount_dashboard, limits=limits)
    with serving(app, limits) as addr, contextlib.ExitStack() as stack:
        first = stack.enter_context(ws_connect(f"ws://{addr}{RUN}/ws"))
        stack.enter_context(ws_connect(f"ws://{addr}/api/live")).recv(timeout=10)  # a dashboard feed counts too
        first.recv(timeout=10)
        with ws_connect(f"ws://{addr}{RUN}/ws") as third, pytest.raises(ConnectionClosed) as closed:
            third.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        assert "2 WebSockets open from your address" in closed.value.rcvd.reason
        first.close()
        # Its slot frees once the server has seen it go: then a new one is served.
        for _ in range(100):
            with ws_connect(f"ws://{addr}{RUN}/ws") as again:
                try:
                    assert isinstance(again.recv(timeout=10), bytes)
                    break
                except ConnectionClosed:
                    time.sleep(0.05)
        else:
            raise AssertionError("the closed socket's slot never came free")
    assert server.rejected["too_many_websockets"] >= 1

    # The cap of the whole server, whatever the address (TestClient: one address, "testclient").
    with TestClient(create_app(server, extra_routes=mount_dashboard,
                               limits=Limits(websockets=1, websockets_per_address=5))) as client:
        with client.websocket_connect(f"{RUN}/ws") as ws:
            ws.receive_bytes()
            with client.websocket_connect("/api/live") as refused, pytest.raises(WebSocketDisconnect) as gone:
                refused.receive_text()
        assert gone.value.code == 1013 and "server busy" in gone.value.reason


def test_an_oversized_websocket_message_closes_that_socket_only(server):
    who = Identity.generate()
    with serving(create_app(server)) as addr, ws_connect(f"ws://{addr}{RUN}/ws") as big, \
            ws_connect(f"ws://{addr}{RUN}/ws") as quiet:
        big.recv(timeout=10)
        quiet.recv(timeout=10)
        big.send(bytes(100 << 10))  # over the 64 KiB uvicorn takes
        with pytest.raises(ConnectionClosed) as closed:
            big.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        body = sign_request(who, "srv-test", "instruction", encode_instruction(Join(p2p_address="addr")))
        assert httpx.post(f"http://{addr}{RUN}/instructions", content=body).status_code == 200
        assert isinstance(quiet.recv(timeout=10), bytes), "the other socket still hears every change"

    # Where the server does not cap messages itself, the Guard does (and says why).
    with TestClient(create_app(server, limits=Limits(ws_message_bytes=1024))) as client:
        with client.websocket_connect(f"{RUN}/ws") as ws:
            ws.receive_bytes()
            ws.send_bytes(bytes(2048))
            with pytest.raises(WebSocketDisconnect) as gone:
                ws.receive_bytes()
        assert gone.value.code == 1009 and "1 KiB" in gone.value.reason
    assert server.rejected["websocket_message_big"] == 1


# --- the other servers --------------------------------------------------------------------------


def test_the_data_server_and_the_dashboard_refuse_beyond_their_limits(data_dir):
    from psyche.dashboard import create_proxy_app
    from psyche.data.server import create_data_app

    limits = Limits(address_rate=Rate(3, 60))
    with serving(create_data_app(data_dir, limits=limits), limits) as addr, httpx.Client(base_url=f"http://{addr}") as client:
        refused = client.request("GET", "/meta.json", content=bytes(4096))
        assert (refused.status_code, refused.json()["error"]) == (413, "PayloadTooLarge")
        assert client.get("/meta.json").status_code == 200
        assert client.get("/v1/train/tokens", params={"offset": 0, "count": 4}).status_code == 200
        refused = client.get("/meta.json")
        assert (refused.status_code, refused.json()["error"]) == (429, "RateLimited")
        assert int(refused.headers["retry-after"]) >= 1

    proxy = TestClient(create_proxy_app("http://127.0.0.1:9", limits=Limits(address_rate=Rate(2, 60))))
    assert [proxy.get("/healthz").status_code for _ in range(3)] == [200, 200, 429]


def test_the_examples_in_the_docstrings_hold():
    import doctest

    import psyche.httplimits
    import psyche.ledger.remote

    for module in (psyche.httplimits, psyche.ledger.remote):
        assert doctest.testmod(module).failed == 0, module.__name__
