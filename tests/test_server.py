"""The coordinator server: signed instructions, refusals, persistence across restarts, status API."""

from __future__ import annotations

import msgspec
import pytest
from fastapi.testclient import TestClient

from psyche.config import parse_config
from psyche.coordinator import Coordinator, Join, Tick, Withdraw, encode_instruction
from psyche.ledger.host import replay
from psyche.ledger.envelope import SignedRequest, open_request, sign_request
from psyche.ledger.server import CoordinatorServer, create_app
from psyche.ledger.store import Store
from psyche.identity import Identity

CFG = parse_config({
    "name": "srv-test",
    "coordinator": {"init_min_clients": 2, "min_clients": 1, "witness_nodes": 1, "total_steps": 5,
                    "global_batch_size_start": 4, "global_batch_size_end": 4, "checkpointers": 1},
    "lr": {"warmup_steps": 1},
})


def make_server(db, authority: Identity) -> CoordinatorServer:
    server = CoordinatorServer(Store(db), host_key=authority.public_key, tick_interval=0.05)
    server.create_run(CFG, authority.public_key)
    return server


def post(client: TestClient, ident: Identity, instr, *, run_id="srv-test", nonce=None):
    body = sign_request(ident, run_id, "instruction", encode_instruction(instr), nonce=nonce)
    return client.post(f"/api/runs/{run_id}/instructions", content=body)


@pytest.fixture
def authority():
    return Identity.generate()


def test_signed_join_is_applied_and_persisted(tmp_path, authority):
    a, b = Identity.generate(), Identity.generate()
    server = make_server(tmp_path / "run.sqlite", authority)
    with TestClient(create_app(server)) as client:
        assert post(client, a, Join(p2p_address="addr-a")).status_code == 200
        assert post(client, b, Join(p2p_address="addr-b")).status_code == 200
        status = client.get("/api/runs/srv-test").json()
        assert status["run_id"] == "srv-test"
        assert {"state", "epoch", "step", "clients", "history", "checkpoints"} <= set(status)
        state_bytes = client.get("/api/runs/srv-test/state").content
        assert Coordinator.from_bytes(state_bytes).is_member(a.public_key)
        digest = Coordinator.from_bytes(state_bytes).digest()
        seq = server.hosts["srv-test"].seq
    server.store.close()
    # A restarted server on the same database continues from the same state.
    again = CoordinatorServer(Store(tmp_path / "run.sqlite"), host_key=authority.public_key)
    assert again.hosts["srv-test"].seq == seq
    assert again.hosts["srv-test"].coordinator.digest() == digest
    # The log replays to the same state from the initial one: anyone can check the host.
    log = again.store.log("srv-test")
    assert len(log) == seq
    assert replay(again.store.genesis("srv-test"), log).digest() == digest


def test_garbage_forgery_and_replay_are_refused(tmp_path, authority):
    a, mallory = Identity.generate(), Identity.generate()
    server = make_server(tmp_path / "run.sqlite", authority)
    host = server.hosts["srv-test"]
    with TestClient(create_app(server)) as client:
        before = host.coordinator.digest()
        r = client.post("/api/runs/srv-test/instructions", content=b"\x00garbage")
        assert r.status_code == 400 and r.json()["error"] == "BadRequest"
        # Mallory signs an instruction but claims to be `a`.
        good = msgspec.msgpack.decode(sign_request(mallory, "srv-test", "instruction",
                                                   encode_instruction(Join(p2p_address="x"))), type=SignedRequest)
        forged = msgspec.msgpack.encode(msgspec.structs.replace(good, signer=a.public_key))
        r = client.post("/api/runs/srv-test/instructions", content=forged)
        assert r.status_code == 400 and "signature" in r.json()["message"]
        # A request for another run is refused even with a valid signature.
        other = sign_request(a, "other-run", "instruction", encode_instruction(Join(p2p_address="x")))
        r = client.post("/api/runs/srv-test/instructions", content=other)
        assert r.status_code == 400
        assert host.coordinator.digest() == before
        # A valid join, then the very same request again: the replay is refused.
        body = sign_request(a, "srv-test", "instruction", encode_instruction(Join(p2p_address="addr")))
        assert client.post("/api/runs/srv-test/instructions", content=body).status_code == 200
        after = host.coordinator.digest()
        r = client.post("/api/runs/srv-test/instructions", content=body)
        assert r.status_code == 409 and r.json()["error"] == "StaleNonce"
        assert host.coordinator.digest() == after
        # A coordinator refusal comes back by name.
        r = post(client, mallory, Withdraw())
        assert r.status_code == 409 and r.json()["error"] == "NotAMember"
        metrics = client.get("/metrics").text
        assert 'psyche_requests_rejected_total{reason="bad_request"} 3.0' in metrics
        assert "psyche_run_step" in metrics


def test_reports_only_from_members(tmp_path, authority):
    a, outsider = Identity.generate(), Identity.generate()
    server = make_server(tmp_path / "run.sqlite", authority)
    with TestClient(create_app(server)) as client:
        assert post(client, a, Join(p2p_address="addr-a")).status_code == 200
        body = sign_request(outsider, "srv-test", "report", b'{"step": 1, "loss": 2.0}')
        assert client.post("/api/runs/srv-test/reports", content=body).status_code == 403
        # `a` is pending (not yet in an epoch), so it may not report either.
        body = sign_request(a, "srv-test", "report", b'{"step": 1, "loss": 2.0}')
        assert client.post("/api/runs/srv-test/reports", content=body).status_code == 403


def test_websocket_pushes_state(tmp_path, authority):
    a = Identity.generate()
    server = make_server(tmp_path / "run.sqlite", authority)
    with TestClient(create_app(server)) as client:
        with client.websocket_connect("/api/runs/srv-test/ws") as ws:
            first = Coordinator.from_bytes(ws.receive_bytes())
            assert not first.is_member(a.public_key)
            assert post(client, a, Join(p2p_address="addr-a")).status_code == 200
            pushed = Coordinator.from_bytes(ws.receive_bytes())
            assert pushed.is_member(a.public_key)


def test_the_compressed_feed_pushes_the_same_states_and_a_burst_comes_whole(tmp_path, authority):
    """``?encoding=zlib`` (what clients ask for) carries the very state bytes, compressed once per
    change; changes closer together than PUSH_INTERVAL_S arrive as their latest state."""
    import zlib

    from psyche.ledger.remote import inflate

    members = [Identity.generate() for _ in range(5)]
    server = make_server(tmp_path / "run.sqlite", authority)
    host = server.hosts["srv-test"]
    with TestClient(create_app(server)) as client:
        with client.websocket_connect("/api/runs/srv-test/ws?encoding=zlib") as ws:
            assert inflate(ws.receive_bytes(), 1 << 20) == host.state_bytes()
            for m in members:  # a burst: five changes at once
                assert post(client, m, Join(p2p_address="addr")).status_code == 200
            while True:  # the pushes that follow end with the state after the last change
                state = inflate(ws.receive_bytes(), 1 << 20)
                if state == host.state_bytes():
                    break
            assert all(Coordinator.from_bytes(state).is_member(m.public_key) for m in members)
    data = host.state_bytes()
    bomb = zlib.compress(bytes(10 << 20))
    for bad, why in ((bomb, "larger than"), (zlib.compress(data) + b"x", "after"), (zlib.compress(data)[:-3], "truncated"),
                     (b"not zlib", "malformed")):
        with pytest.raises(ValueError, match=why):
            inflate(bad, 1 << 20)


def test_state_feed_ends_when_its_client_leaves_though_nothing_changes(tmp_path, authority):
    """A gone client's feed must not wait for a state change that may never come (a Finished
    run): such handlers piled up and held the server's Ctrl-C until it was killed."""
    import asyncio

    server = make_server(tmp_path / "run.sqlite", authority)
    app = create_app(server)

    async def scenario() -> list[str]:
        inbox: asyncio.Queue = asyncio.Queue()
        for msg in ({"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}):
            inbox.put_nowait(msg)
        sent: list[str] = []

        async def send(msg):
            sent.append(msg["type"])

        scope = {"type": "websocket", "path": "/api/runs/srv-test/ws", "raw_path": b"/api/runs/srv-test/ws",
                 "query_string": b"", "headers": [], "scheme": "ws", "server": ("test", 80), "client": ("test", 1),
                 "root_path": "", "subprotocols": [], "asgi": {"version": "3.0"}, "app": app}
        # Nothing changes in the run: only the client's leaving can end the handler. (The
        # host's own wait is 10 s, so a handler that ignored the leaving would not end in 5.)
        await asyncio.wait_for(app(scope, inbox.get, send), 5)
        return sent

    assert asyncio.run(scenario()) == ["websocket.accept", "websocket.send"]


def test_state_feed_sends_a_change_made_while_it_was_sending(tmp_path, authority):
    """A state change applied while the feed is sending the previous state reaches the client
    at once. It used to wait for the next change or the feed's 10 s timeout: in an e2e run two
    clients whose feeds were busy when round 3 started saw no round 3 until it timed out 8 s
    later, so they trained nothing for it and were dropped."""
    import asyncio

    a = Identity.generate()
    server = make_server(tmp_path / "run.sqlite", authority)
    host = server.hosts["srv-test"]
    app = create_app(server)

    async def scenario() -> list[Coordinator]:
        inbox: asyncio.Queue = asyncio.Queue()
        inbox.put_nowait({"type": "websocket.connect"})
        states: list[Coordinator] = []
        two = asyncio.Event()

        async def send(msg):
            if msg["type"] != "websocket.send":
                return
            states.append(Coordinator.from_bytes(msg["bytes"]))
            if len(states) == 1:
                # The change lands while the feed is in its send of the state before it.
                assert host.apply(Join(p2p_address="addr-a"), a.public_key) is None
                await asyncio.sleep(0)
            else:
                two.set()

        scope = {"type": "websocket", "path": "/api/runs/srv-test/ws", "raw_path": b"/api/runs/srv-test/ws",
                 "query_string": b"", "headers": [], "scheme": "ws", "server": ("test", 80), "client": ("test", 1),
                 "root_path": "", "subprotocols": [], "asgi": {"version": "3.0"}, "app": app}
        feed = asyncio.ensure_future(app(scope, inbox.get, send))
        try:
            async with asyncio.timeout(3):  # well under the feed's own 10 s wait
                await two.wait()
        finally:
            inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
            await asyncio.wait_for(feed, 5)
        return states

    first, second = asyncio.run(scenario())
    assert not first.is_member(a.public_key) and second.is_member(a.public_key)


def test_a_change_before_the_wait_begins_is_not_missed(tmp_path, authority):
    """``wait_changed(seq)`` returns at once when the state moved past ``seq`` before the
    wait began (a waiter task that had not started yet when the change came)."""
    import asyncio

    host = make_server(tmp_path / "run.sqlite", authority).hosts["srv-test"]

    async def scenario() -> tuple[bool, bool]:
        seen = host.seq
        waiter = asyncio.ensure_future(host.wait_changed(seen, timeout=2))
        assert host.apply(Join(p2p_address="addr-a"), Identity.generate().public_key) is None
        moved = await waiter
        return moved, await host.wait_changed(host.seq, timeout=0.05)

    assert asyncio.run(scenario()) == (True, False)


def test_envelope_roundtrip_and_rejections():
    ident = Identity.generate()
    body = encode_instruction(Tick())
    data = sign_request(ident, "r", "instruction", body, nonce=7)
    req = open_request(data, run_id="r", kind="instruction")
    assert req.nonce == 7 and req.body == body and req.signer == ident.public_key
    with pytest.raises(ValueError, match="kind"):
        open_request(data, run_id="r", kind="report")
    with pytest.raises(ValueError, match="run"):
        open_request(data, run_id="s", kind="instruction")
    tampered = bytearray(data)
    tampered[-1] ^= 1
    with pytest.raises(ValueError):
        open_request(bytes(tampered), run_id="r", kind="instruction")


def test_pause_and_resume_from_the_cli(tmp_path, authority):
    import threading
    import time

    import uvicorn
    from typer.testing import CliRunner

    from psyche.cli import app as cli_app
    from psyche.demo import free_port

    key = tmp_path / "server.key"
    authority.save(key)
    stranger = tmp_path / "stranger.key"
    Identity.generate().save(stranger)
    server = make_server(tmp_path / "run.sqlite", authority)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        runner = CliRunner()
        refused = runner.invoke(cli_app, ["pause", "--server", url, "--key", str(stranger)])
        assert refused.exit_code == 1 and "Unauthorized" in refused.output
        ok = runner.invoke(cli_app, ["pause", "--server", url, "--key", str(key)])
        assert ok.exit_code == 0, ok.output
        assert server.hosts["srv-test"].coordinator.state.run_state.value == "Paused"
        ok = runner.invoke(cli_app, ["resume", "--server", url, "--key", str(key)])
        assert ok.exit_code == 0, ok.output
        assert server.hosts["srv-test"].coordinator.state.run_state.value == "WaitingForMembers"
    finally:
        uv.should_exit = True
        thread.join(10)


def _server_with_member(tmp_path, authority) -> tuple[CoordinatorServer, Identity]:
    """A server whose run has started with two members; returns it and the first member."""
    from psyche.coordinator import queries as q

    a, b = Identity.generate(), Identity.generate()
    cfg = CFG.model_copy(update={"coordinator": CFG.coordinator.model_copy(update={"waiting_for_members_extra_time": 0})})
    server = CoordinatorServer(Store(tmp_path / "run.sqlite"), host_key=authority.public_key)
    host = server.create_run(cfg, authority.public_key)
    with TestClient(create_app(server)) as client:
        for who in (a, b):
            assert post(client, who, Join(p2p_address="addr")).status_code == 200
        host.tick()
    assert q.member(host.coordinator.state, a.public_key) is not None
    return server, a


def test_reports_sent_while_the_server_is_down_arrive_once_it_is_back(tmp_path, authority):
    """A client keeps the metrics the host could not take and sends them, in order, once it is back."""
    import asyncio

    import httpx

    from psyche.client.runtime import ClientRuntime
    from psyche.ledger.remote import ServerLedger

    server, a = _server_with_member(tmp_path, authority)

    async def scenario() -> list[int]:
        down = ServerLedger("http://127.0.0.1:9", "srv-test", a)  # nothing listens: the server is "restarting"
        runtime = ClientRuntime(down, node=None, trainer=None, identity=a)
        for step in (1, 2):
            await runtime._send_report({"step": step, "loss": 3.0 - step})
        assert [r["step"] for r in runtime._outbox] == [1, 2], "kept while the host is unreachable"
        await down._http.aclose()
        # The server is back: the next report sends the kept ones first.
        runtime.ledger = up = ServerLedger("http://test", "srv-test", a)
        up._http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(server)), base_url="http://test")
        await runtime._send_report({"step": 3, "loss": 0.5})
        await up._http.aclose()
        assert not runtime._outbox
        return [step for _, step, _, _ in server.store.reports("srv-test")]

    assert asyncio.run(scenario()) == [1, 2, 3]


def test_a_clients_concurrent_requests_are_all_taken(tmp_path, authority):
    """A client's witness and its metrics go out at the same moment. Over several HTTP
    connections they can arrive in any order, and the server takes a signer's nonces only in
    increasing order. So each request is signed when its turn comes, one at a time. Before,
    about half of 195 concurrent reports were refused as stale, and a refused witness gets
    its node dropped."""
    import asyncio

    import uvicorn

    from psyche.demo import free_port
    from psyche.ledger.remote import ServerLedger

    server, a = _server_with_member(tmp_path, authority)

    async def scenario() -> list:
        port = free_port()
        http = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
        serving = asyncio.create_task(http.serve())
        while not http.started:
            await asyncio.sleep(0.02)
        ledger = ServerLedger(f"http://127.0.0.1:{port}", "srv-test", a)
        try:
            got = []
            for burst in range(4):
                got += await asyncio.gather(*(ledger.report({"step": 100 * burst + i, "loss": 1.0}) for i in range(1, 40)),
                                            return_exceptions=True)
            return got
        finally:
            await ledger.close()
            http.should_exit = True
            await serving

    refused = [r for r in asyncio.run(scenario()) if r is not None]
    assert refused == []
    assert len(server.store.reports("srv-test")) == 4 * 39


def test_each_step_records_when_its_round_started_and_ended(tmp_path, authority):
    """Tokens/s of every step, the last one included, is its tokens over its own round's time."""
    import sqlite3

    from psyche.testing.coordinator_swarm import Swarm
    from psyche.coordinator.state import RunState
    from psyche.ledger.host import RunHost
    from psyche.ledger.status import history_rows, run_status

    store = Store(tmp_path / "run.sqlite")
    coord = Coordinator.new(CFG.run_id, CFG, authority=authority.public_key, now=0)
    store.create_run(CFG.run_id, CFG.model_dump(mode="json"), authority.public_key, coord.to_bytes(), coord.digest())

    class HostedSwarm(Swarm):
        """The simulated clients, their instructions going through a real RunHost and Store."""

        def submit(self, instr, signer):
            err = host.apply(instr, signer)
            if err is not None:
                self.refused.append((instr, signer, err))
            return err

    swarm = HostedSwarm(coord)
    host = RunHost(coord, store=store, clock=lambda: swarm.now + 0.25, host_key=swarm.host_key)
    swarm.join(range(3))
    swarm.run_until(lambda c: c.state.run_state is RunState.Finished)
    spans = store.step_times(CFG.run_id)
    assert sorted(spans) == list(range(1, CFG.coordinator.total_steps + 1))
    assert all(end is not None and end > start for start, end in spans.values())
    member = coord.state.clients[0].id
    for step in spans:
        store.add_report(CFG.run_id, member, step, {"step": step, "tokens": 100, "forward_backward_seconds": 0.2},
                         nonce=step)
    rows = history_rows(coord, store, CFG)
    assert [r["step"] for r in rows] == sorted(spans)
    assert all(r["tokens_per_sec"] == pytest.approx(100 / (spans[r["step"]][1] - spans[r["step"]][0])) for r in rows)
    # Each client's "busy" figure: forward/backward over its last finished round.
    clients = {c["id"]: c for c in run_status(host, CFG, store)["clients"]}
    last = max(spans)
    assert clients[member.hex()]["utilization"] == pytest.approx(0.2 / (spans[last][1] - spans[last][0]))
    assert all(c["utilization"] is None for cid, c in clients.items() if cid != member.hex())
    store.close()

    # A database written before rounds recorded their end opens, and gains the column.
    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as db:
        db.execute("CREATE TABLE step_times (run_id TEXT NOT NULL, step INTEGER NOT NULL, started REAL NOT NULL, "
                   "PRIMARY KEY (run_id, step))")
        db.execute("INSERT INTO step_times VALUES ('r', 1, 5.0)")
    assert Store(old).step_times("r") == {1: (5.0, None)}


def swarm_on_a_host(authority, name: str, *, clients: int, min_clients: int, total_steps: int, batch: int):
    """A run of ``clients`` simulated members (the coordinator swarm) on a :class:`RunHost`, for status tests:
    its config, the swarm and the host."""
    from psyche.ledger.host import RunHost
    from psyche.testing.coordinator_swarm import Swarm

    cfg = parse_config({
        "name": name,
        "coordinator": {"init_min_clients": clients, "min_clients": min_clients, "warmup_time": 2, "cooldown_time": 2,
                        "max_round_train_time": 6, "round_witness_time": 1, "epoch_time": 10_000,
                        "total_steps": total_steps, "global_batch_size_start": batch, "global_batch_size_end": batch,
                        "checkpointers": 0},
        "model": {"seq_len": 64},
    })
    swarm = Swarm(Coordinator.new(cfg.run_id, cfg, authority=authority.public_key, now=0))
    return cfg, swarm, RunHost(swarm.coord)


def test_status_shows_each_clients_share_and_the_speed_the_run_learnt(authority):
    """Each client's row: its share of the round's batch, the coordinator's estimate of its speed
    and the tokens it had accepted; the run's row: the shares rule and the samples re-queued."""
    from psyche.coordinator import queries as q
    from psyche.coordinator.shares import Piece
    from psyche.coordinator.state import RunState
    from psyche.ledger.status import run_status
    from psyche.testing.coordinator_swarm import client_key

    cfg, swarm, host = swarm_on_a_host(authority, "shares-status", clients=3, min_clients=1, total_steps=60,
                                       batch=28)
    swarm.speeds = {0: 3000.0, 1: 3000.0, 2: 1000.0}
    swarm.join(range(3))
    swarm.run_until(lambda c: c.state.run_state is RunState.Warmup)
    rows = run_status(host, cfg, None)["clients"]
    # Before the first round: no share, no speed measured, nothing accepted.
    assert [(r["share"], r["share_fraction"], r["throughput"], r["accepted_tokens"]) for r in rows] == \
        [(None, None, None, 0)] * 3
    swarm.run_until(lambda c: c.state.run_state is RunState.RoundTrain and c.state.step == 7)

    status = run_status(host, cfg, None)
    assert status["shares"] == "speed" and status["requeued_samples"] == 0
    by_client = {r["id"]: r for r in status["clients"]}
    rows = [by_client[client_key(i).hex()] for i in range(3)]
    assert [r["share"] for r in rows] == [12, 12, 4]  # 3 : 3 : 1 of the batch of 28
    assert [r["share_fraction"] for r in rows] == pytest.approx([12 / 28, 12 / 28, 4 / 28])
    assert [round(r["throughput"], -2) for r in rows] == [3000, 3000, 1000]
    s = swarm.coord.state
    assert [r["accepted_tokens"] for r in rows] == [q.member(s, client_key(i)).tokens for i in range(3)]
    assert rows[0]["accepted_tokens"] > rows[2]["accepted_tokens"] > 0
    # A batch whose trainer missed its round waits in the queue: its samples are counted.
    s.requeued.append(Piece(10_000, 10_012))
    assert run_status(host, cfg, None)["requeued_samples"] == 12


def test_status_shows_a_condemned_client_and_the_round_that_condemned_it(authority):
    """A trainer whose results verification finds wrong: its row says at which step it was
    condemned and its suspicion, and the round's witness stats count the condemned result."""
    from psyche.coordinator import queries as q
    from psyche.coordinator.state import RunState
    from psyche.coordinator.verification import CONDEMN_AT
    from psyche.ledger.status import run_status
    from psyche.testing.coordinator_swarm import client_key

    cfg, swarm, host = swarm_on_a_host(authority, "verify-status", clients=5, min_clients=2, total_steps=20,
                                       batch=20)
    swarm.join(range(5))
    swarm.scores[3] = -3000  # its results point the wrong way
    swarm.run_until(lambda c: c.state.run_state is RunState.RoundTrain and c.state.step == 3)
    status = run_status(host, cfg, None)
    assert status["verifiers"] == 3 and status["verification_limit"] == CONDEMN_AT
    rows = {r["id"]: r for r in status["clients"]}
    bad = rows[client_key(3).hex()]
    assert bad["state"] == "Dropped" and bad["condemned_step"] == 1 and bad["suspicion"] <= -CONDEMN_AT
    assert all(r["condemned_step"] is None and r["suspicion"] == 0 for i, r in rows.items() if i != client_key(3).hex())
    assert [r["condemned"] for r in status["witness_rounds"]][:2] == [1, 0]
    assert client_key(3) in q.condemned_trainers(swarm.coord.state, 1)


def test_openapi_documents_the_status_api_and_its_refusals(tmp_path, authority):
    """/docs shows what each endpoint returns: the status documents and the error body are schemas."""
    server = make_server(tmp_path / "run.sqlite", authority)
    with TestClient(create_app(server)) as client:
        spec = client.get("/openapi.json").json()
        unknown = client.get("/api/runs/nope")
    schemas = spec["components"]["schemas"]
    assert {"RunSummary", "RunStatus", "HistoryRow", "ClientRow", "RoundOutcome", "ErrorBody", "Applied"} <= set(schemas)

    def returns(path: str, method: str = "get", code: str = "200") -> dict:
        return spec["paths"][path][method]["responses"][code]["content"]["application/json"]["schema"]

    runs = returns("/api/runs")
    assert runs["type"] == "array" and runs["items"] == {"$ref": "#/components/schemas/RunSummary"}
    assert returns("/api/runs/{run_id}") == {"$ref": "#/components/schemas/RunStatus"}
    assert returns("/api/runs/{run_id}", code="404") == {"$ref": "#/components/schemas/ErrorBody"}
    for code in ("400", "404", "409"):
        assert returns("/api/runs/{run_id}/instructions", "post", code) == {"$ref": "#/components/schemas/ErrorBody"}
    status = schemas["RunStatus"]["properties"]
    assert set(status) >= {"clients", "history", "checkpoints", "config", "seq", "digest", "phase_deadline", "rounds"}
    assert status["history"]["items"] == {"$ref": "#/components/schemas/HistoryRow"}
    assert "forward/backward" in schemas["ClientRow"]["properties"]["utilization"]["description"]
    row = schemas["ClientRow"]["properties"]
    assert {"share", "share_fraction", "throughput", "accepted_tokens"} <= set(row)
    assert "tokens per second" in row["throughput"]["description"]
    assert status["shares"]["enum"] == ["speed", "even"] and "requeued_samples" in status
    assert {"suspicion", "condemned_step"} <= set(row) and "verification" in row["condemned_step"]["description"]
    assert {"verifiers", "verification_limit"} <= set(status)
    # An unknown run is a 404 whose body is the same ErrorBody every refusal has.
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "UnknownRun", "message": "no run 'nope' here; GET /api/runs lists them"}


def test_the_status_says_where_the_runs_model_answers(tmp_path, authority):
    """``psyche server --inference-url``: every run's status carries it (an OpenAI base URL's /v1
    dropped: the root of the inference server), null without it; /openapi.json documents it."""
    server = make_server(tmp_path / "run.sqlite", authority)
    with TestClient(create_app(server)) as client:
        assert client.get("/api/runs/srv-test").json()["inference_url"] is None
        prop = client.get("/openapi.json").json()["components"]["schemas"]["RunStatus"]["properties"]["inference_url"]
    assert prop["anyOf"] == [{"type": "string"}, {"type": "null"}] and "/v1/completions" in prop["description"]
    server.store.close()
    for given in ("http://127.0.0.1:8001", "http://127.0.0.1:8001/", "http://127.0.0.1:8001/v1/"):
        served = CoordinatorServer(Store(tmp_path / "run.sqlite"), host_key=authority.public_key, inference_url=given)
        with TestClient(create_app(served)) as client:
            assert client.get("/api/runs/srv-test").json()["inference_url"] == "http://127.0.0.1:8001", given
        served.store.close()
